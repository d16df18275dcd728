"""The report section of a zero-shot run: how close each method is to softmax.

Reads the long tables ``python -m attnbench fidelity`` writes into a run directory
(``fidelity.csv``, ``end_to_end.csv``, ``locality.csv``; see
:mod:`attnbench.metrics.zero_shot`) and renders: a ranking table (one row per
method variant), a heatmap per variant of the relative error over layer × timestep,
the end-to-end ε error per timestep, softmax's own statistics per layer and its
locality curve. :func:`zero_shot_section` is what the full report adds for runs
that have them; :func:`write_zero_shot_report` writes a report of this section alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure as MplFigure

from .. import runfolder
from ..metrics.zero_shot import END_TO_END_CSV, FIDELITY_CSV, LOCALITY_CSV
from .plots import DPI, STYLE, save_figure
from .render import Block, Document, Figure, Heading, Note, Para, Table, to_html, to_markdown
from .tables import Run, num

PLOT_FILES = ("zero_shot_heatmap.png", "zero_shot_end_to_end.png", "zero_shot_locality.png")
SECTION = "Zero-shot: each method against softmax"
__all__ = ["write_zero_shot_report", "zero_shot_blocks", "zero_shot_section"]


def has_fidelity(directory: Path) -> bool:
    return (Path(directory) / FIDELITY_CSV).is_file()


def load_tables(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(layers, end_to_end, locality)`` of a zero-shot run directory."""
    directory = Path(directory)
    layers = pd.read_csv(directory / FIDELITY_CSV, keep_default_na=False,
                         na_values=["nan", "NaN", ""])
    e2e_path, loc_path = directory / END_TO_END_CSV, directory / LOCALITY_CSV
    e2e = pd.read_csv(e2e_path) if e2e_path.is_file() else pd.DataFrame()
    loc = pd.read_csv(loc_path) if loc_path.is_file() else pd.DataFrame()
    return layers, e2e, loc


def ranking(layers: pd.DataFrame, e2e: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: means over layers × timesteps (and timesteps end to end)."""
    grouped = layers.groupby("label", sort=False)
    frame = pd.DataFrame({
        "rel_error": grouped["rel_error"].mean(),
        "rel_error_max": grouped["rel_error"].max(),
        "cosine": grouped["cosine"].mean(),
        # a variant's mass recall is NaN for every layer or none
        "mass_recall": grouped["mass_recall"].mean(),
        "mass_recall_note": grouped["mass_recall_note"].first(),
        "computed": grouped["computed"].first(),
    })
    if not e2e.empty:
        ends = e2e.groupby("label", sort=False)
        frame["eps_rel_error"] = ends["eps_rel_error"].mean()
    return frame.sort_values("rel_error", kind="stable").reset_index()


def _heatmaps(layers: pd.DataFrame, path: Path) -> bool:
    labels = [lab for lab in dict.fromkeys(layers["label"]) if lab != "softmax"]
    if not labels:
        return False
    cols = min(3, len(labels))
    rows = math.ceil(len(labels) / cols)
    vmax = float(np.nanmax(layers[layers["label"].isin(labels)]["rel_error"])) or 1.0
    with rc_context({**STYLE, "axes.grid": False}):
        fig = MplFigure(figsize=(4.0 * cols + 1.0, 3.2 * rows), dpi=DPI, layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        image = None
        for ax, label in zip(axes, labels, strict=False):
            sel = layers[layers["label"] == label]
            table = sel.pivot_table(index="layer", columns="timestep", values="rel_error")
            image = ax.imshow(table.values, aspect="auto", cmap="magma_r", vmin=0, vmax=vmax,
                              origin="upper")
            ax.set_xticks(range(len(table.columns)), [str(c) for c in table.columns])
            ax.set_yticks(range(len(table.index)), [str(i) for i in table.index])
            ax.set_xlabel("timestep")
            ax.set_ylabel("layer")
            ax.set_title(label, fontsize=9)
            for (i, j), value in np.ndenumerate(table.values):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6.5,
                        color="white" if value > 0.6 * vmax else "black")
        for ax in axes[len(labels):]:
            ax.set_visible(False)
        fig.colorbar(image, ax=axes.tolist(), label="relative error vs softmax", shrink=0.8)
        fig.suptitle("Zero-shot relative error per layer × timestep")
        save_figure(fig, path)
    return True


def _end_to_end(e2e: pd.DataFrame, path: Path) -> bool:
    if e2e.empty:
        return False
    sel = e2e[e2e["label"] != "softmax"]
    if sel.empty:
        return False
    with rc_context(STYLE):
        fig = MplFigure(figsize=(6.4, 4.0), dpi=DPI, layout="constrained")
        ax = fig.subplots()
        for label, part in sel.groupby("label", sort=False):
            ax.plot(part["timestep"], part["eps_rel_error"], marker="o", ms=3, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("timestep")
        ax.set_ylabel("ε relative error vs the model (log)")
        ax.set_title("End to end: every layer converted at once")
        ax.legend(fontsize=7)
        save_figure(fig, path)
    return True


def _locality(loc: pd.DataFrame, path: Path) -> bool:
    if loc.empty:
        return False
    with rc_context(STYLE):
        fig = MplFigure(figsize=(6.4, 4.0), dpi=DPI, layout="constrained")
        ax = fig.subplots()
        mean = loc.groupby("radius")["mass_within"].mean()
        for t, part in loc.groupby("timestep"):
            curve = part.groupby("radius")["mass_within"].mean()
            ax.plot(curve.index, curve.values, lw=1, alpha=0.7, label=f"t={t}")
        ax.plot(mean.index, mean.values, color="black", lw=2, label="mean")
        ax.set_xlabel("radius r (grid tokens; window dy² + dx² < r²)")
        ax.set_ylabel("softmax mass within r")
        ax.set_ylim(0, 1.02)
        ax.set_title("Locality of softmax attention (mean over layers)")
        ax.legend(fontsize=7)
        save_figure(fig, path)
    return True


def _softmax_table(layers: pd.DataFrame) -> Table | None:
    sm = layers[layers["label"] == "softmax"]
    if sm.empty or "entropy" not in sm:
        return None
    text = "text_mass" in sm and bool((sm["text_mass"] > 0).any())
    columns = ["entropy", "entropy_norm", "erank", "erank_rows", "radius_50", "radius_90",
               *(["text_mass"] if text else [])]
    per = sm.groupby("layer")[columns].mean()
    names = (sm.groupby("layer")["module"].first() if "module" in sm else None)
    rows = [[str(layer) if names is None else f"{layer} `{names[layer]}`", num(r["entropy"], 3),
             num(r["entropy_norm"], 3), num(r["erank"], 3), str(int(r["erank_rows"])),
             num(r["radius_50"], 2), num(r["radius_90"], 2),
             *([f"{r['text_mass']:.1%}"] if text else [])]
            for layer, r in per.iterrows()]
    caption = ("Softmax attention maps per layer (mean over timesteps, images and heads). "
               "Effective rank over the listed number of query rows.")
    if text:
        caption += (" The radii hold 50 / 90 % of the mass on image-token pairs (grid "
                    "distance over frames, rows and columns) and the locality curve counts "
                    "those pairs; the mass on pairs with a text token is the last column.")
    return Table(["layer", "entropy (nats)", "entropy / log N", "effective rank", "rows",
                  "radius holding 50 %", "radius holding 90 %",
                  *(["mass on text pairs"] if text else [])], rows, caption=caption)


def zero_shot_blocks(directory: Path, plot_dir: Path, title: str = SECTION) -> list[Block]:
    """The section's blocks for one zero-shot run directory (plots into ``plot_dir``)."""
    layers, e2e, loc = load_tables(directory)
    if layers.empty:
        return [Heading(title), Note("fidelity.csv holds no rows: nothing was measured.")]
    rank = ranking(layers, e2e)
    summary = _summaries(directory)
    blocks: list[Block] = [Heading(title), Para(
        "How close each method is to softmax on the model's own q, k, v, **before any "
        "training**: per attention layer and timestep the relative error ‖O − O_softmax‖ / "
        "‖O_softmax‖ and the cosine of the layer outputs (float64), and the share of "
        "softmax's probability mass on the pairs the method computes exactly (mass recall; "
        "— where not defined). End to end: every layer converted at once, the relative "
        "error of ε against the model's, and the PSNR of a short DDIM trajectory from the "
        "same noise. Zero-shot numbers rank how much a method must learn, not how well it "
        "ends up after distillation.")]
    rows = []
    for _, r in rank.iterrows():
        s = summary.get(r["label"], {})
        rows.append([r["label"], str(s.get("heads", "")), num(r["rel_error"], 3),
                     num(r["rel_error_max"], 3), num(r["cosine"], 4),
                     num(r["mass_recall"], 3) if pd.notna(r["mass_recall"]) else "—",
                     num(r.get("eps_rel_error"), 3), num(s.get("psnr_trajectory"), 3),
                     str(r["computed"])])
    blocks.append(Table(
        ["method", "heads", "rel. error (mean)", "rel. error (max)", "cosine", "mass recall",
         "ε rel. error end to end", "trajectory PSNR dB", "computed"], rows,
        align="lrrrrrrrl", wide=(8,),
        caption="Ranking by mean relative error over layers × timesteps (lower is better)"))
    notes = {r["label"]: r["mass_recall_note"] for _, r in rank.iterrows()
             if pd.isna(r["mass_recall"]) and isinstance(r["mass_recall_note"], str)}
    if notes:
        blocks.append(Para("Mass recall not defined: " + "; ".join(
            f"`{k}`: {v.removeprefix('not defined: ')}" for k, v in notes.items()) + "."))
    psnr_notes = {s["psnr_note"] for s in summary.values() if s.get("psnr_note")}
    if psnr_notes:
        blocks.append(Para("Trajectory PSNR " + "; ".join(sorted(psnr_notes)) + "."))
    heat = plot_dir / PLOT_FILES[0]
    if _heatmaps(layers, heat):
        blocks.append(Figure(heat, "Zero-shot relative error per layer × timestep",
                             "One panel per method variant; the same colour scale in every "
                             "panel. Rows: attention layers (0 = first block); columns: "
                             "the diffusion timesteps the inputs were noised to."))
    ends = plot_dir / PLOT_FILES[1]
    if _end_to_end(e2e, ends):
        blocks.append(Figure(ends, "End-to-end ε error per timestep",
                             "Relative error of the converted student's ε against the model's "
                             "on the same noised inputs (every layer converted, no training)."))
    table = _softmax_table(layers)
    if table is not None:
        blocks.append(table)
    curve = plot_dir / PLOT_FILES[2]
    if _locality(loc, curve):
        blocks.append(Figure(curve, "Locality curve",
                             "Share of softmax's attention mass within grid radius r of the "
                             "query (CLEAR's circular window), per timestep and averaged."))
    return blocks


def _summaries(directory: Path) -> dict[str, dict]:
    path = Path(directory) / "fidelity.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {s["label"]: s for s in data.get("summaries", [])}


def zero_shot_section(runs: list[Run], plot_dir: Path) -> list[Block]:
    """The section for every run that has a ``fidelity.csv`` (none: no blocks)."""
    found = [r for r in runs if has_fidelity(r.directory)]
    blocks: list[Block] = []
    for run in found:
        title = SECTION if len(found) == 1 else f"{SECTION}: {run.name}"
        sub = plot_dir if len(found) == 1 else plot_dir / run.name
        blocks += zero_shot_blocks(run.directory, sub, title)
    return blocks


def write_zero_shot_report(directory: Path | str) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` of the section alone into ``directory``."""
    directory = Path(directory)
    doc = Document(f"attnbench zero-shot: {directory.name}")
    doc.add(*zero_shot_blocks(directory, directory / "plots"))
    md, html = directory / "report.md", directory / "report.html"
    runfolder.atomic_write(md, to_markdown(doc, directory))
    runfolder.atomic_write(html, to_html(
        doc, footer=f"Generated by attnbench fidelity in `{directory}`. Self-contained: "
                    "figures embedded, no network needed."))
    return md, html
