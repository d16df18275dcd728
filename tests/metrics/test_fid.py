"""FID and friends: closed forms, self-distance, engine agreement, references, provenance."""

from __future__ import annotations

import numpy as np
import pytest

from attnbench.metrics import engines
from attnbench.metrics.fid import (
    FeatureStats,
    Reference,
    frechet_distance,
    load_reference,
    quality_metrics,
)


def _closed_form(m1, v1, m2, v2):
    """FID of N(m1, diag v1) and N(m2, diag v2): commuting covariances."""
    return float(((m1 - m2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum())


def _random_cov(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_gaussian_statistics_match_the_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    want = _closed_form(m1, v1, m2, v2)
    s1, s2 = FeatureStats(m1, np.diag(v1)), FeatureStats(m2, np.diag(v2))
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(want, rel=1e-12)
    for engine in engines.ENGINES:
        assert engines.fid(s1, s2, engine) == pytest.approx(want, rel=1e-9), engine


def test_gaussian_features_converge_to_the_closed_form():
    rng = np.random.default_rng(1)
    d, n = 8, 200_000
    m1, m2 = np.zeros(d), np.full(d, 0.5)
    v1, v2 = np.full(d, 1.0), np.full(d, 2.0)
    f1 = m1 + rng.standard_normal((n, d)) * np.sqrt(v1)
    f2 = m2 + rng.standard_normal((n, d)) * np.sqrt(v2)
    s1, s2 = FeatureStats.from_features(f1), FeatureStats.from_features(f2)
    assert s1.mu.dtype == s1.sigma.dtype == np.float64
    want = _closed_form(m1, v1, m2, v2)
    for engine in engines.ENGINES:
        assert engines.fid(s1, s2, engine) == pytest.approx(want, rel=0.01), engine


def test_engines_agree_on_the_same_features():
    rng = np.random.default_rng(2)
    d = 32
    f1 = rng.multivariate_normal(np.zeros(d), _random_cov(rng, d), size=400)
    f2 = rng.multivariate_normal(np.full(d, 0.3), _random_cov(rng, d), size=300)
    s1, s2 = FeatureStats.from_features(f1), FeatureStats.from_features(f2)
    ours = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    tf, cf = engines.fid(s1, s2, "torch-fidelity"), engines.fid(s1, s2, "clean-fid")
    assert tf == pytest.approx(ours, rel=1e-8) and cf == pytest.approx(ours, rel=1e-8)
    # KID: with one subset holding every sample, both compute the same unbiased MMD²
    k_tf, _ = engines.kid(f1[:300], f2, "torch-fidelity", subsets=1, subset_size=300)
    k_cf, _ = engines.kid(f1[:300], f2, "clean-fid", subsets=1, subset_size=300)
    assert k_tf == pytest.approx(k_cf, rel=1e-9)
    # and on random subsets they agree within the estimator's spread
    k_tf, std = engines.kid(f1, f2, "torch-fidelity", subsets=50, subset_size=200)
    k_cf, _ = engines.kid(f1, f2, "clean-fid", subsets=50, subset_size=200)
    assert abs(k_tf - k_cf) < 3 * std + 1e-9


def test_fid_of_a_set_against_itself_is_zero(world_images):
    images = world_images[1]
    for engine in engines.ENGINES:
        out = quality_metrics(images, Reference("itself", images), metrics=("fid",),
                              engine=engine)
        assert abs(out["metrics"]["fid"]) < 1e-6, engine


def test_shapes_fid_end_to_end_both_engines(world_images):
    real, other = world_images[1], world_images[2]
    swapped = other[..., ::-1].copy()  # red ↔ blue: the wrong colours everywhere
    out = {}
    for engine in engines.ENGINES:
        out[engine] = quality_metrics(other, Reference("world", real), engine=engine,
                                      kid_subsets=10, kid_subset_size=100)
        bad = quality_metrics(swapped, Reference("world", real), metrics=("fid",),
                              engine=engine)
        assert bad["metrics"]["fid"] > 5 * out[engine]["metrics"]["fid"], engine
    tf, cf = out["torch-fidelity"], out["clean-fid"]
    # at 32 px clean-fid's resize is the identity: the same features, the same FID
    assert tf["metrics"]["fid"] == pytest.approx(cf["metrics"]["fid"], rel=1e-6)
    assert set(tf["metrics"]) >= {"fid", "kid", "inception_score", "precision", "recall"}
    assert set(cf["fid"]["skipped"]) == {"is", "prc"}
    assert 0 <= tf["metrics"]["precision"] <= 1 and 0 <= tf["metrics"]["recall"] <= 1
    for record in (tf["fid"], cf["fid"]):
        for key in ("engine", "engine_version", "feature_extractor", "extractor_sha256",
                    "resize", "num_samples", "num_reference"):
            assert record[key] not in (None, ""), key
        assert len(record["extractor_sha256"]) == 64
        assert record["num_samples"] == record["num_reference"] == 200


def test_64px_images_are_resized_by_each_engine():
    images = load_reference("shapes:24", image_size=64, seed=3).images
    ref = Reference("itself", images)
    for engine in engines.ENGINES:
        out = quality_metrics(images, ref, metrics=("fid",), engine=engine)
        assert abs(out["metrics"]["fid"]) < 1e-4  # 24 samples in 64 dims: singular Σ
    assert "area" in quality_metrics(images, ref, metrics=("fid",))["fid"]["resize"]


def test_statistics_roundtrip_in_adm_layout(tmp_path, world_images):
    feats = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    stats = FeatureStats.from_features(feats, extractor="x")
    path = stats.save(tmp_path / "ref.npz")
    with np.load(path) as data:
        assert {"mu", "sigma"} <= set(data.files)
    back = FeatureStats.load(path)
    assert np.array_equal(back.mu, stats.mu) and back.count == 50
    assert back.mu.dtype == np.float64


def test_reference_from_stats_only_npz(tmp_path, world_images):
    """An ADM-style reference holding only mu/sigma: FID works, KID/PR are skipped with why."""
    from attnbench.metrics.engines import extract, get_extractor

    real = world_images[1]
    feats = extract(real, get_extractor("shapes", "torch-fidelity"), "torch-fidelity").features
    FeatureStats.from_features(feats).save(tmp_path / "stats.npz")
    ref = load_reference(tmp_path / "stats.npz")
    assert ref.images is None and ref.stats is not None
    out = quality_metrics(real, ref)
    assert abs(out["metrics"]["fid"]) < 1e-6
    assert set(out["fid"]["skipped"]) == {"kid", "prc"}
    assert out["fid"]["reference_statistics"] == "given (mu/sigma)"


def test_reference_sources(tmp_path, world_images):
    from attnbench.data import save_png

    ref = load_reference("shapes:12", image_size=16, seed=5)
    assert ref.images.shape == (12, 16, 16, 3) and ref.images.dtype == np.uint8
    np.savez(tmp_path / "batch.npz", world_images[1][:7])
    assert load_reference(tmp_path / "batch.npz").images.shape == (7, 32, 32, 3)
    for i in range(5):
        save_png(tmp_path / "folder" / f"{i}.png", world_images[2][i])
    folder = load_reference(tmp_path / "folder")
    assert np.array_equal(folder.images, world_images[2][:5])
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="shapes:N"):
        load_reference("shapes:many", image_size=32)


def test_inception_is_never_downloaded(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        engines.inception_weights("torch-fidelity")
    message = str(err.value)
    assert engines.TORCH_FIDELITY_INCEPTION in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "--inception-weights" in message
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        engines.inception_weights("clean-fid")
    # a file that is not a plain state dict is refused before torch-fidelity unpickles it
    bad = tmp_path / engines.TORCH_FIDELITY_INCEPTION
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="refused"):
        engines.inception_weights("torch-fidelity", bad)
    with pytest.raises(ValueError, match="mu.*sigma|dimensions|features"):
        quality_metrics(np.zeros((4, 32, 32, 3), np.uint8),
                        Reference("adm", stats=FeatureStats(np.zeros(2048), np.eye(2048))),
                        metrics=("fid",))
