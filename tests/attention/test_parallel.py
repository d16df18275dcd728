"""Sequence-parallel attention under gloo: every method × strategy × layout equals ``attend``.

One process group of 2 and one of 4 CPU processes (``torch.multiprocessing`` spawn) run
the whole matrix -- forward within 1e-5 in float32, and backward (every strategy is
differentiable) -- plus the bad inputs, each group spawned once for all its cases: a
case that fails is reported by name, a rank that hangs hits the collectives' timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnbench import attention
from attnbench.attention import Layout
from attnbench.attention.parallel import (
    CollectiveTimeout,
    Comm,
    Sharding,
    attend_parallel,
    comm_model,
    conv_halo,
    partial_attention,
    strategies_for,
)

HEADS, DIM = 4, 8
LAYOUTS = {
    "grid": Layout((8, 6)),
    "text-first": Layout((8, 6), text=5),
    "text-last": Layout((8, 6), text=3, text_first=False),
    "video": Layout((4, 3, 4)),
}
OPTIONS = {
    "softmax": {},
    "lit": {},
    "clear": {"radius": 3.5},  # reach 3 rows: beyond the next rank's 2 rows under 4 ranks
    "sla": {"topk": 0.5, "block_q": 8, "block_kv": 8},
}
VIDEO_OPTIONS = {"clear": {"radius": 2.0, "radius_t": 1}}
TOL = 1e-5


def _cases():
    for method, options in OPTIONS.items():
        for strategy in strategies_for(method):
            for name, layout in LAYOUTS.items():
                opts = VIDEO_OPTIONS.get(method, options) if layout.is_video else options
                yield method, strategy, name, layout, opts


def _max_err(a, b) -> float:
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def _check_case(comm, method, strategy, layout, opts, seed) -> list[str]:
    torch.manual_seed(seed)
    backend = attention.get(method)
    shape = (1, HEADS, layout.tokens, DIM)
    q, k, v, g = (torch.randn(shape) for _ in range(4))
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = backend.attend(*full, layout=layout, impl="reference", **opts)
    (ref * g).sum().backward()
    sh = Sharding(layout, comm.world, comm.rank)
    mine = [sh.shard(t).detach().requires_grad_(True) for t in (q, k, v)]
    out = attend_parallel(method, *mine, layout=layout, strategy=strategy, comm=comm,
                          impl="reference", **opts)
    problems = []
    err = _max_err(out, sh.shard(ref.detach()))
    if err > TOL:
        problems.append(f"forward error {err:.3g}")
    # the local losses sum to the global one: replicated text outputs count 1/P on each rank
    text, image = sh.local.split(out)
    gt, gi = sh.local.split(sh.shard(g))
    ((image * gi).sum() + (text * gt).sum() / comm.world).backward()
    for name, local, whole in zip("qkv", mine, full, strict=True):
        grad = local.grad.clone()
        t_grad, i_grad = sh.local.split(grad)
        summed = t_grad.clone()
        dist.all_reduce(summed)  # replicated text: the ranks' parts of one gradient
        grad = sh.local.join(summed, i_grad)
        err = _max_err(grad, sh.shard(whole.grad))
        if err > 1e-4:
            problems.append(f"d{name} error {err:.3g}")
    return problems


def _expect_error(fn, *words) -> str | None:
    try:
        fn()
    except (ValueError, CollectiveTimeout) as err:
        text = str(err)
        missing = [w for w in words if w not in text]
        return f"message {text!r} lacks {missing}" if missing else None
    return "no error"


def _bad_inputs(comm) -> dict[str, str | None]:
    layout = LAYOUTS["grid"]
    sh = Sharding(layout, comm.world, comm.rank)
    x = torch.randn(1, HEADS, sh.local.tokens, DIM)
    odd = torch.randn(1, 3, sh.local.tokens, DIM)
    uneven = Layout((comm.world * 2 + 1, 4))
    results = {
        "ulysses heads": _expect_error(lambda: attend_parallel(
            "softmax", odd, odd, odd, layout=layout, strategy="ulysses", comm=comm),
            "3 heads", "world size"),
        "rows": _expect_error(lambda: attend_parallel(
            "softmax", x, x, x, layout=uneven, strategy="ring", comm=comm),
            f"{uneven.grid[0]} rows", f"{comm.world} ranks"),
        "strategy": _expect_error(lambda: attend_parallel(
            "softmax", x, x, x, layout=layout, strategy="halo", comm=comm), "halo", "ring"),
        "sla ring": _expect_error(lambda: attend_parallel(
            "sla", x, x, x, layout=layout, strategy="ring", comm=comm), "ulysses"),
        "pooled": _expect_error(lambda: attend_parallel(
            "clear", x, x, x, layout=layout, strategy="halo", comm=comm, down_factor=2),
            "down_factor"),
        "mismatch": _expect_error(lambda: attend_parallel(
            "clear", x, x, x, layout=layout, strategy="halo", comm=comm,
            radius=2.0 + (comm.rank > 0)), "other arguments"),
    }
    return results


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    comm = Comm(timeout_s=60)
    report: dict[str, object] = {}
    try:
        for i, (method, strategy, name, layout, opts) in enumerate(_cases()):
            key = f"{method}/{strategy}/{name}"
            try:
                report[key] = _check_case(comm, method, strategy, layout, opts, seed=i)
            except Exception:
                report[key] = [traceback.format_exc(limit=4)]
        report["bad"] = _bad_inputs(comm)
        report["bytes"] = _bytes_match_model(comm)
        report["conv"] = _conv_halo_matches(comm)
        # a rank that does not come: the other one times out instead of hanging
        short = Comm(timeout_s=2)
        if rank == 0:
            report["timeout"] = _expect_error(lambda: short.all_reduce(torch.ones(3)),
                                              "did not complete")
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


def _bytes_match_model(comm) -> dict[str, list[float]]:
    """Measured forward bytes of this rank and the analytic model (the most of any rank)."""
    out = {}
    for method, strategy, name, layout, opts in _cases():
        if name == "text-last":
            continue
        sh = Sharding(layout, comm.world, comm.rank)
        x = torch.randn(1, HEADS, sh.local.tokens, DIM)
        comm.reset()
        attend_parallel(method, x, x, x, layout=layout, strategy=strategy, comm=comm,
                        check=False, impl="reference", **opts)
        measured = torch.tensor([comm.data_bytes])
        dist.all_reduce(measured, op=dist.ReduceOp.MAX)
        model = comm_model(method, strategy, layout, comm.world, 1, HEADS, DIM, 4, **opts)
        out[f"{method}/{strategy}/{name}"] = [float(measured), model]
    return out


def _conv_halo_matches(comm) -> list[str]:
    """LiT's conv on a sharded v with halo rows (frames) = the conv on the whole grid."""
    problems = []
    for dwc_3d, layout in ((False, Layout((8, 6))), (True, Layout((4, 3, 4))),
                           (False, Layout((4, 3, 4)))):
        torch.manual_seed(0)
        core = attention.get("lit").core(HEADS, DIM, dwc_kernel=5 if layout.is_video else 3,
                                         dwc_3d=dwc_3d)
        v = torch.randn(1, HEADS, layout.tokens, DIM)
        whole = core.local(v, layout)
        sh = Sharding(layout, comm.world, comm.rank)
        depth = core.dwc.kernel_size[0] // 2 if (dwc_3d or not layout.is_video) else 0
        mine = conv_halo(core.local, sh.shard(v), layout, comm, depth=depth)
        err = _max_err(mine, sh.shard(whole))
        if err > TOL:
            problems.append(f"{layout.describe()} dwc_3d={dwc_3d}: error {err:.3g}")
    return problems


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def reports(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"cp{world}")
    mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_every_method_strategy_and_layout_matches_attend(reports):
    failures = {f"rank{r}:{key}": problems for r, report in enumerate(reports)
                for key, problems in report.items()
                if "/" in key and problems}
    assert not failures, failures
    assert sum("/" in key for key in reports[0]) == len(list(_cases()))


def test_bad_inputs_fail_on_every_rank_with_the_cause(reports):
    for rank, report in enumerate(reports):
        assert {k: v for k, v in report["bad"].items() if v} == {}, f"rank {rank}"
    assert reports[0]["timeout"] is None


def test_measured_bytes_match_the_model(reports):
    for key, (measured, model) in reports[0]["bytes"].items():
        assert measured == pytest.approx(model, rel=0.05), key


def test_lit_conv_halo_matches_the_whole_grid(reports):
    for rank, report in enumerate(reports):
        assert report["conv"] == [], f"rank {rank}"


def test_partial_softmax_merges_to_the_whole_in_float64(monkeypatch):
    """Chunked partials over two halves of the keys, merged, equal softmax over all keys,
    forward and backward, a fully masked row included in one half."""
    from attnbench.attention.parallel import partial as partial_module
    from attnbench.attention.softmax.reference import softmax_reference

    monkeypatch.setattr(partial_module, "REFERENCE_CHUNK_ELEMENTS", 2 * 3 * 4 * 10)
    q, k, v = (torch.randn(2, 3, n, 5, dtype=torch.float64, requires_grad=True)
               for n in (9, 10, 10))
    mask = torch.ones(9, 10, dtype=torch.bool)
    mask[0, :5] = False  # query 0 sees nothing in the first half
    merged = partial_module.merge(
        partial_attention(q, k[:, :, :5], v[:, :, :5], lambda r0, r1: mask[r0:r1, :5]),
        partial_attention(q, k[:, :, 5:], v[:, :, 5:], lambda r0, r1: mask[r0:r1, 5:]),
    ).result(q.dtype)
    whole = softmax_reference(q, k, v, key_mask=mask)
    torch.testing.assert_close(merged, whole)
    g = torch.randn_like(whole)
    grads = torch.autograd.grad((merged * g).sum(), (q, k, v))
    expected = torch.autograd.grad((whole * g).sum(), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
