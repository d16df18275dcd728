"""The kernels against their floors on this GPU; the speed targets against a sweep.

``python -m attnbench.bench.floor measure --out DIR`` (CUDA only):

1. the device's own ceilings, measured: HBM bandwidth (a device-to-device copy
   of a 2 GiB buffer: 2 bytes moved per byte copied) and dense bf16 tensor-core
   throughput (``torch.mm`` of 8192³);
2. at one resolution of one DiT (default 8192 px, DiT-XL/2: 262,144 tokens, 16
   heads of 72, bf16), each kernel timed alone with attnbench's protocol
   (:func:`attnbench.bench.timer.measure`: warm-up, L2 flushed, median) and
   set against its floor:

   * LiT (``lit_triton``): memory-bound, floor = bytes of q, k, v, out over the
     measured bandwidth (4·B·H·N·d·2 bytes); also its two launches apart, and the
     backward (floor: q, k, v, O, dO read, dq, dk, dv written = 9·B·H·N·d·2);
   * softmax (SDPA flash, SDPA cuDNN when torch has it): compute-bound, floor =
     4·B·H·N²·d FLOPs over the measured tensor-core throughput;
   * SLA (``sla_triton``, topk 0.05 = 95% sparsity): floor = its FLOPs
     (sparse 4·B·H·(nq·bq)(kk·bkv)·d + the critical blocks' share of the linear
     branch, as computed) over the tensor-core throughput; the block map (pooled
     scores + top-k) timed apart; both ``correction`` variants of the kernel;
   * CLEAR flex r=8: floor = 4·B·H·(computed 128² tiles)·128²·d FLOPs (the work
     FlexAttention cannot skip) over the tensor-core throughput, tile vs row order.

   Writes ``floor.json`` and ``floor.md`` into DIR after every kernel. The LiT
   forward's fraction is judged against the bandwidth target of
   ``baselines/targets.csv``.

``python -m attnbench.bench.floor targets RUN_DIR`` reads a sweep's
``results.csv`` and states each speed-up target of ``baselines/targets.csv`` at
that level as met / MISSED / not measured, over the fastest exact kernel the
sweep ran at the same point (softmax, flash or xformers), into
``RUN_DIR/targets.md``.

``python -m attnbench.bench.floor profile --method SPEC --level L --out DIR``
runs one point under ``torch.profiler`` (CPU or CUDA): ``profile.md`` lists the
operators by their own time, ``trace.json.gz`` the timeline. ``scripts/gpu_run.py``
profiles the target it missed by most.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from .. import attention
from ..attention import _triton, clear, sla
from ..attention import lit as _lit
from ..attention.specs import parse_methods
from ..common.environment import environment
from ..models.configs import get_config
from ..results import label as result_label
from .targets import EXACT_METHODS, Target, fastest_exact, load_targets
from .timer import measure, synchronize
from .workloads import Point, build_workload

GIB = 1 << 30

#: the label of the LiT forward kernel in floor.json (the bandwidth target names it)
LIT_FLOOR_KERNEL = "lit_triton forward"


def bandwidth_target(targets: tuple[Target, ...] | None = None) -> float | None:
    """The LiT kernel's target fraction of the measured HBM copy bandwidth, if one is set."""
    rows = [t for t in (load_targets() if targets is None else targets)
            if t.kind == "bandwidth" and t.spec == LIT_FLOOR_KERNEL]
    return rows[0].minimum if rows else None


def _time(fn, device, budget_s: float = 2.0) -> dict[str, Any]:
    try:
        t = measure(fn, device, budget_s=budget_s, warmup_s=0.2, min_reps=3, max_reps=200)
        return {"median_s": t.median, "p20_s": t.p20, "p80_s": t.p80, "reps": t.reps}
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(err).splitlines()[0]}"}
    except Exception as err:  # one failing kernel must not lose the others
        return {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}


def device_ceilings(device: torch.device) -> dict[str, float]:
    """Measured HBM copy bandwidth (bytes/s) and dense bf16 matmul throughput (FLOP/s)."""

    def copy_time() -> dict:
        src = torch.empty(2 * GIB, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return _time(lambda: dst.copy_(src), device, budget_s=1.0)

    def matmul_time(n: int) -> dict:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        return _time(lambda: torch.mm(a, b), device, budget_s=1.0)

    n = 8192
    copy, mm = copy_time(), matmul_time(n)
    torch.cuda.empty_cache()
    return {
        "hbm_bytes_per_s": 2 * 2 * GIB / copy["median_s"],
        "bf16_flops_per_s": 2.0 * n**3 / mm["median_s"],
        "copy_bytes": 2 * 2 * GIB,
        "matmul": f"{n}x{n}x{n} bf16",
    }


def _entry(name, timing, *, floor_s=None, bytes_=None, flops=None, note=""):
    out = {"kernel": name, **timing, "note": note}
    if bytes_ is not None:
        out["bytes"] = bytes_
    if flops is not None:
        out["flops"] = flops
    if floor_s is not None:
        out["floor_s"] = floor_s
        if "median_s" in timing:
            out["fraction_of_floor"] = floor_s / timing["median_s"]
    return out


def measure_kernels(model: str, resolution: int, dtype: torch.dtype, batch: int = 1,
                    out: Path | None = None) -> dict:
    """Every kernel at one DiT point against its floor (module docstring).

    With ``out``, ``floor.json`` and ``floor.md`` are rewritten after every kernel, so a
    run stopped part-way keeps the kernels it measured."""

    device = torch.device("cuda")
    point = Point(get_config(model), resolution, batch)
    b, h, n, d, grid = batch, point.heads, point.tokens, point.head_dim, point.grid
    esize = torch.empty((), dtype=dtype).element_size()
    ceilings = device_ceilings(device)
    bw, tc = ceilings["hbm_bytes_per_s"], ceilings["bf16_flops_per_s"]
    results: list[dict] = []
    data = {
        "environment": environment(device, sys.argv),
        "point": {"model": model, "resolution": resolution, "batch": b, "heads": h,
                  "tokens": n, "head_dim": d, "dtype": str(dtype)},
        "ceilings": ceilings,
        "kernels": results,
        "lit_bandwidth_target": bandwidth_target(),
    }

    def add(entry: dict) -> None:
        results.append(entry)
        if out is not None:
            write_floor(data, out)

    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device, dtype) for _ in range(3))
    io = 4.0 * b * h * n * d * esize

    # ---- LiT
    reason = _triton.kernel_reason(_lit.TRITON_MODULE, device, dtype, q.shape)
    if reason is None:
        lit = _triton.load(_lit.TRITON_MODULE)
        add(_entry(
            LIT_FLOOR_KERNEL,
            _time(lambda: lit.linear_attention(q, k, v, eps=1e-6, phi_shift=1e-6), device),
            floor_s=io / bw, bytes_=io, note="memory-bound: q, k, v read once, out written once",
        ))
        state = _time(lambda: lit.linear_state(k, v), device)
        add(_entry("  state kernel (k, v → S, z)", state, floor_s=io / 2 / bw,
                              bytes_=io / 2))
        s, z, bd = lit.linear_state(k, v)
        add(_entry("  readout kernel (q, S → out)",
                              _time(lambda: lit._readout(q, s, z, bd, 1e-6, False), device),
                              floor_s=io / 2 / bw, bytes_=io / 2))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = lit.linear_attention(*leaves, eps=1e-6, phi_shift=1e-6)
        grad = torch.randn_like(out)
        bwd_bytes = 9.0 * b * h * n * d * esize
        add(_entry(
            "lit_triton backward",
            _time(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True), device),
            floor_s=bwd_bytes / bw, bytes_=bwd_bytes,
            note="q, k, v, O, dO read; dq, dk, dv written",
        ))
        del leaves, out, grad
        ref = attention.get("lit")
        add(_entry("lit reference (torch matmuls)",
                              _time(lambda: ref.reference(q, k, v, grid=grid, eps=1e-6), device),
                              floor_s=io / bw, bytes_=io))
    else:
        add({"kernel": "lit_triton", "error": reason})

    # ---- softmax

    dense = 4.0 * b * h * n * n * d
    for label, backend in (("SDPA flash", SDPBackend.FLASH_ATTENTION),
                           ("SDPA cuDNN", getattr(SDPBackend, "CUDNN_ATTENTION", None))):
        if backend is None:
            continue

        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        add(_entry(label, _time(sdpa, device, budget_s=3.0), floor_s=dense / tc,
                              flops=dense, note="compute-bound: 4·B·H·N²·d"))

    # ---- SLA at 95% sparsity
    reason = _triton.kernel_reason(sla.TRITON_MODULE, device, dtype, q.shape)
    opts = {"block_q": 64, "block_kv": 64, "feature_map": "softmax", "linear_over": "marginal",
            "eps": 1e-5}
    add(_entry("SLA block map (pooled scores + top-k)",
                          _time(lambda: sla.block_indices(q, k, 64, 64, 0.05), device)))
    if reason is None:
        kern = _triton.load(sla.TRITON_MODULE)
        indices = sla.block_indices(q, k, 64, 64, 0.05)
        nq, kk = indices.shape[-2], indices.shape[-1]
        da, db = kern.head_pieces(d)
        dp = da + db
        pairs = b * h * (nq * 64) * (kk * 64)  # (query, key) pairs of the critical blocks
        nk = -(-n // 64)
        for correction in kern.CORRECTIONS:
            # the critical blocks' share of the linear branch: φ(q)φ(K)ᵀ and ·V per pair
            # ("output"), φ(K)ᵀV per key and query block ("state"), or the selection map
            # times the per-block states ("gemm", on cuBLAS)
            extra = {
                "output": 4.0 * pairs * dp,
                "state": 2.0 * dp * dp * pairs / 64,
                "gemm": 2.0 * b * h * nq * nk * (d * d + d),
            }[correction]
            flops = 4.0 * pairs * dp + extra
            add(_entry(
                f"sla_triton (topk 0.05, correction={correction})",
                _time(lambda c=correction: kern.sla_triton_parts(q, k, v, indices, correction=c,
                                                                 **opts), device),
                floor_s=flops / tc, flops=flops,
                note=f"head dim computed as {da}+{db}; dense-equivalent speed-up floor "
                     f"{dense / flops:.1f}×",
            ))
        del indices
    else:
        add({"kernel": "sla_triton", "error": reason})

    # ---- CLEAR flex r=8, tile vs row order
    backend = attention.get("clear")
    reason = backend.path_reasons(device, dtype, q.shape)["flex"]
    if reason is None:
        layout = clear.Layout.build(grid, 8.0)
        for tiled in (True, False):
            density = clear.block_density(grid, 8.0, tiled=tiled)
            flops = dense * density
            saved = clear.FLEX_TILE_ORDER
            clear.FLEX_TILE_ORDER = tiled
            try:
                clear.clear_mask_caches()
                started = time.perf_counter()
                clear._cached_block_mask(layout, device, clear.flex_tile_order(layout))
                torch.cuda.synchronize()
                build_s = time.perf_counter() - started
                timing = _time(lambda: backend.attend(q, k, v, grid=grid, impl="flex", radius=8.0),
                               device)
            finally:
                clear.FLEX_TILE_ORDER = saved
            add(_entry(
                f"CLEAR flex r=8 ({'tile' if tiled else 'row'} order)", timing,
                floor_s=flops / tc, flops=flops,
                note=f"{density:.2%} of 128² tiles computed; mask build {build_s:.3f} s",
            ))
        clear.clear_mask_caches()
    else:
        add({"kernel": "clear flex", "error": reason})

    return data


def write_floor(data: dict, out: Path) -> None:
    """``floor.json`` and ``floor.md`` into ``out`` (each written beside, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("floor.json", json.dumps(data, indent=2, default=str)),
                       ("floor.md", floor_markdown(data))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def floor_markdown(data: dict) -> str:
    c, p = data["ceilings"], data["point"]
    lines = [
        f"# Kernels against their floors -- {data['environment'].get('device_name', '?')}",
        "",
        f"{p['model']} at {p['resolution']} px: {p['tokens']:,} tokens, {p['heads']} heads "
        f"of {p['head_dim']}, batch {p['batch']}, {p['dtype']}.",
        f"Measured: HBM copy bandwidth {c['hbm_bytes_per_s'] / 1e12:.2f} TB/s; dense bf16 "
        f"matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s ({c['matmul']}).",
        "",
        "| kernel | median ms | floor ms | fraction of floor | note |",
        "|---|---:|---:|---:|---|",
    ]
    for r in data["kernels"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | – | – | – | {r['error']} |")
            continue
        floor = r.get("floor_s")
        frac = r.get("fraction_of_floor")
        lines.append(
            f"| {r['kernel']} | {r['median_s'] * 1e3:.3f} | "
            f"{'–' if floor is None else f'{floor * 1e3:.3f}'} | "
            f"{'–' if frac is None else f'{frac:.0%}'} | {r.get('note', '')} |"
        )
    lit = next((r for r in data["kernels"] if r["kernel"] == LIT_FLOOR_KERNEL), None)
    if lit and "fraction_of_floor" in lit and data.get("lit_bandwidth_target") is not None:
        ok = lit["fraction_of_floor"] >= data["lit_bandwidth_target"]
        lines += ["", f"LiT forward at {lit['fraction_of_floor']:.0%} of the measured HBM "
                  f"bandwidth: target ≥ {data['lit_bandwidth_target']:.0%} "
                  f"{'met' if ok else 'MISSED'}."]
    return "\n".join(lines) + "\n"


def targets_markdown(run_dir: Path, resolution: int = 8192) -> str:
    """The speed-up targets (``targets.csv``) against a sweep's results: met / MISSED / not
    measured, each over the fastest exact kernel in the sweep at the same point."""

    frame = pd.read_csv(run_dir / "results.csv")
    square = frame["height"].fillna(0) == 0 if "height" in frame else True
    frame = frame[(frame["resolution"] == resolution) & square & (frame["status"] == "ok")]
    frame = frame.assign(label=[result_label(m, o if isinstance(o, str) else "")
                                for m, o in zip(frame["method"], frame["options"], strict=True)])
    lines = [f"# Targets at {resolution} px ({run_dir.name})", "",
             "| level | method | latency ms | baseline | speed-up | target | verdict |",
             "|---|---|---:|---|---:|---:|---|"]
    for target in load_targets():
        if target.kind != "speedup" or target.level not in set(frame["level"]):
            continue
        at_level = frame[frame["level"] == target.level]
        exact = at_level[at_level["method"].isin(EXACT_METHODS)]
        wanted = parse_methods(target.spec)[0].label
        mine = at_level[at_level["label"] == wanted]
        required = f"≥ {target.minimum:g}×"
        base = fastest_exact(list(zip(exact["latency_median_s"], exact["label"], strict=True)))
        if mine.empty or base is None:
            missing = wanted if mine.empty else "/".join(EXACT_METHODS)
            lines.append(f"| {target.level} | {wanted} | – | – | – | {required} | "
                         f"not measured ({missing} has no ok row) |")
            continue
        latency = mine["latency_median_s"].min()
        speedup = base[0] / latency
        verdict = "met" if speedup >= target.minimum else "MISSED"
        lines.append(f"| {target.level} | {wanted} | {latency * 1e3:.3f} | {base[1]} "
                     f"{base[0] * 1e3:.1f} ms | {speedup:.1f}× | {required} | "
                     f"{verdict} |")
    return "\n".join(lines) + "\n"


def profile_point(model: str, resolution: int, level: str, method: str, dtype: torch.dtype,
                  device: torch.device, out: Path, calls: int = 3) -> str:
    """Where one point's time goes: ``calls`` calls under ``torch.profiler`` after one
    untimed call (compilation, caches), as ``profile.md`` (the operators by their own
    device time, CPU time where there is no GPU) and a gzipped Chrome trace in ``out``."""

    spec = parse_methods(method)[0]
    work = build_workload(level, spec.name, spec.options, Point(get_config(model), resolution, 1),
                          dtype, device)
    if work.prepare is not None:
        work.prepare()
    work.fn()
    synchronize(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            work.fn()
        synchronize(device)
    averages = prof.key_averages()
    table = None
    for key in (("self_device_time_total", "self_cuda_time_total") if cuda
                else ("self_cpu_time_total",)):
        try:
            table = averages.table(sort_by=key, row_limit=25)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    with trace.open("rb") as src, gzip.open(out / "trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    text = "\n".join([
        f"# Profile: {spec.label} at {level} level, {model} {resolution} px, "
        f"{str(dtype).removeprefix('torch.')} on {device.type}",
        "",
        f"Path: {work.impl}. {calls} calls after one untimed call; operators by their own "
        f"{'device' if cuda else 'CPU'} time (torch.profiler; trace.json.gz beside this file "
        "opens in chrome://tracing or Perfetto).",
        "", "```", table or "(no profiler table)", "```", ""])
    (out / "profile.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnbench.bench.floor",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="the kernels against their floors (CUDA)")
    m.add_argument("--model", default="DiT-XL/2")
    m.add_argument("--res", type=int, default=8192, help="image resolution in px")
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--out", required=True, help="directory for floor.json and floor.md")
    t = sub.add_parser("targets", help="the speed-up targets against a sweep's results")
    t.add_argument("run_dir")
    t.add_argument("--res", type=int, default=8192)
    p = sub.add_parser("profile", help="torch.profiler over one point (where its time goes)")
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--res", type=int, default=8192, help="image resolution in px")
    p.add_argument("--level", default="attention", choices=("attention", "model"))
    p.add_argument("--method", required=True, help="a method variant, e.g. clear:radius=8")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--out", required=True, help="directory for profile.md and trace.json.gz")
    args = parser.parse_args(argv)
    if args.command == "targets":
        run_dir = Path(args.run_dir)
        text = targets_markdown(run_dir, args.res)
        (run_dir / "targets.md").write_text(text)
        print(text)
        return 0
    if args.command == "profile":
        if args.calls < 1:
            parser.error(f"--calls {args.calls}: must be at least 1")
        text = profile_point(args.model, args.res, args.level, args.method,
                             getattr(torch, args.dtype), torch.device(args.device),
                             Path(args.out), args.calls)
        print(text)
        return 0
    if not torch.cuda.is_available():
        print("floor: needs a CUDA GPU (nothing to measure on CPU)", file=sys.stderr)
        return 2
    data = measure_kernels(args.model, args.res, getattr(torch, args.dtype), args.batch,
                           out=Path(args.out))
    write_floor(data, Path(args.out))
    print(floor_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["bandwidth_target", "device_ceilings", "floor_markdown", "main", "measure_kernels",
           "profile_point", "targets_markdown", "write_floor"]
