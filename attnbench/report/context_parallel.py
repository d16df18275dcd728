"""The report's section on context parallelism (``run --context-parallel``).

Per method, one table: each strategy, size and world size with the slowest rank's
latency, the one-process latency of the same point, the scaling efficiency
``t₁ / (P·t_P)``, the bytes one rank sent (counted from the collectives' tensors)
beside the analytic model (CLEAR: halo rows; LiT: the d×d state), and the peak memory
per rank. These rows are not in the single-process tables: they measure another thing.
"""

from __future__ import annotations

import pandas as pd

from ..results import STATUS_OK
from .render import Heading, Para, Table
from .tables import DASH, ms_range, num

COLUMNS = ["strategy", "ranks", "size", "tokens", "ms, slowest rank (p20–p80)", "one process ms",
           "efficiency", "MiB sent / rank", "model MiB", "measured / model", "peak MiB / rank",
           "reason"]


def is_context_parallel(frame: pd.DataFrame) -> pd.Series:
    """Rows measured with ``--context-parallel`` (a strategy is set)."""
    if "strategy" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["strategy"].fillna("").astype(str) != ""


def _mib(x) -> str:
    return num(float(x) / 2**20) if pd.notna(x) else DASH


def context_parallel_section(frame: pd.DataFrame) -> list:
    cp = frame[is_context_parallel(frame)]
    if cp.empty:
        return []
    blocks: list = [Heading("Context parallelism"), Para(
        "Each point split over the ranks by rows (frames for video), text tokens on every "
        "rank. Latency: per repetition the slowest rank, after a barrier. Efficiency: the "
        "one-process latency over (ranks × latency). Bytes: what one rank sent per call "
        "(the most of any rank), counted from the collectives' tensors, beside the analytic "
        "model (CLEAR halo: the K/V rows within the radius; LiT: the d×(d+1) state per head, "
        "all-reduced).")]
    for method in dict.fromkeys(cp["method"]):
        rows = cp[cp["method"] == method].sort_values(["strategy", "side", "world_size"])
        table = []
        for _, r in rows.iterrows():
            ok = r["status"] == STATUS_OK
            ratio = (r["comm_bytes"] / r["comm_bytes_model"]
                     if ok and r["comm_bytes_model"] else None)
            table.append([
                r["strategy"], str(int(r["world_size"])), r["size"], f"{int(r['tokens']):,}",
                ms_range(r) if ok else DASH,
                num(r["latency_one_rank_s"] * 1e3) if ok else DASH,
                num(r["scaling_efficiency"]) if ok else DASH,
                _mib(r["comm_bytes"]) if ok else DASH, _mib(r["comm_bytes_model"]),
                num(ratio) if ratio is not None else DASH,
                num(r["peak_mib"]) if ok else DASH,
                "" if ok else (r["reason"] or r["status"]),
            ])
        blocks.append(Table(COLUMNS, table, align="llll" + "r" * 7 + "l",
                            caption=f"{method}: latency and communication vs world size"))
    return blocks
