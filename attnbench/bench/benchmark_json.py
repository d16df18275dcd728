"""Rows of the results schema from the JSON ``pytest --benchmark-json`` writes for tests/bench/."""

from __future__ import annotations

from typing import Any

from ..results import COLUMNS, Result, SchemaError, add_ratios
from .timer import quantile


def rows_from_pytest_benchmark(data: dict[str, Any]) -> tuple[list[Result], dict[str, Any]]:
    """``(rows, meta)`` from the JSON ``pytest --benchmark-json`` writes for tests/bench/.

    Latency quantiles come from the raw timings when the JSON has them
    (``--benchmark-save-data``); otherwise p20/p80 stay empty and pytest-benchmark's
    quartiles are kept in ``extra``. Benchmarks without attnbench's ``extra_info``
    are not ours and are refused.
    """
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list) \
            or not all(isinstance(b, dict) for b in data["benchmarks"]):
        raise SchemaError("not a pytest-benchmark JSON file (no 'benchmarks' list of objects)")
    rows = []
    for bench in data["benchmarks"]:
        info, stats = bench.get("extra_info", {}), bench.get("stats", {})
        needed = {"method", "level", "resolution", "tokens", "device", "model"}
        if not needed <= set(info):
            raise SchemaError(
                f"benchmark {bench.get('name')!r} has no attnbench extra_info "
                f"(missing {sorted(needed - set(info))}): only tests/bench/ results import"
            )
        known = {k: v for k, v in info.items() if k in COLUMNS}
        row = Result(**known)
        raw = stats.get("data")
        row.latency_median_s = stats.get("median")
        if raw:
            row.latency_p20_s, row.latency_p80_s = quantile(raw, 0.2), quantile(raw, 0.8)
        row.repetitions = stats.get("rounds")
        row.timer = "pytest-benchmark pedantic"
        row.extra = {"q1": stats.get("q1"), "q3": stats.get("q3"), "benchmark": bench.get("name")}
        if row.flops_actual and row.latency_median_s:
            row.tflops_achieved = row.flops_actual / row.latency_median_s / 1e12
        rows.append(row)
    add_ratios(rows)
    meta = {"source": "pytest-benchmark", "machine_info": data.get("machine_info"),
            "commit_info": data.get("commit_info"), "datetime": data.get("datetime"),
            "version": data.get("version")}
    return rows, meta
