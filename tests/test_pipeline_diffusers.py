"""``run`` on diffusers models: the zoo (``--model flux-tiny``), a saved folder
(``--model-path``), video frames (``--frames``) and the refusals of bad input."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from attnbench.cli import main
from attnbench.integrations.diffusers import build_transformer

FAST = ["--budget", "20", "--no-progress", "--no-report"]
METHODS = ("softmax", "lit", "clear", "sla")


def _rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in rows:
        r["extra"] = json.loads(r["extra"])
    return rows


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux") / "pipe"
    build_transformer("flux-tiny", seed=1).save_pretrained(folder / "transformer")
    return folder


@pytest.fixture(scope="module")
def folder_run(flux_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "folder"
    code = main(["run", "--model-path", str(flux_folder), "--methods", ",".join(METHODS),
                 "--level", "model", "--res", "32", "--out", str(out), *FAST])
    assert code == 0
    return {r["method"]: r for r in _rows(out)}


def test_model_path_measures_every_method(folder_run, flux_folder):
    """Every method has a row with a status; softmax is measured; a row not measured says why."""
    assert set(folder_run) == set(METHODS)
    soft = folder_run["softmax"]
    assert soft["status"] == "ok" and soft["latency_median_s"] > 0
    assert soft["model"] == f"FluxTransformer2DModel ({flux_folder / 'transformer'})"
    assert soft["extra"]["weights"].startswith("--model-path")
    assert soft["extra"]["layout"] == "512 text + 2x2" and soft["tokens"] == 516
    assert soft["flops_actual"] > 0 and soft["density"] == 1.0
    for method, row in folder_run.items():
        assert row["status"] in ("ok", "unavailable", "error", "skipped")
        if row["status"] != "ok":
            assert row["reason"], method


@pytest.mark.parametrize("method", ["lit", "clear", "sla"])
def test_model_path_measures_every_method_with_text_tokens(folder_run, method):
    """FLUX's 512 text tokens + the image grid: every method runs on that layout."""
    row = folder_run[method]
    assert row["status"] == "ok", row["reason"]
    assert row["extra"]["layout"] == "512 text + 2x2" and row["flops_actual"] > 0


def test_zoo_model_at_attention_and_model_levels(tmp_path):
    out = tmp_path / "zoo"
    assert main(["run", "--model", "flux-tiny", "--level", "attention,model", "--res", "32",
                 "--methods", "softmax,clear", "--out", str(out), *FAST]) == 0
    rows = {(r["method"], r["level"]): r for r in _rows(out)}
    assert set(rows) == {(m, lvl) for m in ("softmax", "clear") for lvl in ("attention", "model")}
    for level in ("attention", "model"):
        soft = rows["softmax", level]
        assert soft["status"] == "ok" and soft["model"] == "flux-tiny"
        assert soft["extra"]["layout"] == "7 text + 2x2" and soft["tokens"] == 11
        assert soft["heads"] == 2 and soft["head_dim"] == 16
    assert rows["softmax", "model"]["extra"]["weights"] == "random (seed 0)"
    attn = rows["softmax", "attention"]
    assert attn["flops_actual"] == pytest.approx(4 * 2 * 11 * 11 * 16)  # text tokens included
    for level in ("attention", "model"):
        clear = rows["clear", level]
        assert clear["status"] == "ok" or clear["reason"]


def test_video_model_with_frames(tmp_path):
    out = tmp_path / "wan"
    assert main(["run", "--model", "wan-tiny", "--frames", "5", "--res", "32", "--methods",
                 "softmax", "--out", str(out), *FAST]) == 0
    rows = _rows(out)
    assert {r["level"] for r in rows} == {"attention", "model"}
    for r in rows:
        assert r["status"] == "ok" and r["extra"]["frames"] == 5
        assert len(r["extra"]["layout"].split("x")) == 3  # frames x H x W


def test_video_model_at_its_true_non_square_size(tmp_path):
    """Wan's sizes are height x width (480x832): the grid has both; no --res is the model's
    published size (wan-tiny: 48x80)."""
    out = tmp_path / "wan"
    assert main(["run", "--model", "wan-tiny", "--frames", "5", "--res", "32x48", "--methods",
                 "softmax,sla", "--level", "attention", "--out", str(out), *FAST]) == 0
    rows = {r["method"]: r for r in _rows(out)}
    soft = rows["softmax"]
    assert (soft["resolution"], soft["height"]) == (48, 32)
    assert soft["extra"]["layout"].endswith("2x2x3") and soft["tokens"] == 12
    assert rows["sla"]["status"] == "ok" and rows["sla"]["tokens"] == 12
    default = tmp_path / "default"
    assert main(["run", "--model", "wan-tiny", "--frames", "5", "--methods", "softmax",
                 "--level", "attention", "--out", str(default), *FAST]) == 0
    (row,) = _rows(default)
    assert (row["resolution"], row["height"], row["tokens"]) == (80, 48, 2 * 3 * 5)


@pytest.mark.parametrize("argv, message", [
    (["--model", "flux-tiny", "--frames", "5"], "--frames 5: flux-tiny is an image model"),
    (["--model", "DiT-T/2", "--frames", "5"], "--frames: DiT-T/2 is an image DiT"),
    (["--model", "wan-tiny", "--frames", "4"], "--frames 4"),
    (["--model", "fluxx"], "flux.1-dev"),
    (["--model-path", "/nonexistent/flux"], "--model-path /nonexistent/flux: no such folder"),
    (["--model", "flux-tiny", "--level", "block"], "--level block is DiT-only"),
    (["--model", "flux-tiny", "--model-path", "/tmp"], "give one model"),
])
def test_bad_input_exits_2_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    assert main(["run", *argv, "--res", "32", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (out / "results.jsonl").exists()


def test_unknown_model_lists_both_zoos(capsys):
    assert main(["run", "--model", "fluxx", *FAST]) == 2
    err = capsys.readouterr().err
    assert "DiT-XL/2" in err and "wan2.1-t2v-1.3b" in err and "flux-tiny" in err
