"""Run-to-run comparison: ``python -m attnbench compare RUN_A RUN_B``.

Points are matched on what identifies them across runs -- method, options, level,
image size, batch, dtype and model (not the device: comparing an H100 run with an H200
run is a use) -- and compared on latency, peak memory and quality metrics.

Flags (B against A, thresholds relative, each an option):

* latency: ``B / A > 1 + t`` is a regression (**slower**), ``B / A < 1 / (1 + t)`` an
  improvement; default ``t = 0.10``;
* peak memory: the same with its own threshold (default 0.10), ignoring changes where
  both values are under ``--memory-floor-mib`` (default 1 MiB: the CPU meter counts pages);
* quality: a metric worse by more than ``t`` relative (default 0.05) in its known
  direction (FID down is better, PSNR up is better) is a regression;
* a point measured in A and not in B (skipped, oom, error, unavailable, or missing from
  B: a half-finished run must not pass a CI gate) is a regression; the reverse an
  improvement; points only in B are listed, not flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from ..results import QUALITY_LEVEL, SPEED_LEVELS, STATUS_OK
from .tables import DASH, Run, _finite, label_order, num, quality_table

KEY = ["method", "options", "level", "resolution", "height", "batch", "dtype", "model"]


@dataclass
class Thresholds:
    latency: float = 0.10
    memory: float = 0.10
    quality: float = 0.05
    memory_floor_mib: float = 1.0

    def describe(self) -> str:
        return (f"latency ±{self.latency:.0%}, peak memory ±{self.memory:.0%} (ignored when both "
                f"are under {self.memory_floor_mib:g} MiB), quality ±{self.quality:.0%} relative"
                " in the metric's direction")


@dataclass
class Comparison:
    points: pd.DataFrame  # one row per matched point, with flags
    quality: pd.DataFrame  # one row per (label, resolution, metric) in both
    thresholds: Thresholds
    regressions: int = 0
    improvements: int = 0
    only_a: int = 0
    only_b: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        both = int((self.points["_merge"] == "both").sum()) if len(self.points) else 0
        text = (f"**{self.regressions} regression{'s' * (self.regressions != 1)}, "
                f"{self.improvements} improvement{'s' * (self.improvements != 1)}** over "
                f"{both} points in both runs")
        if self.only_a or self.only_b:
            text += f" ({self.only_a} only in A, {self.only_b} only in B)"
        return text + "."


def _pct(ratio: float) -> str:
    if not _finite(ratio):
        return DASH
    return f"{(ratio - 1) * 100:+.1f}%".replace("-", "−")


def compare_frames(a: pd.DataFrame, b: pd.DataFrame, thresholds: Thresholds) -> Comparison:
    """Match points of two enriched result frames (see :mod:`.tables`) and flag changes."""
    cols = [*KEY, "size", "side", "label", "status", "latency_ms", "peak_mib"]
    left = a[a["level"] != QUALITY_LEVEL][cols].drop_duplicates(KEY, keep="last")
    right = b[b["level"] != QUALITY_LEVEL][cols].drop_duplicates(KEY, keep="last")
    merged = left.merge(right, on=KEY, how="outer", suffixes=("_a", "_b"), indicator=True)
    merged["label"] = merged["label_a"].fillna(merged["label_b"])
    for column in ("size", "side"):  # derived from the key: the same on both sides
        merged[column] = merged[f"{column}_a"].fillna(merged[f"{column}_b"])
    for side in ("a", "b"):  # a number of a point that was not measured is no number
        bad = merged[f"status_{side}"] != STATUS_OK
        merged.loc[bad, [f"latency_ms_{side}", f"peak_mib_{side}"]] = float("nan")
    t = thresholds
    flags, kinds = [], []
    regressions = improvements = 0
    for _, row in merged.iterrows():
        f, kind = _point_flags(row, t)
        regressions += kind.count("regression")
        improvements += kind.count("improvement")
        flags.append(f)
        kinds.append("regression" if "regression" in kind else
                     "improvement" if "improvement" in kind else "")
    merged["flags"] = flags
    merged["kind"] = kinds
    merged["latency_ratio"] = merged["latency_ms_b"] / merged["latency_ms_a"]
    merged["memory_ratio"] = merged["peak_mib_b"] / merged["peak_mib_a"]

    quality = _quality(a, b, t)
    regressions += int((quality["kind"] == "regression").sum()) if len(quality) else 0
    improvements += int((quality["kind"] == "improvement").sum()) if len(quality) else 0
    labels = {lab: i for i, lab in enumerate(label_order(pd.concat([a, b])))}
    lvls = {lvl: i for i, lvl in enumerate(SPEED_LEVELS)}
    merged = merged.assign(_l=merged["level"].map(lvls).fillna(len(lvls)),
                           _o=merged["label"].map(labels)).sort_values(
        ["_l", "level", "side", "_o"], kind="stable").reset_index(drop=True)
    return Comparison(merged, quality, t, regressions, improvements,
                      int((merged["_merge"] == "left_only").sum()),
                      int((merged["_merge"] == "right_only").sum()))


def _point_flags(row: pd.Series, t: Thresholds) -> tuple[list[str], list[str]]:
    if row["_merge"] == "left_only":
        if row["status_a"] == STATUS_OK:
            return ["**only in A**"], ["regression"]
        return ["only in A"], []
    if row["_merge"] == "right_only":
        return ["only in B"], []
    sa, sb = row["status_a"], row["status_b"]
    if sa == STATUS_OK and sb != STATUS_OK:
        return [f"**{sa} → {sb}**"], ["regression"]
    if sa != STATUS_OK and sb == STATUS_OK:
        return [f"{sa} → {sb}"], ["improvement"]
    if sa != STATUS_OK:
        return ([f"{sa} → {sb}"] if sa != sb else []), []
    flags, kinds = [], []
    la, lb = row["latency_ms_a"], row["latency_ms_b"]
    if _finite(la) and _finite(lb) and la > 0:
        ratio = lb / la
        if ratio > 1 + t.latency:
            flags.append(f"**slower {num(ratio)}×**")
            kinds.append("regression")
        elif ratio < 1 / (1 + t.latency):
            flags.append(f"faster {num(1 / ratio)}×")
            kinds.append("improvement")
    ma, mb = row["peak_mib_a"], row["peak_mib_b"]
    if _finite(ma) and _finite(mb) and max(ma, mb) >= t.memory_floor_mib:
        ratio = mb / ma if ma > 0 else math.inf
        if ratio > 1 + t.memory:
            flags.append(f"**more memory {num(ratio)}×**" if math.isfinite(ratio)
                         else "**more memory**")
            kinds.append("regression")
        elif ratio < 1 / (1 + t.memory):
            flags.append(f"less memory {num(1 / ratio) if ratio > 0 else '∞'}×")
            kinds.append("improvement")
    return flags, kinds


def _quality(a: pd.DataFrame, b: pd.DataFrame, t: Thresholds) -> pd.DataFrame:
    qa, qb = quality_table(a), quality_table(b)
    columns = ["label", "size", "metric", "value_a", "value_b", "change", "flag", "kind"]
    if qa.empty or qb.empty:
        return pd.DataFrame(columns=columns)
    on = ["label", "size", "metric"]
    merged = qa[[*on, "value", "higher_is_better"]].drop_duplicates(on, keep="last").merge(
        qb[[*on, "value"]].drop_duplicates(on, keep="last"), on=on, suffixes=("_a", "_b"))
    records = []
    for _, r in merged.iterrows():
        va, vb, better = r["value_a"], r["value_b"], r["higher_is_better"]
        change = (vb - va) / abs(va) if va else (math.inf if vb != va else 0.0)
        flag, kind = "", ""
        if abs(change) > t.quality:
            worse = (change < 0) if better else (change > 0)
            if better is None:
                flag = f"changed {change:+.1%}"
            elif worse:
                flag, kind = f"**worse {change:+.1%}**", "regression"
            else:
                flag, kind = f"better {change:+.1%}", "improvement"
        records.append({"label": r["label"], "size": r["size"],
                        "metric": r["metric"], "value_a": va, "value_b": vb,
                        "change": change, "flag": flag.replace("-", "−"), "kind": kind})
    return pd.DataFrame.from_records(records, columns=columns)


def comparison_table(result: Comparison, only_flagged: bool = False
                     ) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the per-point table (method × level × resolution)."""
    columns = ["method", "level", "px", "status A → B", "latency A (ms)", "latency B (ms)",
               "Δ latency", "peak A (MiB)", "peak B (MiB)", "Δ memory", "flags"]
    rows = []
    for _, r in result.points.iterrows():
        if only_flagged and not r["kind"]:
            continue
        sa = r["status_a"] if isinstance(r["status_a"], str) else DASH
        sb = r["status_b"] if isinstance(r["status_b"], str) else DASH
        rows.append([r["label"], r["level"], r["size"],
                     sa if sa == sb else f"{sa} → {sb}",
                     num(r["latency_ms_a"]), num(r["latency_ms_b"]), _pct(r["latency_ratio"]),
                     num(r["peak_mib_a"]), num(r["peak_mib_b"]), _pct(r["memory_ratio"]),
                     ", ".join(r["flags"])])
    return columns, rows


def _table_md(columns: list[str], rows: list[list[str]], align: str) -> list[str]:
    marks = {"l": ":--", "r": "--:"}
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _describe_run(run: Run) -> str:
    m = run.meta
    parts = [m.get("device_name") or ", ".join(dict.fromkeys(run.frame["device"].astype(str))),
             str(m.get("dtype", "")).replace("torch.", ""), m.get("model") or "",
             f"git {m['git_revision'][:12]}" if m.get("git_revision") else "",
             m.get("date") or ""]
    return ", ".join(p for p in parts if p)


def to_markdown(run_a: Run, run_b: Run, result: Comparison, only_flagged: bool = False) -> str:
    """The comparison as markdown (what ``compare`` prints)."""
    lines = [f"# attnbench compare: `{run_b.name}` against `{run_a.name}`", "",
             f"- A: `{run_a.path}` ({_describe_run(run_a)})",
             f"- B: `{run_b.path}` ({_describe_run(run_b)})",
             f"- thresholds: {result.thresholds.describe()}", ""]
    devices = {_describe_run(run_a).split(",")[0], _describe_run(run_b).split(",")[0]}
    if len(devices) > 1:
        lines += ["> Note: the runs were made on different devices.", ""]
    lines += [f"Result: {result.summary()}", ""]
    columns, rows = comparison_table(result, only_flagged)
    if rows:
        lines += ["## Latency and peak memory", ""]
        lines += [*_table_md(columns, rows, "llrlrrrrrrl"), ""]
    elif len(result.points) == 0:
        lines += ["No points in either run.", ""]
    if len(result.quality):
        q = result.quality
        if only_flagged:
            q = q[q["kind"] != ""]
        qrows = [[r["label"], r["size"], r["metric"], num(r["value_a"], 4),
                  num(r["value_b"], 4), f"{r['change']:+.1%}".replace("-", "−"), r["flag"]]
                 for _, r in q.iterrows()]
        if qrows:
            lines += ["## Quality", ""]
            lines += [*_table_md(["method", "px", "metric", "A", "B", "change", "flag"],
                                 qrows, "lrlrrrl"), ""]
    return "\n".join(lines)
