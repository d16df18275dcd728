"""Real diffusers pipelines, tiny and offline: distill → sample → eval → report; bad input.

Each family's pipeline is built from configs (random text encoders, local word-level
tokenizers, a tiny VAE) and written with ``save_pretrained``; the CLI meets it as it
would a downloaded FLUX or Wan folder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from attnbench.cli import main
from attnbench.integrations.diffusers.tiny import save_tiny_pipeline

SIZE = ["--height", "32", "--width", "48"]
QUIET = ["--no-progress", "--device", "cpu"]


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("pipelines") / "flux")


@pytest.fixture(scope="session")
def flux_student(flux_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "clear"
    code = main(["distill", "--model-path", str(flux_dir), "--method", "clear", "--option",
                 "radius=2", "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--gen-samples", "2", "--gen-steps", "2", *SIZE, *QUIET])
    assert code == 0
    return out


def _sample(pipe_dir, out, *extra):
    return main(["sample", "--model-path", str(pipe_dir), "--out", str(out), "--num", "3",
                 "--steps", "2", "--seed", "5", *SIZE, *QUIET, *extra])


def test_flux_distill_sample_eval_report(flux_dir, flux_student, tmp_path):
    student = flux_student / "student"
    meta = json.loads((student / "student.json").read_text())
    assert meta["family"] == "flux" and meta["method"] == "clear"
    assert meta["tapped"] == ["single_transformer_blocks.3.attn"]  # index 4 of 1 + 4 modules
    rows = [json.loads(line) for line in (flux_student / "metrics.jsonl").read_text().splitlines()]
    assert {"diffusion", "kd_out", "kd_attn", "loss"} <= set(rows[-1])
    assert (flux_student / "teacher_latents.safetensors").is_file()

    assert _sample(flux_dir, tmp_path / "teacher") == 0
    assert _sample(flux_dir, tmp_path / "student", "--student", str(student)) == 0
    t_prompts = (tmp_path / "teacher" / "prompts.jsonl").read_text()
    assert t_prompts == (tmp_path / "student" / "prompts.jsonl").read_text()
    assert sorted(p.name for p in (tmp_path / "teacher").glob("*.png")) == [
        f"{i:06d}.png" for i in range(3)]

    run = tmp_path / "run"
    assert main(["eval", "--pipeline-samples", str(tmp_path / "student"), "--teacher-samples",
                 str(tmp_path / "teacher"), "--out", str(run), "--feature-extractor",
                 "shapes", "--no-progress"]) == 0
    rows = json.loads((run / "results.json").read_text())["rows"]
    quality = [r for r in rows if r["level"] == "quality"]
    assert len(quality) == 1 and quality[0]["method"] == "clear"
    extra = quality[0]["extra"]
    metrics = (json.loads(extra) if isinstance(extra, str) else extra)["metrics"]
    assert {"psnr", "ssim", "fid", "kid"} <= set(metrics)
    assert main(["report", str(run)]) == 0

    # CLIP score and LPIPS from local weights (a tiny CLIP, a random AlexNet)
    from tests.metrics.test_groups import _lpips_files, save_tiny_clip

    pair = ["eval", "--pipeline-samples", str(tmp_path / "student"), "--teacher-samples",
            str(tmp_path / "teacher"), "--no-progress"]
    scored = tmp_path / "scored"
    assert main([*pair, "--out", str(scored), "--metrics", "lpips"]) == 2
    assert not (scored / "results.json").exists()  # refused before any work
    backbone, linear, _, _ = _lpips_files(tmp_path, torch.Generator().manual_seed(3))
    clip = save_tiny_clip(tmp_path / "clip")
    assert main([*pair, "--out", str(scored), "--metrics", "clip,lpips", "--clip-model",
                 str(clip), "--lpips-backbone", str(backbone), "--lpips-weights",
                 str(linear)]) == 0
    row = json.loads((scored / "results.json").read_text())["rows"][0]
    extra = json.loads(row["extra"]) if isinstance(row["extra"], str) else row["extra"]
    assert set(extra["metrics"]) == {"clip_score", "lpips"}
    assert extra["higher_is_better"] == {"clip_score": True, "lpips": False}
    assert "teacher_clip_score" in extra["clip"]


def test_student_reloads_bit_for_bit_and_refuses_other_teachers(flux_dir, tmp_path):
    from attnbench.integrations.diffusers.pipelines import config_hash, load_pipeline
    from attnbench.integrations.diffusers.student import load_student, save_student
    from attnbench.integrations.diffusers.swap import swap_attention

    pipe, _ = load_pipeline(flux_dir)
    teacher = pipe.transformer
    stock = copy.deepcopy(teacher)
    student = copy.deepcopy(teacher)
    handle = swap_attention(student, "clear", radius=2)
    with torch.no_grad():  # stands for training: the attention moves away from the teacher
        for name, p in student.named_parameters():
            if ".attn." in name:
                p.add_(0.01 * torch.randn_like(p))
    save_student(tmp_path / "s", student, handle, stock.state_dict(),
                 teacher_hash=config_hash(stock))
    fresh = copy.deepcopy(stock)
    load_student(fresh, tmp_path / "s")
    g = torch.Generator().manual_seed(0)
    text = {"encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
            "pooled_projections": torch.randn(1, 16, generator=g)}
    from attnbench.integrations.diffusers.families import FAMILIES

    inputs = FAMILIES["flux"].inputs(dict(stock.config), torch.randn(1, 6, 16, generator=g),
                                     text, torch.tensor([0.5]), (2, 3), 3.5)
    with torch.no_grad():
        a = student(**inputs, return_dict=False)[0]
        b = fresh(**inputs, return_dict=False)[0]
        c = stock(**inputs, return_dict=False)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)

    other = copy.deepcopy(stock)
    other.register_to_config(guidance_embeds=False)  # another teacher's config
    with pytest.raises(ValueError, match="another teacher"):
        load_student(other, tmp_path / "s")


def test_clear_on_flux_follows_the_official_rule():
    """CLEAR's distill.py on FLUX.1-dev: kd on processors whose index over all 57 (double
    first) is ≡ 0 mod 4 and single-stream; loss = fm + 0.5·out + 0.5·attn; attention trains."""
    from attnbench.distill.diffusers_objective import trainable_names
    from attnbench.distill.recipes import recipe_for
    from attnbench.integrations.diffusers import import_diffusers
    from attnbench.integrations.diffusers.families import FAMILIES
    from attnbench.integrations.diffusers.swap import kd_attn_modules, swap_attention

    diffusers = import_diffusers()
    model = diffusers.FluxTransformer2DModel(  # FLUX.1-dev's depth at width 8
        patch_size=1, in_channels=4, num_layers=19, num_single_layers=38, attention_head_dim=8,
        num_attention_heads=1, joint_attention_dim=8, pooled_projection_dim=8,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    recipe = recipe_for("clear")
    assert recipe.weights == {"diffusion": 1.0, "kd_out": 0.5, "kd_attn": 0.5}
    assert recipe.trainable == "attention" and recipe.attn_tap == "pre_proj"
    swap_attention(model, "clear", radius=2)
    family = FAMILIES["flux"]
    assert kd_attn_modules(model, recipe) == [
        f"single_transformer_blocks.{i}.attn" for i in range(1, 38, 4)]
    names = set(trainable_names(model, family, "attention"))
    projections = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                   "add_v_proj", "to_add_out")
    expected = {n for n, _ in model.named_parameters()
                if ".attn." in n and any(f".attn.{p}." in n for p in projections)}
    expected |= {n for n, _ in model.named_parameters() if ".processor.core." in n}
    assert names == expected
    assert not any("norm" in n for n in names)


def test_lit_on_a_flow_matching_family_is_labelled_attnbench_s_choice():
    """LiT's λ1/λ2 act on ε and variance channels (PixArt-Σ keeps them); a velocity model
    takes λ1 on its output and no λ2, and the recipe says it is attnbench's choice."""
    from attnbench.attention.recipes import OWN_CHOICE
    from attnbench.distill.recipes import for_objective, recipe_for

    lit = recipe_for("lit")
    flow = for_objective(lit, "flow")
    assert flow.name == "lit-flow" and flow.source.startswith(OWN_CHOICE)
    assert flow.weights == {"diffusion": 1.0, "kd_out": 0.5}
    assert for_objective(lit, "eps_vb") is lit
    assert for_objective(recipe_for("clear"), "flow") is recipe_for("clear")


def _fails(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_input_is_one_line_before_work(flux_dir, flux_student, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["sample", "--out", str(out), "--num", "2", *QUIET]
    broken = tmp_path / "broken"
    shutil.copytree(flux_dir, broken)
    shutil.rmtree(broken / "vae")
    _fails([*base, "--model-path", str(broken)], capsys, "--model-path", "'vae' is missing")
    pickled = tmp_path / "pickled"
    shutil.copytree(flux_dir, pickled)
    for f in (pickled / "transformer").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    _fails([*base, "--model-path", str(pickled)], capsys, "pickle", "safetensors")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    _fails([*base, "--model-path", str(flux_dir), "--prompts", str(empty)], capsys,
           "--prompts", "no prompts")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x89PNG\x00\xff\xfe")
    _fails([*base, "--model-path", str(flux_dir), "--prompts", str(binary)], capsys,
           "--prompts")
    _fails([*base, "--model-path", str(flux_dir), "--height", "40"], capsys, "--height",
           "multiples of 16")
    with pytest.raises(SystemExit) as exit_:  # argparse: --num must be a positive integer
        main(["sample", "--out", str(out), "--num", "0", "--model-path", str(flux_dir)])
    assert exit_.value.code == 2
    assert not out.exists()  # nothing was written
    other = tmp_path / "other_student"
    shutil.copytree(flux_student / "student", other)
    meta = json.loads((other / "student.json").read_text())
    meta["family"] = "sd3"
    (other / "student.json").write_text(json.dumps(meta))
    _fails([*base, "--model-path", str(flux_dir), "--student", str(other)], capsys,
           "--student", "sd3 student")
    meta["family"] = "flux"
    meta["teacher_config_sha256"] = "0" * 64
    (other / "student.json").write_text(json.dumps(meta))
    _fails([*base, "--model-path", str(flux_dir), "--student", str(other), "--force"], capsys,
           "--student", "another teacher")
    run = ["run", "--model-path", str(flux_dir), "--student", str(other), "--res", "32x48",
           "--out", str(tmp_path / "run"), *QUIET]
    _fails(run, capsys, "--student", "another teacher")
    _fails(["eval", "--model-path", str(flux_dir), "--student", str(other), "--num", "1",
            "--out", str(tmp_path / "ev"), "--device", "cpu"], capsys, "--student",
           "another teacher")
    meta["teacher_config_sha256"] = json.loads(
        (flux_student / "student" / "student.json").read_text())["teacher_config_sha256"]
    meta["method"] = "no-such-method"
    (other / "student.json").write_text(json.dumps(meta))
    _fails([*base, "--model-path", str(flux_dir), "--student", str(other), "--force"], capsys,
           "--student", "'no-such-method'")
    _fails([*run[:-len(QUIET)], "--quality", "fidelity", *QUIET], capsys, "--student",
           "'no-such-method'")
    _fails(["run", "--model-path", str(flux_dir), "--quality", "fidelity", "--res", "32x48",
            "--out", str(tmp_path / "run"), *QUIET], capsys, "--quality", "--student DIR")
    _fails(["run", "--model-path", str(flux_dir / "transformer"), "--quality", "fidelity",
            "--student", str(flux_student / "student"), "--res", "32x48", "--out",
            str(tmp_path / "run"), *QUIET], capsys, "--model-path", "pipeline folder")
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "ev" / "results.json").exists()


@pytest.mark.slow
def test_torchrun_sample_union_equals_one_process(flux_dir, tmp_path):
    assert _sample(flux_dir, tmp_path / "one") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "attnbench", "sample", "--model-path", str(flux_dir), "--out",
           str(tmp_path / "two"), "--num-samples", "3", "--steps", "2", "--seed", "5", *SIZE,
           *QUIET]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp_path / "one" / "samples.npz") as a, \
            np.load(tmp_path / "two" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
        assert np.array_equal(a["arr_1"], b["arr_1"])
    assert json.loads((tmp_path / "two" / "samples.json").read_text())["world_size"] == 2


#: each method with its recipe on each family (--option: a window the tiny grids can hold)
METHOD_OPTIONS = {"clear": ["--option", "radius=2"], "lit": [], "sla": []}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3", "pixart", "sana", "wan"])
@pytest.mark.parametrize("method", ["clear", "lit", "sla"])
def test_every_family_and_method_distills_samples_scores_and_reports(family, method, tmp_path):
    """distill (the method's recipe, the family's objective) → sample (teacher and student,
    paired) → eval → run (the student's speed into the same folder) → report: the student's
    quality beside its speed."""
    from attnbench.report.tables import load_run, quality_table

    pipe = save_tiny_pipeline(family, tmp_path / family)
    frames = ["--frames", "5"] if family == "wan" else []
    small = ["--height", "32", "--width", "32", "--max-sequence-length", "8", *frames, *QUIET]
    assert main(["distill", "--model-path", str(pipe), "--method", method, "--out",
                 str(tmp_path / "d"), "--steps", "2", "--batch-size", "2", "--gen-samples", "2",
                 "--gen-steps", "2", *METHOD_OPTIONS[method], *small]) == 0
    student = tmp_path / "d" / "student"
    meta = json.loads((student / "student.json").read_text())
    assert meta["family"] == family and meta["method"] == method
    assert meta["recipe"]["name"].startswith(method)
    for name, extra in (("t", []), ("s", ["--student", str(student)])):
        assert main(["sample", "--model-path", str(pipe), "--out", str(tmp_path / name),
                     "--num", "2", "--steps", "2", *small, *extra]) == 0
    assert ((tmp_path / "t" / "prompts.jsonl").read_text()
            == (tmp_path / "s" / "prompts.jsonl").read_text())
    run = tmp_path / "run"
    assert main(["eval", "--pipeline-samples", str(tmp_path / "s"), "--teacher-samples",
                 str(tmp_path / "t"), "--out", str(run), "--metrics", "fidelity",
                 "--no-progress"]) == 0
    res = ["--res", "32x32"] + (["--frames", "5"] if family == "wan" else [])
    assert main(["run", "--model-path", str(pipe), "--student", str(student), *res,
                 "--level", "attention", "--budget", "2", "--out", str(run), *QUIET]) == 0
    table = quality_table(load_run(run).frame)
    assert set(table["method"]) == {method}
    assert table["latency_ms"].notna().all(), table  # its own speed, same label and size
    assert (run / "report.md").is_file()


@pytest.mark.parametrize("model", ["flux-tiny", "wan-tiny"])
def test_distill_a_zoo_entry_on_random_data(model, tmp_path):
    """``distill --model ZOO --data random``: the zoo transformer with random weights, the
    family's objective and recipe; --data self is refused (no text encoders)."""
    out = tmp_path / "d"
    size = ["--height", "32", "--width", "32"] + (["--frames", "5"] if model == "wan-tiny" else [])
    argv = ["distill", "--model", model, "--method", "sla", "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--gen-samples", "2", "--gradient-checkpointing", *size, *QUIET]
    assert main([*argv, "--data", "random"]) == 0
    meta = json.loads((out / "student" / "student.json").read_text())
    assert meta["method"] == "sla" and meta["family"] == model.split("-")[0]
    from attnbench.integrations.diffusers import build_transformer
    from attnbench.integrations.diffusers.student import load_student

    load_student(build_transformer(model), out / "student")  # the zoo teacher takes it back
    argv[argv.index(str(out))] = str(tmp_path / "e")
    assert main(argv) == 2  # --data self (the default) needs a pipeline
