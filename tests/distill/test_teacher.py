"""train-teacher, the sample grid, and the shipped teacher."""

from __future__ import annotations

import json

import pytest
import torch

from attnbench.cli import main
from attnbench.distill import TEACHER_CONFIG, default_teacher_path, verify_teacher
from attnbench.distill.pipeline import sample_labels, write_sample_grid
from attnbench.models import load_dit
from tests.helpers import tiny_pixel_dit as tiny_teacher


def test_train_teacher_cli(tmp_path, capsys):
    out = tmp_path / "t"
    args = ["train-teacher", "--out", str(out), "--steps", "3", "--batch-size", "4",
            "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--input-size", "16",
            "--eval-samples", "4", "--no-progress", "--no-grid", "--warmup-steps", "0"]
    assert main(args) == 0
    assert "teacher:" in capsys.readouterr().out
    teacher = load_dit(out / "teacher")
    assert teacher.config.hidden_size == 32 and teacher.config.num_classes == 91
    training = verify_teacher(out / "teacher")  # SHA256SUMS match the files
    assert training["steps"] == 3 and "loss" in training["final_loss_mean_last_100"]
    # a flipped byte is caught
    weights = out / "teacher" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        verify_teacher(out / "teacher")
    assert main(args) == 2  # the run exists: --resume or --force


def test_sample_grid(tmp_path):
    labels = sample_labels(12)
    from attnbench.data import PROMPTS, TASKS

    assert [PROMPTS[i].task for i in labels[:6]] == list(TASKS)
    info = write_sample_grid(tiny_teacher(), tmp_path / "g.png", n=4, nrow=2, steps=3)
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
    assert len(info["prompts"]) == 4


def test_the_shipped_teacher():
    """The shipped teacher verifies, loads, is within the size limit, and is the default."""
    path = default_teacher_path()
    training = verify_teacher(path)
    model = load_dit(path)
    assert model.config.to_dict() == TEACHER_CONFIG.to_dict()
    assert sum(f.stat().st_size for f in path.iterdir()) <= 20 * 2**20
    assert training["steps"] > 0  # its time is a measurement (training.json), not asserted
    x = torch.zeros(1, 3, 32, 32)
    assert model(x, torch.tensor([10]), torch.tensor([0])).shape == (1, 6, 32, 32)
    assert json.loads((path / "config.json").read_text())["config"]["in_channels"] == 3


def test_the_shipped_teacher_has_learned_the_world():
    """Its ε error on held-out world images is far below an untrained model's (~1)."""
    from attnbench.data import ShapesWorld
    from attnbench.diffusion import Diffusion
    from attnbench.distill.trainer import evaluate

    x0, y = ShapesWorld(32, seed=123).get(range(64))
    result = evaluate(load_dit(default_teacher_path()), Diffusion(1000), x0, y)
    assert result["eps_mse"] < 0.05, result


def test_a_missing_teacher_says_what_to_do(monkeypatch, tmp_path):
    from attnbench.models import teacher

    monkeypatch.setattr(teacher, "ASSET_DIR", tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="train-teacher --out DIR"):
        teacher.default_teacher_path()
