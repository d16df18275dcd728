"""Published numbers (``baselines/published.csv``): loading and matching to measured points."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..common.paths import REPO_ROOT
from ..models.diffusers_configs import DIFFUSERS_CONFIGS
from ..results import BASELINE_METHOD

DEFAULT_BASELINES = REPO_ROOT / "baselines" / "published.csv"
COLUMNS = ["method", "options", "model", "setting", "resolution", "level", "metric", "value",
           "unit", "source", "table_or_section", "provenance", "note"]
#: the measured level a published level is shown beside
MEASURED_LEVEL = {"attention": "attention", "model": "model", "end-to-end": "model"}


def load_baselines(paths: list[Path | str] | None = None) -> pd.DataFrame:
    """Every published number in ``paths`` (default: the repository's ``published.csv``).

    A missing default file gives an empty table (an installed attnbench has no
    ``baselines/``); a missing or malformed file the user named is a ``ValueError``.
    """
    if paths is None:
        if not DEFAULT_BASELINES.is_file():
            return pd.DataFrame(columns=COLUMNS)
        paths = [DEFAULT_BASELINES]
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"no baselines file at {path}")
        try:
            frame = pd.read_csv(path, dtype={"options": str, "note": str, "unit": str})
        except pd.errors.EmptyDataError:
            raise ValueError(f"--baselines {path} is empty: give a CSV with the columns "
                             f"{', '.join(COLUMNS)} (see baselines/README.md)") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            raise ValueError(f"--baselines {path} is not a baselines CSV: {err}") from None
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path} lacks baseline columns {missing} (see baselines/README.md)")
        frames.append(frame[COLUMNS])
    table = pd.concat(frames, ignore_index=True)
    table["value"] = pd.to_numeric(table["value"], errors="coerce")
    table["resolution"] = pd.to_numeric(table["resolution"], errors="coerce")
    for col in ("options", "unit", "note", "provenance", "table_or_section"):
        table[col] = table[col].fillna("").astype(str)
    return table


def is_zoo_model(model: str) -> bool:
    """Whether a published row's ``model`` names a diffusers zoo entry (``flux.1-dev``):
    such numbers sit beside points measured on that model only."""
    return str(model).strip().lower() in DIFFUSERS_CONFIGS


def relevant(baselines: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Published rows of the measured methods (softmax always: it is every method's baseline)."""
    keep = set(methods) | {BASELINE_METHOD}
    return baselines[baselines["method"].isin(keep)]


def published_speedups(baselines: pd.DataFrame, level: str) -> pd.DataFrame:
    """Published speedups vs softmax that belong beside the measured ``level`` panel."""
    if baselines.empty:
        return baselines
    rows = baselines[(baselines["metric"] == "speedup")
                     & (baselines["level"].map(MEASURED_LEVEL) == level)
                     & baselines["resolution"].notna()]
    return rows


def describe(row: pd.Series) -> str:
    """``CLEAR, Liu et al., arXiv 2412.16112, efficiency comparison (2nd-hand)``."""
    where = f", {row['table_or_section']}" if row["table_or_section"] else ""
    hand = {"2nd-hand": " — 2nd-hand, to be confirmed",
            "project page": " — also on the authors' project page"}.get(row["provenance"], "")
    return f"{row['source']}{where}{hand}"


def resolution_text(value) -> str:
    try:
        return "—" if value is None or math.isnan(float(value)) else f"{int(value)}"
    except (TypeError, ValueError):
        return "—"
