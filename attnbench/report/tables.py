"""Run directories in, readable tables out.

A *run* is a directory written by ``python -m attnbench run`` (or a ``results.json``):
the results table (one row per point, see :mod:`attnbench.results`) and its
``meta.json``. This module loads runs, adds the columns a reader wants (labels, ms,
MiB, GFLOP), finds quality rows, and formats numbers. It draws nothing.

Quality rows (what the quality stage writes, and how the report finds them)
---------------------------------------------------------------------------
A row carries *quality metrics* when any of these holds a finite number:

* ``extra["metrics"]``: a dict ``{metric name: value}`` (any name; the preferred form);
* a key of ``extra`` named in :data:`~attnbench.results.HIGHER_IS_BETTER`
  (``extra["fid"] = 12.3``);
* a column of the table named there (for a later schema).

Rows with ``level == "quality"`` are quality rows: they are left out of the speed
tables and plots. A row of another level that also carries metrics appears in both.
Only rows with status ``ok`` and at least one metric enter the quality section and the
Pareto plot. Whether higher is better comes from that table, or from
``extra["higher_is_better"] = {metric: bool}``; a metric of unknown direction is shown
but gets no Pareto front. The speed of a quality point is its own ``latency_median_s``
if set, else the latency of the same run / method / options / resolution at the model
level (then block, then attention). Sample images: ``extra["samples"]`` (a folder or an
``.npz`` with ``arr_0`` uint8 N×H×W×3, relative to the run directory), or a folder
``<run>/samples/<label>/`` (``label`` as in the tables, e.g. ``clear:radius=16.0``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..results import (
    BASELINE_METHOD,
    HIGHER_IS_BETTER,
    NUMERIC_COLUMNS,
    QUALITY_LEVEL,
    SPEED_LEVELS,
    STATUS_OK,
    SchemaError,
    Size,
    effective_label,
    label,
    load_table,
)

LEVEL_TITLES = {
    "attention": "attention level: one attention layer",
    "block": "block level: one DiT block",
    "model": "model level: one denoising step of the whole DiT",
}

SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Run:
    """One loaded run directory."""

    name: str
    path: Path
    frame: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent


def load_run(path: Path | str, name: str | None = None) -> Run:
    """A run directory (or its ``results.json``), schema-checked, with reader columns added.

    Raises ``FileNotFoundError`` for a missing or empty directory and
    :class:`~attnbench.results.SchemaError` (a ``ValueError``) for a results
    file from another attnbench version, each with a one-line message.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run directory at {path}")
    if path.is_dir() and not any(path.iterdir()):
        raise FileNotFoundError(f"{path} is empty: not a run directory "
                                "(make one with python -m attnbench run --out DIR)")
    try:
        frame, meta = load_table(path)
    except SchemaError as err:
        raise SchemaError(" ".join(str(err).split())) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read results in {path}: {err}") from None
    return Run(name=name or _run_name(path), path=path, frame=enrich(frame), meta=meta or {})


def load_runs(paths: list[Path | str]) -> list[Run]:
    """Several runs, named by their directory (made unique when two share a name)."""
    runs: list[Run] = []
    seen: dict[str, int] = {}
    for p in paths:
        run = load_run(p)
        count = seen.get(run.name, 0)
        seen[run.name] = count + 1
        if count:
            run.name = f"{run.name} ({count + 1})"
        run.frame["run"] = run.name
        runs.append(run)
    return runs


def _run_name(path: Path) -> str:
    path = path.resolve()
    return (path.parent if path.is_file() else path).name


# --------------------------------------------------------------------------- columns


def method_order() -> list[str]:
    """The registry's order of methods (softmax first): the order of rows and colours."""
    try:
        from .. import attention

        return list(attention.names())
    except Exception:  # a broken environment must not stop a report
        return [BASELINE_METHOD, "flash", "xformers", "lit", "clear", "sla"]


def _stated(method: str, options: str, effective: str) -> str:
    """attention/specs.py's stated_options (the options as the row ran them); the row's own
    text where attnbench's methods cannot be loaded."""
    try:
        from ..attention.specs import stated_options
    except Exception:  # a broken environment must not stop a report
        return options
    return stated_options(method, options, effective)




def enrich(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``label`` (what was asked: the key of rows and colours), ``label_ran`` (what ran,
    e.g. ``sla:topk=0.05 (kept 25%)``), ms / MiB / GFLOP columns and parsed ``extra``."""
    frame = frame.copy()
    for col in NUMERIC_COLUMNS:
        if col in frame:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    if "density" not in frame:  # a results.json written before the column existed
        frame["density"] = math.nan
    if "effective" not in frame:
        frame["effective"] = ""
    if "height" not in frame:  # written before non-square sizes: every image square
        frame["height"] = 0
    frame["height"] = frame["height"].fillna(0)
    # ``size``: the image size as text (1024, 480x832), the key of size groupings;
    # ``side``: √(height·width), the size axis of plots (the side of a square one)
    row_sizes = [Size.of_row(r, h) if _finite(r) else None
                 for r, h in zip(frame["resolution"], frame["height"], strict=True)]
    frame["size"] = [str(s) if s else "" for s in row_sizes]
    frame["side"] = [s.side if s else math.nan for s in row_sizes]
    for col in ("options", "effective", "reason", "impl", "overheads", "status", "level",
                "method"):
        if col in frame:
            frame[col] = frame[col].fillna("").astype(str)
    # a row measured before a default changed says the options it ran (stated_options)
    frame["options"] = [_stated(m, o, e) for m, o, e in zip(
        frame["method"], frame["options"], frame["effective"], strict=True)]
    frame["label"] = [label(m, o) for m, o in zip(frame["method"], frame["options"], strict=True)]
    frame["label_ran"] = [effective_label(m, o, e, d) for m, o, e, d in zip(
        frame["method"], frame["options"], frame["effective"], frame["density"], strict=True)]
    frame["extra_dict"] = [_as_dict(e) for e in frame.get("extra", [None] * len(frame))]
    frame["latency_ms"] = frame["latency_median_s"] * 1e3
    frame["latency_p20_ms"] = frame["latency_p20_s"] * 1e3
    frame["latency_p80_ms"] = frame["latency_p80_s"] * 1e3
    frame["peak_mib"] = frame["peak_memory_bytes"] / 2**20
    frame["gflop_actual"] = frame["flops_actual"] / 1e9
    frame["gflop_dense"] = frame["flops_dense"] / 1e9
    frame["overhead_ms"] = frame["overhead_s"] * 1e3
    frame["run"] = ""
    return frame


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip():
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def label_order(frame: pd.DataFrame) -> list[str]:
    """Labels in registry order of their method, the default variant first."""
    order = {name: i for i, name in enumerate(method_order())}
    pairs = frame[["method", "label", "options"]].drop_duplicates()
    keyed = sorted(
        pairs.itertuples(index=False),
        key=lambda r: (order.get(r.method, len(order)), r.method,
                       r.options not in ("", "{}"), r.label),
    )
    return [r.label for r in keyed]


def sizes(frame: pd.DataFrame) -> list[str]:
    """The image sizes of ``frame`` (its ``size`` texts), smallest area first."""
    keyed = frame[["size", "side", "resolution"]].drop_duplicates("size")
    keyed = keyed[keyed["size"] != ""]
    return list(keyed.sort_values(["side", "resolution"], kind="stable")["size"])


def speed_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["level"] != QUALITY_LEVEL]


def levels(frame: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(speed_rows(frame)["level"]))
    return [lvl for lvl in SPEED_LEVELS if lvl in present] + [
        lvl for lvl in present if lvl not in SPEED_LEVELS]


def level_title(level: str) -> str:
    return LEVEL_TITLES.get(level, f"{level} level")


# --------------------------------------------------------------------------- quality


def row_metrics(row: pd.Series) -> dict[str, float]:
    """The quality metrics of one row (see the module docstring), finite numbers only."""
    extra = row.get("extra_dict") or {}
    found: dict[str, Any] = {}
    for name in HIGHER_IS_BETTER:
        if name in row.index and name not in NUMERIC_COLUMNS:
            found[name] = row[name]
    for name, value in extra.items():
        if name in HIGHER_IS_BETTER:
            found[name] = value
    metrics = extra.get("metrics")
    if isinstance(metrics, dict):
        found.update(metrics)
    clean = {}
    for name, value in found.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            clean[str(name)] = number
    return clean


def higher_is_better(metric: str, extra: dict[str, Any] | None = None) -> bool | None:
    override = (extra or {}).get("higher_is_better")
    if isinstance(override, dict) and metric in override:
        return bool(override[metric])
    return HIGHER_IS_BETTER.get(metric.lower())


def quality_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Long table of ok quality points: run, label, method, size, metric, value, speed."""
    records = []
    for _, row in frame.iterrows():
        if row["status"] != STATUS_OK:
            continue
        metrics = row_metrics(row)
        if not metrics and row["level"] != QUALITY_LEVEL:
            continue
        latency, source = _quality_speed(frame, row)
        for metric, value in metrics.items():
            records.append({
                "run": row["run"], "label": row["label"], "method": row["method"],
                "resolution": row["resolution"], "size": row["size"], "metric": metric,
                "value": value,
                "higher_is_better": higher_is_better(metric, row["extra_dict"]),
                "latency_ms": latency, "speed_source": source,
                "extra": row["extra_dict"],
            })
    columns = ["run", "label", "method", "resolution", "size", "metric", "value",
               "higher_is_better", "latency_ms", "speed_source", "extra"]
    return pd.DataFrame.from_records(records, columns=columns)


def _quality_speed(frame: pd.DataFrame, row: pd.Series) -> tuple[float | None, str]:
    if row["level"] == QUALITY_LEVEL and _finite(row["latency_ms"]):
        return float(row["latency_ms"]), "own latency"
    if row["level"] != QUALITY_LEVEL and _finite(row["latency_ms"]):
        return float(row["latency_ms"]), f"{row['level']} level"
    same = frame[(frame["run"] == row["run"]) & (frame["label"] == row["label"])
                 & (frame["size"] == row["size"]) & (frame["status"] == STATUS_OK)]
    for lvl in ("model", "block", "attention"):
        hit = same[same["level"] == lvl]["latency_ms"].dropna()
        if len(hit):
            return float(hit.iloc[0]), f"{lvl} level"
    return None, ""


def sample_sources(runs: list[Run]) -> list[tuple[str, Path]]:
    """``(label, folder-or-npz)`` of sample images (module docstring), in label order."""
    found: dict[str, Path] = {}
    for run in runs:
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        for _, row in run.frame.iterrows():
            spec = row["extra_dict"].get("samples")
            if isinstance(spec, str) and spec:
                path = Path(spec) if Path(spec).is_absolute() else run.directory / spec
                if path.exists():
                    found.setdefault(prefix + row["label"], path)
        folder = run.directory / "samples"
        if folder.is_dir():
            for sub in sorted(folder.iterdir()):
                if sub.is_dir() and any(p.suffix.lower() in SAMPLE_SUFFIXES
                                        for p in sub.iterdir()):
                    found.setdefault(prefix + sub.name, sub)
                elif sub.suffix == ".npz":
                    found.setdefault(prefix + sub.stem, sub)
    order = {lab: i for i, lab in enumerate(label_order(
        pd.concat([r.frame for r in runs]) if runs else pd.DataFrame()))} if runs else {}
    return sorted(found.items(), key=lambda kv: (order.get(kv[0].split(": ")[-1], 1e9), kv[0]))


# --------------------------------------------------------------------------- formatting

DASH = "—"


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def num(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant figures, plain notation where readable."""
    if not _finite(x):
        return DASH
    x = float(x)
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= 1e6 or mag < 1e-3:
        return f"{x:.{digits - 1}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(mag)))
    text = f"{x:,.{decimals}f}"
    return text


def density_text(x: Any) -> str:
    """``25%``: the fraction of query–key pairs computed exactly, as a percentage."""
    return DASH if not _finite(x) else f"{float(x) * 100:.3g}%"


def times(x: Any) -> str:
    return DASH if not _finite(x) else f"{num(x)}×"


def ms_range(row: pd.Series) -> str:
    """``27.3 (27.1–27.6)``: median and p20–p80 in ms."""
    if not _finite(row["latency_ms"]):
        return DASH
    text = num(row["latency_ms"])
    if _finite(row["latency_p20_ms"]) and _finite(row["latency_p80_ms"]):
        text += f" ({num(row['latency_p20_ms'])}–{num(row['latency_p80_ms'])})"
    return text


def overheads_text(row: pd.Series) -> str:
    """``block_mask 153`` (ms) from the overheads JSON, or the total."""
    parts = _as_dict(row.get("overheads"))
    if parts:
        return ", ".join(f"{k} {num(float(v) * 1e3)}" for k, v in parts.items() if _finite(v))
    return num(row["overhead_ms"]) if _finite(row["overhead_ms"]) else DASH


def status_counts(frame: pd.DataFrame) -> dict[str, int]:
    return {k: int(v) for k, v in frame["status"].value_counts().items()}
