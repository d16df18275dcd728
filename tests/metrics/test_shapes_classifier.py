"""The shipped shapes-world feature extractor: intact, accurate, registered with torch-fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnbench.metrics import shapes_classifier as sc
from attnbench.models.checkpoint import file_sha256


def test_shipped_files_match_their_sums():
    lines = (sc.ASSET_DIR / sc.SHA_FILE).read_text().split("\n")
    sums = dict(reversed(line.split()) for line in lines if line.strip())
    assert sc.WEIGHTS_FILE in sums
    for name, digest in sums.items():
        assert file_sha256(sc.ASSET_DIR / name) == digest, name
    assert (sc.ASSET_DIR / sc.WEIGHTS_FILE).stat().st_size < 2 * 2**20  # small


def test_shipped_classifier_sees_the_world():
    model = sc.load_classifier()
    acc = sc.accuracy(model, n=200, seed=4242)
    assert acc["counts_exact"] >= 0.9  # every (shape, colour) count right in 9 images of 10
    x = torch.from_numpy(np.stack([sc.ShapesWorld(64, seed=1).image(i) for i in range(4)]))
    feats, logits = model(x.permute(0, 3, 1, 2))
    assert feats.shape == (4, 64) and logits.shape == (4, 91)
    assert sc.accuracy(model, n=100, image_size=64, seed=77)["counts_exact"] >= 0.9


def test_torch_fidelity_registration():
    name = sc.register_torch_fidelity()
    assert sc.register_torch_fidelity() == name == "attnbench-shapes"
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    assert FEATURE_EXTRACTORS_REGISTRY[name] is sc.extractor_class()
    fe = create_feature_extractor(name, ["features", "logits"], cuda=False, verbose=False)
    out = fe(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert [t.shape for t in out] == [(2, 64), (2, 91)]


def test_bad_weights_are_refused(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="safetensors"):
        sc.load_classifier(bad)
    with pytest.raises(FileNotFoundError):
        sc.load_classifier(tmp_path / "missing.safetensors")


def test_training_step_runs():
    model, summary = sc.train(steps=2, batch=8, log_every=1, calibration=64, held_out=16)
    assert len(summary["log"]) == 2 and "held_out" in summary
    assert float(model.feature_std.min()) > 0
