"""Sampling: seeded chunks, ADM-format output, torchrun's union = one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnbench.metrics.sample import (
    SampleSettings,
    balanced_labels,
    chunk_ranges,
    chunk_seed,
    generate,
    run_sampling,
)
from tests.helpers import TINY_PIXEL as TINY
from tests.helpers import tiny_pixel_dit as tiny_model

FAST = {"steps": 4, "cfg_scale": 1.5, "batch": 3, "seed": 7}


def test_chunks_and_seeds():
    assert [list(r) for r in chunk_ranges(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    seeds = {chunk_seed(0, c) for c in range(100)} | {chunk_seed(1, c) for c in range(100)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert chunk_seed(3, 5) == chunk_seed(3, 5)
    labels = balanced_labels(12)
    from attnbench.data import PROMPTS, TASKS

    assert [PROMPTS[y].task for y in labels[:6]] == list(TASKS)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="positive"):
        SampleSettings(num=0)
    with pytest.raises(ValueError, match="sampler"):
        SampleSettings(num=1, sampler="euler")
    with pytest.raises(ValueError, match="CFG"):
        SampleSettings(num=1, cfg_scale=0.5)
    with pytest.raises(ValueError, match="label mode"):
        SampleSettings(num=1, labels="some")


def test_ranks_union_equals_one_process():
    model = tiny_model(0)
    settings = SampleSettings(num=8, **FAST)
    whole = generate(model, settings)
    assert whole["images"].shape == (8, 16, 16, 3) and whole["images"].dtype == np.uint8
    assert whole["labels"].shape == (8,) and whole["labels"].max() < 91
    assert len(whole["step_seconds"]) == 4 * 3  # 4 steps × 3 chunks
    for world in (2, 3):
        parts = [generate(model, settings, rank=r, world_size=world) for r in range(world)]
        index = np.concatenate([p["indices"] for p in parts])
        order = np.argsort(index)
        assert np.array_equal(index[order], np.arange(8))
        assert np.array_equal(np.concatenate([p["images"] for p in parts])[order],
                              whole["images"])
        assert np.array_equal(np.concatenate([p["labels"] for p in parts])[order],
                              whole["labels"])
    again = generate(model, settings)
    assert np.array_equal(again["images"], whole["images"])
    other = generate(model, SampleSettings(num=8, **{**FAST, "seed": 8}))
    assert not np.array_equal(other["images"], whole["images"])


def test_ddim_given_labels_and_guidance_options():
    model = tiny_model(0)
    base = {**FAST, "labels": [5, 6, 7]}
    ddim = generate(model, SampleSettings(num=3, sampler="ddim", **base))
    assert ddim["labels"].tolist() == [5, 6, 7]
    ddpm = generate(model, SampleSettings(num=3, **base))
    assert not np.array_equal(ddim["images"], ddpm["images"])
    plain = generate(model, SampleSettings(num=3, **{**base, "cfg_scale": 1.0}))
    assert len(plain["step_seconds"]) == 4  # one model call per step without guidance


def test_latent_models_decode_through_the_vae():
    """A 4-channel model needs a VAE; its decode gets latents / scaling_factor."""
    config = TINY.replace(in_channels=4, name="tiny-latent")
    model = tiny_model(0, config)
    with pytest.raises(ValueError, match="--vae"):
        generate(model, SampleSettings(num=2, **FAST))

    class ToyVAE(torch.nn.Module):  # the two members of diffusers' AutoencoderKL used here
        config = SimpleNamespace(scaling_factor=0.5)

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def decode(self, z):
            self.seen = z
            image = torch.nn.functional.interpolate(z[:, :3], scale_factor=8).tanh()
            return SimpleNamespace(sample=image * self.scale)

    vae = ToyVAE()
    out = generate(model, SampleSettings(num=2, **FAST), vae=vae)
    assert out["images"].shape == (2, 128, 128, 3)
    # DiT's first-three-channels guidance differs from guiding all four channels
    all_channels = generate(model, SampleSettings(num=2, cfg_channels=None, **FAST), vae=vae)
    assert not np.array_equal(all_channels["images"], out["images"])


def test_real_diffusers_vae(tmp_path):
    from attnbench.metrics.sample import decode, import_diffusers, load_vae

    try:
        diffusers = import_diffusers()  # through the torchvision workaround
    except ImportError:
        pytest.skip("diffusers is not installed (optional: latent models only)")

    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    assert decode(loaded, torch.zeros(1, 4, 8, 8)).shape == (1, 3, 8, 8)


def test_run_sampling_writes_pngs_and_adm_npz(teacher_dir, tmp_path):
    from PIL import Image

    settings = SampleSettings(num=5, **FAST)
    summary = run_sampling(teacher_dir, settings, tmp_path / "s", device="cpu", progress=False)
    with np.load(tmp_path / "s" / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert labels.shape == (5,)
    for i in range(5):
        with Image.open(tmp_path / "s" / f"{i:06d}.png") as im:
            assert np.array_equal(np.asarray(im), images[i])
    info = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert info["num"] == 5 and info["world_size"] == 1 and len(info["checkpoint_sha256"]) == 64
    assert summary["settings"]["cfg_channels"] == 3
    # the same command again: nothing to do; other settings: refused (--force starts over)
    assert run_sampling(teacher_dir, settings, tmp_path / "s", device="cpu",
                        progress=False)["num"] == 5
    with pytest.raises(ValueError, match="other settings .*seed"):
        run_sampling(teacher_dir, SampleSettings(num=5, **{**FAST, "seed": 9}), tmp_path / "s",
                     device="cpu", progress=False)


@pytest.mark.slow
def test_torchrun_union_equals_one_process(teacher_dir, tmp_path):
    args = ["sample", "--ckpt", str(teacher_dir), "--num-samples", "7", "--steps", "3",
            "--batch", "2",
            "--seed", "3", "--device", "cpu", "--no-progress"]
    from attnbench.cli import main

    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "attnbench", *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp_path / "one" / "samples.npz") as a, \
            np.load(tmp_path / "two" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
        assert np.array_equal(a["arr_1"], b["arr_1"])
    info = json.loads((tmp_path / "two" / "samples.json").read_text())
    assert info["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "two").glob("*.png")) == [
        f"{i:06d}.png" for i in range(7)]
    assert not (tmp_path / "two" / ".shards").exists()
