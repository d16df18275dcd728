"""Resolution sweeps that never hang or crash.

Before a point runs, its time and memory are predicted from the analytic
FLOP/byte models and a quick calibration of this device (achieved matmul
FLOP/s and copy bandwidth). A point predicted over the time budget or over
the free memory is recorded as ``skipped`` with the reason; a real
out-of-memory is caught and recorded as ``oom``; any other failure as
``error`` with its message. Every row is written the moment it exists.

A slow point takes fewer repetitions (down to one timed call after the untimed
one), so the budget bounds a point's total time rather than its repetition count.
The baseline (softmax) is never dropped for time while a method compared with it
ran at the same size and level: the sweep measures it after them and, if it was
predicted over the budget, runs it anyway and says so in the row (a point that
would not fit in memory is still skipped).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .. import attention
from ..attention.layout import Layout
from ..attention.specs import MethodSpec, stated_options
from ..models.configs import DiTConfig
from ..results import (
    BASELINE_METHOD,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_OOM,
    STATUS_SKIPPED,
    STATUS_UNAVAILABLE,
    Result,
    ResultsWriter,
    Size,
    canonical_options,
)
from .breakdown import CALLS as STAGE_CALLS
from .breakdown import stage_times
from .flops import count_flops
from .memory import free_memory, peak_memory
from .timer import measure, synchronize
from .workloads import (
    DiffusersModel,
    DiffusersPoint,
    Point,
    Refused,
    block_linear_flops,
    build_workload,
    check_resolution,
    model_flops,
)

RESOLUTIONS = (256, 512, 1024, 2048, 4096, 8192)
#: the fewest calls a measured point makes: the untimed first call, one timed, one for memory
MIN_CALLS = 3
#: predictions are optimistic (peak FLOP/s, no overheads); a point is run only when
#: this multiple of its predicted time fits the budget
PREDICTION_MARGIN = 2.0
#: FlopCounterMode runs the call once more: only when it is predicted this cheap
COUNT_FLOPS_BELOW_S = 2.0
#: an attention point's stage breakdown (bench/breakdown.py) is profiled when its extra
#: calls take at most this long
STAGE_BUDGET_S = 5.0


@dataclass(frozen=True)
class Calibration:
    """What this device achieves on a dense matmul and a copy, for predictions."""

    flops_per_s: float
    bytes_per_s: float


def calibrate(device: torch.device, dtype: torch.dtype) -> Calibration:
    """Best-of-a-few matmul and copy rates on ``device`` in ``dtype`` (tens of milliseconds).

    The best repetition, not the median: a prediction that assumes the device's
    rate skips fewer points than one that assumes a busy moment.
    """
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    matmul = measure(lambda: a @ b, device, budget_s=0.1, warmup_s=0.02, flush_l2=False)
    src = torch.empty(32 * 1024 * 1024 // 4, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device, budget_s=0.05, warmup_s=0.01, flush_l2=False)
    return Calibration(
        flops_per_s=2.0 * size**3 / matmul.min,
        bytes_per_s=2.0 * src.numel() * src.element_size() / copy.min,
    )


@dataclass
class SweepPlan:
    """Everything a sweep runs; ``points()`` lists them in order."""

    #: attnbench's DiT, or a diffusers transformer (measured at its true shapes)
    config: DiTConfig | DiffusersModel
    methods: list[MethodSpec]
    #: image sizes: px for a square image, or ``Size(height, width)``
    resolutions: list[int | Size]
    levels: list[str]
    batch: int = 1
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    budget_s: float = 60.0
    rep_budget_s: float = 0.5

    def __post_init__(self) -> None:
        self.resolutions = [Size.of(r) for r in self.resolutions]
        if isinstance(self.config, DiffusersModel):
            return  # a size the model cannot run is a skipped row with the reason
        for res in self.resolutions:
            check_resolution(res, self.config.patch_size)

    def point(self, res: int | Size) -> Point | DiffusersPoint:
        """The model's shapes at ``res`` (px of a square image, or a Size)."""
        res = Size.of(res)
        if isinstance(self.config, DiffusersModel):
            return self.config.point(res, self.batch)
        return Point(self.config, res.width, self.batch, res.row_height)

    def points(self) -> list[tuple[Size, str, MethodSpec]]:
        return [(r, lvl, m) for r in self.resolutions for lvl in self.levels for m in self.methods]


def _base_row(plan: SweepPlan, res: int | Size, level: str, spec: MethodSpec) -> Result:
    res = Size.of(res)
    point = plan.point(res)
    return Result(
        method=spec.name,
        options=canonical_options(spec.options),
        level=level,
        resolution=res.width,
        height=res.row_height,
        tokens=point.tokens,
        batch=plan.batch,
        dtype=str(plan.dtype).replace("torch.", ""),
        device=str(plan.device),
        model=plan.config.name or f"DiT-{plan.config.hidden_size}x{plan.config.depth}",
        heads=point.heads,
        head_dim=point.head_dim,
    )


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _geometry(point: Point | DiffusersPoint) -> tuple[int, ...] | Layout:
    """What the label API takes for ``point``: a plain grid as ``(H, W)``, else the Layout
    (ValueError for a size the model cannot run)."""
    layout = point.layout
    if layout is None:
        raise ValueError(getattr(point, "error", "no layout"))
    return tuple(layout.grid) if layout.is_plain else layout


def point_density(spec: MethodSpec, point: Point | DiffusersPoint) -> float:
    """The fraction of query–key pairs ``spec`` computes exactly at ``point``: the one
    place a row's ``density`` comes from (``backend.density`` at the point's geometry;
    NaN where the method does not take the point's layout)."""
    try:
        return attention.get(spec.name).density(_geometry(point), **spec.options)
    except ValueError:
        return math.nan


def label_row(row: Result, spec: MethodSpec, point: Point | DiffusersPoint) -> None:
    """Fill what ran into ``row``: ``density``, ``effective`` (the options after rounding,
    when they differ from the request) and ``extra["warning"]`` (a request rounded more
    than 20% away from itself). A layout the method does not take leaves them unknown."""
    row.density = point_density(spec, point)
    backend = attention.get(spec.name)
    try:
        geometry = _geometry(point)
        effective = backend.effective_options(geometry, **spec.options)
        warning = backend.rounding_warning(geometry, **spec.options)
    except ValueError:
        return
    if effective != backend.resolve(backend.attend_options(spec.options)):
        row.effective = canonical_options(effective)
    if warning:
        row.extra["warning"] = warning


def run_point(
    plan: SweepPlan, res: int | Size, level: str, spec: MethodSpec, calib: Calibration,
    *, keep_baseline: bool = False,
) -> Result:
    """Measure one point, or say why it was not measured. Never raises for the point.

    ``keep_baseline``: methods compared with this baseline point ran, so it is measured
    even when predicted over the time budget (the row's ``extra`` says so).
    """
    row = _base_row(plan, res, level, spec)
    point = plan.point(res)
    label_row(row, spec, point)
    backend = attention.get(spec.name)
    shape = (plan.batch, row.heads, row.tokens, row.head_dim)
    reason = backend.available(plan.device, plan.dtype, shape)
    if reason:
        row.status, row.reason = STATUS_UNAVAILABLE, reason
        return row
    workload = None
    try:
        if not isinstance(point, DiffusersPoint):  # a diffusers workload predicts before
            skip = _predicted_before_allocating(plan, row, spec, calib,  # it builds weights
                                                keep_baseline=keep_baseline)
            if skip:
                row.status, row.reason = STATUS_SKIPPED, skip
                return row
        workload = build_workload(level, spec.name, spec.options, point, plan.dtype,
                                  plan.device)
        row.impl = workload.impl
        row.extra.update(workload.extra)
        if workload.passed_over:
            row.extra["passed_over"] = workload.passed_over
        row.flops_actual, row.flops_dense = workload.flops.actual, workload.flops.dense
        if not workload.flops_modelled:
            row.flops_actual = None
            row.extra["flops_reason"] = (f"{spec.name}'s FLOP model does not cover layout "
                                         f"{row.extra.get('layout', '')}: predicted from the "
                                         "dense count")
        row.predicted_bytes = workload.predicted_bytes
        row.predicted_s = (workload.flops.actual / calib.flops_per_s
                           + workload.predicted_bytes / calib.bytes_per_s)
        skip = _skip_reason(plan, row, keep_baseline=keep_baseline)
        if skip:
            row.status, row.reason = STATUS_SKIPPED, skip
            return row
        if workload.prepare is not None:
            workload.prepare()
        with torch.inference_mode():
            timing = measure(workload.fn, plan.device, budget_s=plan.rep_budget_s,
                             warmup_s=min(0.2, plan.rep_budget_s / 5),
                             limit_s=plan.budget_s / PREDICTION_MARGIN)
            memory = peak_memory(workload.fn, plan.device)
            overheads = {
                name: measure(step, plan.device, budget_s=plan.rep_budget_s / 5,
                              warmup_s=0.0).median
                for name, step in workload.overheads.items()
            }
            if level == "attention" and spec.name != BASELINE_METHOD and \
                    timing.median * (STAGE_CALLS + 1) <= STAGE_BUDGET_S:
                stages = stage_times(workload.fn)  # {} for a path that marks no stages
                if stages:
                    row.extra["stages"] = stages
            if not workload.countable:
                row.extra["flops_counted_reason"] = f"FlopCounterMode cannot trace {row.impl}"
            elif row.predicted_s < COUNT_FLOPS_BELOW_S:
                row.flops_counted = float(count_flops(workload.fn))
        row.latency_median_s, row.latency_p20_s, row.latency_p80_s = (
            timing.median, timing.p20, timing.p80)
        row.repetitions, row.timer = timing.reps, timing.timer
        row.extra["l2_flush"] = timing.l2_flush
        row.peak_memory_bytes, row.memory_meter = memory.peak_bytes, memory.meter
        if memory.reason:
            row.extra["memory_reason"] = memory.reason
        if row.flops_actual is not None:
            row.tflops_achieved = row.flops_actual / timing.median / 1e12
        row.overheads = json.dumps(overheads, sort_keys=True)
        row.overhead_s = sum(overheads.values()) if overheads else None
        row.status = STATUS_OK
    except Refused as err:  # cannot run here, said before building: not an error
        row.status, row.reason = err.status, str(err)
    except Exception as err:  # a point must never crash the sweep
        row.status = STATUS_OOM if _is_oom(err) else STATUS_ERROR
        row.reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
    finally:
        del workload
        gc.collect()
        if plan.device.type == "cuda":
            synchronize(plan.device)
            torch.cuda.empty_cache()
    return row


def _predicted_before_allocating(plan: SweepPlan, row: Result, spec: MethodSpec,
                                 calib: Calibration, *, keep_baseline: bool) -> str | None:
    """Why a point cannot fit, from the analytic models alone, before its inputs exist.

    The inputs of a huge point (``--res 100000``: tens of GB) must not be allocated
    to find out. The level's FLOPs and the attention's bytes are a lower bound of
    what the workload would predict; the same budget and memory checks apply.
    """
    backend = attention.get(spec.name)
    options = backend.resolve(backend.attend_options(spec.options))
    b, h, n, d = plan.batch, row.heads, row.tokens, row.head_dim
    grid = plan.point(row.size).grid
    element = torch.empty((), dtype=plan.dtype).element_size()
    attn = backend.flops(b, h, n, d, grid, **options)
    flops = attn.actual
    if row.level == "block":
        flops += block_linear_flops(plan.config, b, n)
    elif row.level == "model":
        flops = model_flops(plan.config, b, n, attn).actual
    memory = backend.memory(b, h, n, d, grid, element_size=element, **options)
    probe = Result(**{**row.__dict__, "extra": {}})
    probe.predicted_s = flops / calib.flops_per_s + memory.actual / calib.bytes_per_s
    probe.predicted_bytes = memory.actual
    skip = _skip_reason(plan, probe, keep_baseline=keep_baseline)
    if skip:
        row.predicted_s, row.predicted_bytes = probe.predicted_s, probe.predicted_bytes
        return f"{skip} (predicted before allocating the inputs)"
    return None


def _skip_reason(plan: SweepPlan, row: Result, *, keep_baseline: bool) -> str | None:
    """Why the point is not run (memory, then time), or None.

    A kept baseline (``keep_baseline``) predicted over the time budget alone is run,
    and ``row.extra["past_budget"]`` says so.
    """
    over_memory = _over_memory(plan, row)
    over_time = _over_time(plan, row)
    if over_time and keep_baseline and not over_memory:
        row.extra["past_budget"] = (f"{over_time}: measured anyway, as the baseline of "
                                    "the methods that ran at this size")
        return None
    return over_memory or over_time


def _over_time(plan: SweepPlan, row: Result) -> str | None:
    """Why the fewest calls of the point would not fit the budget, or None."""
    predicted = row.predicted_s * MIN_CALLS * PREDICTION_MARGIN
    if predicted > plan.budget_s:
        return f"predicted {predicted:.3g} s > budget {plan.budget_s:g} s"
    return None


def _over_memory(plan: SweepPlan, row: Result) -> str | None:
    """Why the point would not fit in the free memory, or None."""
    free = free_memory(plan.device)
    if row.predicted_bytes and row.predicted_bytes > 0.9 * free:
        return f"needs {row.predicted_bytes / 2**30:.3g} GiB, {free / 2**30:.3g} GiB free"
    return None


def baseline_last(points: list[tuple[Size, str, MethodSpec]]) -> list[tuple[Size, str, MethodSpec]]:
    """``points`` with each (size, level)'s baseline after the methods compared with it."""
    first: dict[tuple[Size, str], int] = {}
    for i, (res, level, _) in enumerate(points):
        first.setdefault((res, level), i)
    return sorted(points, key=lambda p: (first[p[0], p[1]], p[2].name == BASELINE_METHOD))


def _stated_row(row: Result) -> Result:
    options = stated_options(row.method, row.options, row.effective)
    return row if options == row.options else dataclasses.replace(row, options=options)


def baseline_compared(spec: MethodSpec, res: Size, level: str, rows: Iterable[Result]) -> bool:
    """Whether ``spec`` is the baseline of a method measured at this size and level in
    ``rows`` (then it is measured even past the time budget: ``run_point``)."""
    return spec.name == BASELINE_METHOD and any(
        r.method != BASELINE_METHOD and r.status == STATUS_OK and r.size == res
        and r.level == level for r in rows)


def run_sweep(plan: SweepPlan, writer: ResultsWriter, *, progress: bool = True) -> list[Result]:
    """Run every point of ``plan`` not already in ``writer``'s directory; return all rows."""

    done = writer.done(_stated_row)
    todo = []
    for res, level, spec in baseline_last(plan.points()):
        if _base_row(plan, res, level, spec).key() not in done:
            todo.append((res, level, spec))
    calib = calibrate(plan.device, plan.dtype)
    writer.meta["calibration"] = {"flops_per_s": calib.flops_per_s,
                                  "bytes_per_s": calib.bytes_per_s}
    bar = tqdm(todo, disable=not progress, unit="point", dynamic_ncols=True)
    for res, level, spec in bar:
        bar.set_description(f"{spec.label} {level} {res}px")
        started = time.perf_counter()
        row = run_point(plan, res, level, spec, calib,
                        keep_baseline=baseline_compared(spec, res, level, writer.rows))
        row.extra["wall_s"] = round(time.perf_counter() - started, 3)
        if row.extra.get("warning"):
            bar.write(f"warning: {spec.label} {level} {res}px: {row.extra['warning']}",
                      file=sys.stderr)
        writer.append(row)
    bar.close()
    return writer.finalize()
