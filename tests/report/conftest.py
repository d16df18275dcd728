"""Runs for the report tests: one real (the harness, tiny), the rest built row by row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from attnbench.cli import main
from attnbench.results import Result, ResultsWriter, canonical_options

#: (method, options, latency at 256 px in s, exponent of its growth with tokens)
METHODS = [("softmax", {}, 4e-3, 2.0), ("lit", {}, 1e-3, 1.0), ("clear", {}, 3e-3, 1.1),
           ("clear", {"radius": 16.0}, 3.5e-3, 1.2), ("sla", {}, 2e-3, 1.4)]
META = {"device": "cpu", "device_name": "Test CPU (2 threads)", "dtype": "torch.float32",
        "model": "DiT-Ti/2", "torch": "2.13.0", "python": "3.11", "git_revision": "abc123",
        "date": "2026-01-01T00:00:00+00:00", "command": "python -m attnbench run (synthetic)",
        "timer": "synthetic", "flop_convention": "forward, 2 FLOPs per multiply-add",
        "model_config": {"depth": 12, "hidden_size": 192, "num_heads": 3, "patch_size": 2,
                         "in_channels": 4}, "budget_s": 30.0}


def point(method: str, options: dict, level: str, res: int, **kw) -> Result:
    tokens = (res // 16) ** 2
    base = dict(method=method, options=canonical_options(options), level=level, resolution=res,
                tokens=tokens, batch=1, dtype="float32", device="cpu", model="DiT-Ti/2",
                heads=3, head_dim=64, impl="reference", timer="perf_counter",
                memory_meter="proc_vmhwm", repetitions=10)
    return Result(**{**base, **kw})


def speed_rows(scale: float = 1.0, memory_scale: float = 1.0,
               resolutions=(256, 512, 2048), levels=("attention", "model")) -> list[Result]:
    """Plausible rows: every method at every level/resolution, plus a skipped and an oom."""
    rows = []
    for level in levels:
        for res in resolutions:
            n = (res // 16) ** 2
            for method, options, t256, growth in METHODS:
                if method == "sla" and res == 2048 and level == "model":
                    rows.append(point(method, options, level, res, status="oom",
                                      reason="OutOfMemoryError: CUDA out of memory (synthetic)"))
                    continue
                if method == "softmax" and res == 2048 and level == "model":
                    rows.append(point(method, options, level, res, status="skipped",
                                      reason="predicted 340 s > budget 30 s",
                                      predicted_s=170.0))
                    continue
                latency = t256 * (n / 256) ** growth * scale * (3 if level == "model" else 1)
                dense = 4 * 3 * n * n * 64.0
                actual = dense if method == "softmax" else dense / (n / 256) ** (2 - growth) / 2
                rows.append(point(
                    method, options, level, res, latency_median_s=latency,
                    latency_p20_s=latency * 0.97, latency_p80_s=latency * 1.04,
                    peak_memory_bytes=2**20 * (n / 64) * memory_scale * (2 if method == "sla"
                                                                         else 1),
                    flops_actual=actual, flops_dense=dense, tflops_achieved=actual / latency / 1e12,
                    overhead_s=1e-3 if method == "clear" else None,
                    overheads=json.dumps({"block_mask": 1e-3} if method == "clear" else {}),
                ))
    return rows


def quality_rows() -> list[Result]:
    """Quality points as the quality stage will write them (see attnbench.report.tables)."""
    q = []
    for (method, options, _, _), fid, psnr in zip(METHODS, (10.0, 14.0, 12.0, 11.0, 12.5),
                                                   (99.0, 24.0, 27.0, 29.0, 26.0), strict=True):
        extra = {"metrics": {"fid": fid, "psnr": psnr}}
        if method == "lit":
            extra["samples"] = "samples/lit.npz"
        q.append(point(method, options, "quality", 256, extra=extra))
    q.append(point("sla", {"topk": 0.2}, "quality", 256, status="error", reason="boom",
                   extra={"metrics": {"fid": 1.0}}))  # failed: must not be shown
    return q


def write_run(directory: Path, rows: list[Result], meta: dict | None = None) -> Path:
    writer = ResultsWriter(directory, dict(meta or META))
    for row in rows:
        writer.append(row)
    writer.finalize()
    return directory


def add_samples(directory: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = directory / "samples" / "softmax"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    np.savez(directory / "samples" / "lit.npz",
             arr_0=rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def real_run(tmp_path_factory) -> Path:
    """The harness itself on DiT-T/2 at 64 px (a few seconds); ``run`` writes the report."""
    out = tmp_path_factory.mktemp("real") / "run"
    code = main(["run", "--res", "64", "--model", "DiT-T/2", "--methods", "softmax,lit",
                 "--level", "attention", "--out", str(out), "--no-progress", "--budget", "10"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def full_run(tmp_path_factory) -> Path:
    """Speed rows, quality rows and sample folders: every section and every plot."""
    out = tmp_path_factory.mktemp("full") / "run"
    write_run(out, speed_rows() + quality_rows())
    add_samples(out)
    return out


@pytest.fixture(scope="session")
def full_report(full_run, tmp_path_factory):
    """The report of ``full_run`` (written once, read by several tests)."""
    from attnbench.report import write_report

    return write_report([full_run], tmp_path_factory.mktemp("full-report"))
