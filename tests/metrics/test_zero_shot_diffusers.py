"""``fidelity --model / --model-path``: zero-shot fidelity inside diffusers transformers, text
tokens and video frames included."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

pytest.importorskip("diffusers")

from attnbench.cli import main
from attnbench.integrations.diffusers import build_transformer, model_shapes
from attnbench.metrics import zero_shot as zs
from attnbench.metrics import zero_shot_diffusers as zd
from attnbench.models.diffusers_configs import get_diffusers_config
from attnbench.results import ZERO_SHOT_LEVEL, load_table

FAST = ["--timesteps", "300,900", "--num", "2", "--no-progress"]


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fd") / "flux"
    assert main(["fidelity", "--model", "flux-tiny", *FAST, "--out", str(out),
                 "--methods", "lit,clear:radius=9,sla:topk=0.5:block_q=4:block_kv=4"]) == 0
    return out


def test_softmax_and_a_covering_window_are_exact_with_text_tokens(flux_run):
    """FLUX: 7 text tokens first, a 3x5 grid; softmax and CLEAR r=9 (covering it) are the
    model's attention: error 0 and mass 1 on every layer, double and single stream."""
    layers = pd.read_csv(flux_run / zs.FIDELITY_CSV)
    modules = set(layers["module"])
    assert any("single_transformer_blocks" in m for m in modules)
    assert any(m.startswith("transformer_blocks") for m in modules)
    for label in ("softmax", "clear:radius=9.0"):
        rows = layers[layers["label"] == label]
        assert len(rows) == 2 * 2 and (rows["rel_error"] < 1e-10).all(), label
        assert ((rows["mass_recall"] - 1).abs() < 1e-10).all(), label
    assert (layers["text_mass"] > 0).all()  # text tokens hold part of the mass
    sla = layers[layers["label"].str.startswith("sla")]
    assert sla["rel_error"].between(1e-6, 10).all() and sla["mass_recall"].lt(1).all()
    assert layers[layers["label"] == "lit"]["mass_recall"].isna().all()
    e2e = pd.read_csv(flux_run / zs.END_TO_END_CSV)
    assert (e2e[e2e["label"] == "softmax"]["eps_rel_error"] < 1e-5).all()
    assert (e2e[e2e["label"] == "lit"]["eps_rel_error"] > 1e-3).all()  # re-initialised


def test_rows_name_the_model_size_and_inputs(flux_run):
    frame, meta = load_table(flux_run)
    rows = frame[frame["level"] == ZERO_SHOT_LEVEL]
    assert set(rows["method"]) == {"softmax", "lit", "clear", "sla"}
    row = rows.iloc[0]
    assert (row["model"], row["resolution"], row["height"], row["tokens"]) == (
        "flux-tiny", 80, 48, 7 + 15)
    assert "random" in meta["inputs"]["weights"] and meta["inputs"]["layout"] == "7 text + 3x5"
    report = (flux_run / "report.md").read_text()
    assert "Zero-shot: each method against softmax" in report
    assert "Trajectory PSNR not measured: attnbench has no sampler" in report


def test_video_frames(tmp_path):
    out = tmp_path / "wan"
    assert main(["fidelity", "--model", "wan-tiny", "--frames", "5", "--res", "32x48", *FAST,
                 "--methods", "clear:radius=1", "--out", str(out)]) == 0
    layers = pd.read_csv(out / zs.FIDELITY_CSV)
    assert layers[["rel_error", "cosine", "mass_recall", "radius_50"]].notna().all().all()
    assert (layers["text_mass"] == 0).all()  # Wan's self-attention has no text tokens
    locality = pd.read_csv(out / zs.LOCALITY_CSV)
    assert locality["mass_within"].between(0, 1 + 1e-12).all()


def test_given_latents_replace_the_random_ones(tmp_path):
    """--inputs with hidden_states: the same latents give the same numbers, other latents
    other numbers (the file is really used)."""
    from safetensors.torch import save_file

    shapes = model_shapes(get_diffusers_config("pixart-tiny"))
    base = torch.randn(2, *shapes.latent, generator=torch.Generator().manual_seed(9))
    errors = []
    for i, scale in enumerate((1.0, 1.0, 3.0)):
        path = tmp_path / f"x{i}.safetensors"
        save_file({"hidden_states": base * scale}, str(path))
        out = tmp_path / f"run{i}"
        assert main(["fidelity", "--model", "pixart-tiny", "--inputs", str(path), *FAST,
                     "--methods", "clear:radius=1", "--out", str(out)]) == 0
        layers = pd.read_csv(out / zs.FIDELITY_CSV)
        errors.append(layers[layers["label"] != "softmax"]["rel_error"].to_numpy())
        assert "hidden_states" in load_table(out)[1]["inputs"]["data"]
    assert errors[0] == pytest.approx(errors[1], rel=1e-12)
    assert errors[0] != pytest.approx(errors[2], rel=1e-6)


def test_noising_follows_the_family():
    x0, noise = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    inputs = {"hidden_states": x0, "timestep": torch.tensor([0.5])}
    flux = zd.noised(get_diffusers_config("flux-tiny"), inputs, noise, 250)
    assert flux["timestep"].item() == pytest.approx(0.25)  # FLUX takes σ = t/1000
    assert torch.allclose(flux["hidden_states"], torch.full_like(x0, 0.75))  # (1 − σ)·x0
    sd3 = zd.noised(get_diffusers_config("sd3-tiny"), inputs, noise, 250)
    assert sd3["timestep"].item() == pytest.approx(250)
    from attnbench.diffusion import Diffusion

    pixart = zd.noised(get_diffusers_config("pixart-tiny"),
                       {"hidden_states": x0, "timestep": torch.tensor([500])}, noise, 250)
    abar = Diffusion(num_steps=1000).q_sample(x0, torch.tensor([250]), noise)
    assert torch.allclose(pixart["hidden_states"], abar) and pixart["timestep"].item() == 250


@pytest.mark.parametrize("argv, message", [
    (["--model", "sana-tiny"], "ReLU linear attention, not softmax"),
    (["--model", "flux-tiny", "--ckpt", "x"], "--ckpt is an attnbench/DiT checkpoint"),
    (["--model", "DiT-XL/2"], "a diffusers zoo name"),
    (["--model", "flux-tiny", "--methods", "lit:heads=2"], "keeps its heads"),
    (["--model", "flux-tiny", "--res", "40"], "flux-tiny needs positive multiples of 16"),
    (["--model", "flux-tiny", "--frames", "3"], "--frames 3: flux-tiny is an image model"),
    (["--res", "64"], "--res is for diffusers models"),
    (["--model", "flux-tiny", "--inputs", "/nonexistent.safetensors"], "no such file"),
])
def test_bad_input_exits_2_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "x"
    assert main(["fidelity", *argv, *FAST, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("tensors, message", [
    ({"hidden_states": torch.zeros(1, 3)}, "hidden_states has shape (1, 3)"),
    ({"latentz": torch.zeros(1)}, "'latentz' is not an input"),
    ({"timestep": torch.zeros(2)}, "timestep is set by --timesteps"),
])
def test_bad_given_tensors_are_named(tmp_path, capsys, tensors, message):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    assert main(["fidelity", "--model", "flux-tiny", "--inputs", str(path), *FAST,
                 "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_local_folder(tmp_path):
    folder = tmp_path / "pipe"
    build_transformer("sd3-tiny", seed=3).save_pretrained(folder / "transformer")
    out = tmp_path / "run"
    assert main(["fidelity", "--model-path", str(folder), "--res", "32", *FAST, "--methods", "sla",
                 "--out", str(out)]) == 0
    _, meta = load_table(out)
    assert meta["inputs"]["weights"].startswith("--model-path")
    layers = pd.read_csv(out / zs.FIDELITY_CSV)
    soft = layers[layers["label"] == "softmax"]
    assert (soft["rel_error"] < 1e-10).all()
    joint = soft["module"].str.endswith(".attn")  # SD3: text last; SD3.5's attn2: image only
    assert joint.any() and (soft[joint]["text_mass"] > 0).all()
    assert (soft[~joint]["text_mass"] == 0).all()
