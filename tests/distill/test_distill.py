"""Distillation: recipes and loss terms, the run directory, resume, bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

from attnbench.cli import main
from attnbench.diffusion import Diffusion
from attnbench.distill import RECIPES, TrainConfig, evaluate, get_recipe, plan_batch, recipe_for
from attnbench.distill.io import atomic_torch_save, load_training_checkpoint
from attnbench.distill.losses import recipe_losses
from attnbench.models import load_dit
from attnbench.models.convert import convert
from tests.helpers import tiny_pixel_dit as tiny_teacher


def tiny_args(teacher_dir, out, method="lit", *extra):
    return ["distill", "--teacher", str(teacher_dir), "--method", method, "--out", str(out),
            "--steps", "4", "--batch-size", "4", "--gen-samples", "8", "--gen-steps", "2",
            "--eval-samples", "4", "--lr", "1e-3", "--no-progress", *extra]


# --------------------------------------------------------------------------- recipes


def test_recipes_are_the_papers():
    assert RECIPES["lit"].weights == {"diffusion": 1.0, "kd_eps": 0.5, "kd_sigma": 0.05}
    assert RECIPES["clear"].weights == {"diffusion": 1.0, "kd_out": 0.5, "kd_attn": 0.5}
    assert RECIPES["clear"].trainable == "attention"
    # TurboDiffusion's SLA fine-tuning: the teacher-output MSE only (the earlier
    # diffusion + kd_out recipe is the named variant sla-attnbench)
    assert RECIPES["sla"].weights == {"kd_out": 1.0}
    assert RECIPES["sla-attnbench"].weights == {"diffusion": 1.0, "kd_out": 1.0}
    assert recipe_for("softmax").name == "default"
    custom = RECIPES["lit"].with_overrides({"kd_eps": "0.3"}, "attention")
    assert custom.weights["kd_eps"] == 0.3 and custom.trainable == "attention"
    assert custom.name == "lit+custom"
    with pytest.raises(ValueError, match="unknown loss term"):
        RECIPES["lit"].with_overrides({"kd_bogus": 1})
    with pytest.raises(ValueError, match="not a number"):
        RECIPES["lit"].with_overrides({"kd_eps": "lots"})
    with pytest.raises(ValueError, match=">= 0"):
        RECIPES["lit"].with_overrides({"kd_eps": -1})
    with pytest.raises(ValueError, match="nothing to train"):
        RECIPES["sla"].with_overrides({"kd_out": 0})
    with pytest.raises(ValueError, match="recipe"):
        get_recipe("nope")


@pytest.mark.parametrize("method,terms", [
    ("lit", {"diffusion", "mse", "vb", "kd_eps", "kd_sigma", "loss"}),
    ("clear", {"diffusion", "mse", "vb", "kd_out", "kd_attn", "loss"}),
    ("sla", {"diffusion", "mse", "vb", "kd_out", "loss"}),
])
def test_recipe_losses(method, terms, gen):
    teacher = tiny_teacher()
    # masked SDPA: FlexAttention would compile (seconds) for the no-grad teacher-like calls
    options = {"radius": 2, "impl": "masked_sdpa"} if method == "clear" else {}
    if method == "sla":
        options = {"block_q": 4, "block_kv": 4, "topk": 0.5}
    student, _ = convert(teacher, method, seed=0, **options)
    recipe = RECIPES[method]
    x0 = torch.rand(3, 3, 16, 16, generator=gen) * 2 - 1
    y, t = torch.tensor([0, 5, 91]), torch.tensor([0, 400, 999])
    noise = torch.randn(3, 3, 16, 16, generator=gen)
    out = recipe_losses(recipe, Diffusion(), student, teacher, x0, y, t, noise)
    assert set(out) == terms
    total = sum(w * out[k] for k, w in recipe.weights.items())
    assert torch.allclose(out["loss"], total)
    out["loss"].backward()
    # the teacher against itself: every distillation term is 0
    same = recipe_losses(recipe, Diffusion(), teacher, teacher, x0, y, t, noise)
    for key in terms - {"diffusion", "mse", "vb", "loss"}:
        assert float(same[key].detach()) == 0.0


def test_clear_attention_term_is_the_official_one_and_the_old_one_an_option(gen):
    """Official: before the output projection, blocks with index % 4 == 0; the earlier
    definition (after the projection, every block) stays selectable by name."""
    from attnbench.distill.losses import AttentionTap

    official, old = RECIPES["clear"], get_recipe("clear-post-proj")
    assert (official.attn_tap, official.attn_every) == ("pre_proj", 4)
    assert (old.attn_tap, old.attn_every) == ("post_proj", 1) and old.weights == official.weights
    assert "Huage001/CLEAR" in official.source
    teacher = tiny_teacher()
    x = torch.rand(2, 3, 16, 16, generator=gen)
    t, y = torch.tensor([3, 500]), torch.tensor([1, 2])
    depth = len(teacher.blocks)
    with torch.no_grad():
        with AttentionTap(teacher, official) as tap:
            teacher(x, t, y)
        heads = teacher.blocks[0].attn.num_heads
        assert len(tap.outputs) == len(range(0, depth, 4))
        assert tap.outputs[0].shape[:2] == (2, heads) and tap.outputs[0].dim() == 4
        with AttentionTap(teacher, old) as tap:
            teacher(x, t, y)
        assert len(tap.outputs) == depth and tap.outputs[0].dim() == 3
    with pytest.raises(ValueError, match="attn_tap"):
        official.with_overrides(attn_tap="inside")


def test_batch_plan_is_a_pure_function_of_the_step():
    a = plan_batch(0, 7, 8, (3, 4, 4), 100, 1000, 0.1)
    b = plan_batch(0, 7, 8, (3, 4, 4), 100, 1000, 0.1)
    c = plan_batch(0, 8, 8, (3, 4, 4), 100, 1000, 0.1)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.t, b.t)
    assert not torch.equal(a.noise, c.noise)
    half = a.rows(4, 8)
    assert torch.equal(half.noise, a.noise[4:]) and half.indices.tolist() == a.indices[4:].tolist()


def test_evaluate_on_held_out_noise(gen):
    teacher = tiny_teacher()
    x0, y = torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1, torch.arange(8)
    same = evaluate(teacher, Diffusion(), x0, y, teacher=teacher)
    assert same["eps_mse_vs_teacher"] == 0.0 and same["eps_mse"] == same["teacher_eps_mse"]
    assert set(same["by_t"]) == {"t0-249", "t250-499", "t500-749", "t750-999"}
    student, _ = convert(teacher, "lit", seed=0)
    again = evaluate(student, Diffusion(), x0, y, teacher=teacher)
    assert again["eps_mse_vs_teacher"] > 0
    assert evaluate(student, Diffusion(), x0, y, teacher=teacher) == again  # same noise


# --------------------------------------------------------------------------- end to end


def test_distill_cli_writes_a_loadable_student(teacher_dir, tmp_path, capsys):
    out = tmp_path / "lit"
    assert main(tiny_args(teacher_dir, out, "lit", "--ckpt-every", "2", "--eval-every", "2")) == 0
    printed = capsys.readouterr().out
    assert "held-out initial" in printed and "final_ema" in printed
    for name in ("checkpoint.pt", "run.json", "metrics.jsonl", "metrics.csv", "summary.json",
                 "teacher_samples.npz", "student/model.safetensors", "student/config.json",
                 "student/inheritance.json", "student/distill.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    student = load_dit(out / "student")
    assert student.config.attention == "lit" and student.config.heads == 2
    recipe = json.loads((out / "student" / "distill.json").read_text())
    assert recipe["recipe"]["weights"] == {"diffusion": 1.0, "kd_eps": 0.5, "kd_sigma": 0.05}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "diffusion", "kd_eps", "kd_sigma", "mse", "vb", "step_s"} <= set(rows[0])
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2] and evals[0]["ema"]["eps_mse_vs_teacher"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval"]["initial"]["eps_mse_vs_teacher"] > 0
    assert summary["timing"]["median_step_s"] > 0


def test_clear_trains_only_the_attention(teacher_dir, tmp_path):
    out = tmp_path / "clear"
    assert main(tiny_args(teacher_dir, out, "clear", "--option", "radius=2",
                          "impl=masked_sdpa",
                          "--data", "shapes")) == 0
    student = load_dit(out / "student")
    teacher = load_dit(teacher_dir)
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if ".attn." not in key:
            assert torch.equal(value, t_state[key]), key
    changed = [k for k, v in student.state_dict().items() if ".attn." in k
               and not torch.equal(v, t_state[k])]
    assert changed


def test_resume_continues_exactly(teacher_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(tiny_args(teacher_dir, straight, "sla", "--option", "block_q=4",
                          "block_kv=4")) == 0
    args = tiny_args(teacher_dir, split, "sla", "--option", "block_q=4", "block_kv=4")
    first = [a if a != "4" or args[i - 1] != "--steps" else "2" for i, a in enumerate(args)]
    assert main(first) == 0
    assert load_training_checkpoint(split / "checkpoint.pt")["step"] == 2
    assert main([*args, "--resume"]) == 0
    a = load_training_checkpoint(straight / "checkpoint.pt")
    b = load_training_checkpoint(split / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-6), key
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- bad input


def test_existing_run_is_not_overwritten(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(teacher_dir, out)) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(tiny_args(teacher_dir, out)) == 2
    assert "--resume" in capsys.readouterr().err
    # resuming with another method: a clear error, and the run is untouched
    assert main([*tiny_args(teacher_dir, out, "clear"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "method 'lit', not 'clear'" in err and len(err.strip().splitlines()) == 1
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main([*tiny_args(teacher_dir, tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


def test_corrupted_checkpoint_is_reported_and_kept(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(teacher_dir, out)) == 0
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main([*tiny_args(teacher_dir, out), "--resume"]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err
    assert ckpt.stat().st_size == len(data) // 2  # nothing deleted


@pytest.mark.parametrize("bad,match", [
    ("text", "not a checkpoint"),
    ("keys", "does not look like a DiT checkpoint"),
    ("truncated", "truncated or corrupted"),
])
def test_a_teacher_that_is_not_a_dit(teacher_dir, tmp_path, capsys, bad, match):
    path = tmp_path / "teacher.safetensors"
    if bad == "text":
        path = tmp_path / "teacher.pt"
        path.write_text("hello")
    elif bad == "truncated":
        data = (teacher_dir / "model.safetensors").read_bytes()
        path.write_bytes(data[: len(data) - 100])
    else:
        from safetensors.torch import save_file

        save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    assert main(tiny_args(path, tmp_path / "out")) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_options_that_contradict_the_teacher(teacher_dir, tmp_path, capsys):
    # 3 heads do not divide the width 32: refused
    assert main([*tiny_args(teacher_dir, tmp_path / "a"), "--num-heads", "3"]) == 2
    assert "does not divide" in capsys.readouterr().err
    # a radius larger than the grid is merely global attention: accepted
    assert main(tiny_args(teacher_dir, tmp_path / "b", "clear", "--option", "radius=100",
                          "impl=masked_sdpa", "--steps", "1")) == 0
    capsys.readouterr()
    assert main(tiny_args(teacher_dir, tmp_path / "c", "lit", "--weight", "kd_bogus=1")) == 2
    assert "unknown loss term" in capsys.readouterr().err
    # 4-channel latents cannot feed a pixel teacher
    import numpy as np

    np.savez(tmp_path / "lat.npz", latents=np.zeros((10, 4, 16, 16), np.float32),
             labels=np.zeros(10, np.int64))
    assert main(tiny_args(teacher_dir, tmp_path / "d", "lit", "--data",
                          str(tmp_path / "lat.npz"))) == 2
    assert "channels" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own check
        main([*tiny_args(teacher_dir, tmp_path / "e"), "--batch-size", "0"])
    assert exit_info.value.code == 2


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 1}, path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(10)  # a half-written file ...
        raise OSError("disk full")  # ... and the writer dies

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True) == {"step": 1}  # the old file is intact
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary left behind


def test_bf16_autocast_runs(teacher_dir, tmp_path):
    assert main(tiny_args(teacher_dir, tmp_path / "bf", "sla", "--option", "block_q=4",
                          "block_kv=4", "--precision", "bf16", "--steps", "2")) == 0


def test_train_config_validation():
    with pytest.raises(ValueError, match="split evenly"):
        TrainConfig(batch_size=3).validate(world_size=2)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8").validate()


def test_learning_rate_schedules():
    from attnbench.distill.trainer import learning_rate

    flat = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    assert learning_rate(flat, 0) == pytest.approx(0.1)
    assert learning_rate(flat, 9) == 1.0 and learning_rate(flat, 99) == 1.0
    cos = TrainConfig(steps=110, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert learning_rate(cos, 10) == 1.0
    assert learning_rate(cos, 60) == pytest.approx(0.5)
    assert learning_rate(cos, 110) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step").validate()
