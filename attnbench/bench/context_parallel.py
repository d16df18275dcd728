"""``torchrun ... -m attnbench run --context-parallel STRATEGY``: each point on every rank.

Every rank runs the same points in the same order (the collectives pair up); each
holds its slice of the sequence (``attention.parallel.Sharding``: rows of the image,
frames of a video, every text token) with random q, k, v and calls ``attend_parallel``.
Per point, on the attention level:

* latency -- each repetition starts after a barrier and is timed on every rank; the
  row keeps, per repetition, the slowest rank's time (median, p20, p80 over them);
* bytes sent per rank -- counted from the collectives' tensors (``Comm``), the most of
  any rank, beside the analytic model (``attention.parallel.comm_model``);
* peak memory per rank -- the most of any rank;
* scaling efficiency -- ``t₁ / (P·t_P)``, ``t₁`` the one-process ``attend`` on the
  whole sequence, timed by rank 0 while the others wait.

A method that cannot take the strategy, or a point whose heads (ulysses) or rows do not
divide over the ranks, is an ``unavailable`` row with the reason: every rank decides
that from the same arguments, before any collective. Only rank 0 writes rows.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import attention
from ..attention.parallel import (
    Comm,
    Sharding,
    attend_parallel,
    check_strategy,
    comm_model,
    compute_path,
)
from ..results import STATUS_ERROR, STATUS_OK, STATUS_UNAVAILABLE, Result, ResultsWriter
from .memory import peak_memory
from .sweep import SweepPlan, _base_row, _is_oom, label_row
from .timer import measure, quantile, synchronize

#: repetitions of a point: at least, at most
MIN_REPS, MAX_REPS = 3, 30


def _max(value: float, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _broadcast(value: float, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t.item())


def _timed_reps(fn, plan: SweepPlan, comm: Comm, device: torch.device) -> list[float]:
    """Per repetition, the slowest rank's seconds (every rank starts after a barrier)."""
    fn()  # untimed: caches, lazy init
    synchronize(plan.device)
    started = time.perf_counter()
    fn()
    synchronize(plan.device)
    first = _max(time.perf_counter() - started, device)
    reps = int(min(MAX_REPS, max(MIN_REPS, plan.rep_budget_s / max(first, 1e-9))))
    times = []
    for _ in range(reps):
        dist.barrier(group=comm.group)
        started = time.perf_counter()
        fn()
        synchronize(plan.device)
        times.append(time.perf_counter() - started)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist()


def run_point(plan: SweepPlan, res, spec, strategy: str, comm: Comm) -> Result:
    """One point on every rank (the same row on each; rank 0 writes it)."""
    device = plan.device if comm.backend == "nccl" else torch.device("cpu")
    row = _base_row(plan, res, "attention", spec)
    row.world_size, row.strategy, row.dist_backend = comm.world, strategy, comm.backend
    point = plan.point(res)
    label_row(row, spec, point)
    backend = attention.get(spec.name)
    options = backend.resolve(backend.attend_options(spec.options))
    layout = point.layout
    shape = (plan.batch, row.heads, row.tokens, row.head_dim)
    reason = backend.available(plan.device, plan.dtype, shape)
    try:
        if layout is None:
            raise ValueError(getattr(point, "error", "no layout at this size"))
        if reason is None:
            folded, _ = backend.geometry(layout, None, options)
            check_strategy(backend, strategy, folded, row.heads, comm.world, options)
    except ValueError as err:
        reason = str(err)
    if reason:
        row.status, row.reason = STATUS_UNAVAILABLE, reason
        return row
    element = torch.empty((), dtype=plan.dtype).element_size()
    row.comm_bytes_model = comm_model(
        spec.name, strategy, layout, comm.world, plan.batch, row.heads, row.head_dim, element,
        **options)
    sh = Sharding(layout, comm.world, comm.rank)
    torch.manual_seed(comm.rank)
    local = (plan.batch, row.heads, sh.local.tokens, row.head_dim)
    q, k, v = (torch.randn(local, device=plan.device).to(plan.dtype) for _ in range(3))
    row.impl = compute_path(backend, strategy, backend.select(plan.device, plan.dtype, shape,
                                                              layout=layout))

    def fn():
        return attend_parallel(backend, q, k, v, layout=layout, strategy=strategy, comm=comm,
                               check=False, **options)

    try:
        with torch.inference_mode():
            attend_parallel(backend, q, k, v, layout=layout, strategy=strategy, comm=comm,
                            **options)  # the argument check, once
            times = _timed_reps(fn, plan, comm, device)
            comm.reset()
            memory = peak_memory(fn, plan.device)
            row.comm_bytes = _max(comm.data_bytes, device)
            if memory.peak_bytes is not None:
                row.peak_memory_bytes = _max(memory.peak_bytes, device)
            row.memory_meter = memory.meter
            single = _one_rank_latency(plan, backend, layout, options, row, comm, device)
        row.latency_median_s = statistics.median(times)
        row.latency_p20_s, row.latency_p80_s = quantile(times, 0.2), quantile(times, 0.8)
        row.repetitions, row.timer = len(times), "perf_counter, slowest rank per repetition"
        row.latency_one_rank_s = single
        row.scaling_efficiency = single / (comm.world * row.latency_median_s)
        row.status = STATUS_OK
    except Exception as err:  # a point must never crash the sweep (a timeout names the rank)
        row.status = "oom" if _is_oom(err) else STATUS_ERROR
        row.reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
    return row


def _one_rank_latency(plan: SweepPlan, backend, layout, options, row: Result, comm: Comm,
                      device: torch.device) -> float:
    """The one-process ``attend`` on the whole sequence, timed on rank 0 (others wait)."""
    seconds = 0.0
    if comm.rank == 0:
        shape = (plan.batch, row.heads, layout.tokens, row.head_dim)
        q, k, v = (torch.randn(shape, device=plan.device).to(plan.dtype) for _ in range(3))
        seconds = measure(lambda: backend.attend(q, k, v, layout=layout, **options),
                          plan.device, budget_s=plan.rep_budget_s,
                          warmup_s=min(0.2, plan.rep_budget_s / 5)).median
    dist.barrier(group=comm.group)
    return _broadcast(seconds, device)


def run_sweep(plan: SweepPlan, writer: ResultsWriter | None, strategy: str, *,
              progress: bool = True) -> list[Result]:
    """Every point of ``plan`` on every rank; rank 0 (the one with ``writer``) writes."""

    comm = Comm()
    done = writer.done() if writer is not None else set()
    todo = []
    for res, _level, spec in plan.points():
        row = _base_row(plan, res, "attention", spec)
        row.world_size, row.strategy = comm.world, strategy
        todo.append((res, spec, row.key() in done))
    device = plan.device if comm.backend == "nccl" else torch.device("cpu")
    skip = torch.tensor([int(d) for *_, d in todo], device=device)
    dist.broadcast(skip, 0)  # rank 0's folder decides what is left
    bar = tqdm([t for t, s in zip(todo, skip.tolist(), strict=True) if not s],
               disable=not progress or comm.rank != 0, unit="point", dynamic_ncols=True)
    for res, spec, _ in bar:
        bar.set_description(f"{spec.label} {strategy}×{comm.world} {res}px")
        row = run_point(plan, res, spec, strategy, comm)
        if writer is not None:
            writer.append(row)
    bar.close()
    return writer.finalize() if writer is not None else []
