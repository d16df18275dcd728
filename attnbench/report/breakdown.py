"""*Where the time goes*: the points whose FLOP cut and realised speedup disagree.

A method that computes X× fewer FLOPs than softmax but runs Y× faster, with X and Y more
than :data:`GAP` apart, is flagged; the section shows, per flagged point, the one-off
overhead steps (timed apart from the call) and the stages the path marks
(``bench/breakdown.py``: e.g. CLEAR halo's gather, mask, SDPA and scatter), so the
reader sees an implementation's limit, not a property of the method.
"""

from __future__ import annotations

import pandas as pd

from ..results import BASELINE_METHOD, STATUS_OK
from .render import Heading, Para, Table
from .tables import DASH, _finite, num, overheads_text, times

#: FLOP cut and realised speedup this many times apart flag a point
GAP = 3.0


def flagged(speed: pd.DataFrame) -> pd.DataFrame:
    """The measured method rows whose FLOP cut / speedup is above :data:`GAP` or below
    its inverse, with ``flop_cut`` and ``gap`` columns."""
    rows = speed[(speed["status"] == STATUS_OK) & (speed["method"] != BASELINE_METHOD)]
    rows = rows[rows["speedup_vs_softmax"].notna() & rows["flops_actual"].notna()
                & (rows["flops_actual"] > 0)].copy()
    rows["flop_cut"] = rows["flops_dense"] / rows["flops_actual"]
    rows["gap"] = rows["flop_cut"] / rows["speedup_vs_softmax"]
    return rows[(rows["gap"] > GAP) | (rows["gap"] < 1 / GAP)]


def stages_text(row: pd.Series) -> str:
    """``halo.sdpa 65.2 ms (52%), ...`` (largest first) from the row's recorded stages."""
    stages = (row.get("extra_dict") or {}).get("stages") or {}
    stages = {k: float(v) for k, v in stages.items() if _finite(v)}
    total = sum(stages.values())
    if not stages or total <= 0:
        return f"{DASH} (no stages recorded)"
    return ", ".join(f"{name} {num(t * 1e3)} ms ({100 * t / total:.0f}%)"
                     for name, t in sorted(stages.items(), key=lambda kv: -kv[1]))


def breakdown_section(speed: pd.DataFrame) -> list:
    """The section's blocks, or ``[]`` when no point is flagged."""
    rows = flagged(speed)
    if rows.empty:
        return []
    multi = speed["run"].nunique() > 1
    columns = [*(["run"] if multi else []), "level", "size", "method", "impl", "FLOP cut",
               "speedup", "apart", "overhead steps (ms)", "stages of one call (profiled)"]
    table = []
    for _, r in rows.sort_values(["level", "side", "label"]).iterrows():
        table.append([*([r["run"]] if multi else []), r["level"], f"{r['size']} px",
                      f"`{r['label']}`", r.get("impl") or DASH, times(r["flop_cut"]),
                      times(r["speedup_vs_softmax"]), times(max(r["gap"], 1 / r["gap"])),
                      overheads_text(r), stages_text(r)])
    return [
        Heading("Where the time goes"),
        Para(f"Points where the FLOP cut and the realised speedup over softmax are more than "
             f"{GAP:g}× apart. *overhead steps*: work built once per layout and cached, timed "
             "apart from the call; *stages*: the ranges the path marks, summed over a few "
             "profiled calls (the profiler slows each call a little: read the shares), "
             "`other` being what no stage covers (selection, allocation, Python between "
             "the torch calls)."),
        Table(columns, table, align="l" * (len(columns) - 5) + "rrr" + "ll"),
    ]
