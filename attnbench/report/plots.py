"""The report's figures (matplotlib, Agg, no pyplot state).

One colour per method everywhere, fixed by the registry order (softmax black, then
flash, xformers, LiT, CLEAR, SLA, plugins); a method's variants (``clear:radius=16.0``)
keep its hue in another shade and marker; a second run gets another line style.
Points that were not measured (skipped, oom, error, unavailable) are drawn as ``×``
along the bottom of the panel at their resolution, never silently dropped.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator
from matplotlib.transforms import blended_transform_factory
from PIL import Image

from .. import runfolder
from ..results import BASELINE_METHOD, STATUS_OK
from . import baselines as bl
from .tables import (
    Run,
    label_order,
    level_title,
    levels,
    method_order,
    quality_table,
    sample_sources,
    speed_rows,
)

#: colours by registry position: softmax, flash, xformers, lit, clear, sla, then plugins
PALETTE = ["#1a1a1a", "#8c564b", "#e377c2", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd",
           "#d62728", "#bcbd22", "#17becf", "#7f7f7f"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h"]
LINESTYLES = ["-", "--", ":", "-."]
DPI = 150
STYLE = {
    "font.size": 9.5, "axes.titlesize": 10, "axes.labelsize": 9.5, "legend.fontsize": 9,
    "xtick.labelsize": 8.5, "ytick.labelsize": 8.5, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.6, "axes.spines.top": False, "axes.spines.right": False,
    "figure.titlesize": 11.5, "figure.titleweight": "bold", "savefig.facecolor": "white",
    "font.family": "DejaVu Sans",
}


@dataclass
class Plot:
    """A figure written to ``path``, with the caption the report prints under it."""

    name: str
    path: Path
    title: str
    caption: str


# --------------------------------------------------------------------------- styles


def method_colour(method: str, order: list[str] | None = None) -> str:
    """The fixed colour of ``method`` (its registry position; unknown names hash stably)."""
    order = order if order is not None else method_order()
    if method in order:
        return PALETTE[order.index(method) % len(PALETTE)]
    return PALETTE[6 + sum(map(ord, method)) % (len(PALETTE) - 6)]


def _shade(colour: str, variant: int) -> str:
    if variant == 0:
        return colour
    h, lum, s = colorsys.rgb_to_hls(*to_rgb(colour))
    step = [0.0, -0.17, 0.17, -0.28, 0.28, -0.36, 0.36][min(variant, 6)]
    new = lum + step
    if not 0.1 <= new <= 0.85:
        new = lum - step
    return to_hex(colorsys.hls_to_rgb(h, min(max(new, 0.08), 0.85), s))


@dataclass(frozen=True)
class Style:
    colour: str
    marker: str
    linestyle: str
    filled: bool = True  # a method's default variant; other variants get hollow markers

    @property
    def face(self) -> str:
        return self.colour if self.filled else "none"


class Styles:
    """Colour / marker / line style of every (run, label) of a report, fixed once."""

    def __init__(self, frame: pd.DataFrame, runs: list[str]) -> None:
        order = method_order()
        self.runs = runs
        self.labels = label_order(frame)
        methods = dict(zip(frame["label"], frame["method"], strict=False))
        self._style: dict[str, tuple[str, str]] = {}
        variants: dict[str, int] = {}
        for lab in self.labels:
            method = methods[lab]
            v = variants.get(method, 0)
            variants[method] = v + 1
            self._style[lab] = (_shade(method_colour(method, order), v), MARKERS[v % len(MARKERS)])

    def __call__(self, label: str, run: str = "") -> Style:
        colour, marker = self._style.get(label, ("#7f7f7f", "o"))
        index = self.runs.index(run) if run in self.runs else 0
        return Style(colour, marker, LINESTYLES[index % len(LINESTYLES)],
                     filled=marker == MARKERS[0])

    def name(self, label: str, run: str) -> str:
        return f"{label} [{run}]" if len(self.runs) > 1 else label


# --------------------------------------------------------------------------- axes


def _plain(value: float, _pos=None) -> str:
    if value <= 0:
        return ""
    if 1e-3 <= value < 1e5:
        return f"{value:g}"
    exponent = math.floor(math.log10(value))
    mantissa = value / 10**exponent
    return f"$10^{{{exponent}}}$" if abs(mantissa - 1) < 1e-9 else f"{value:.0e}"


def _resolution_axis(ax, frame: pd.DataFrame) -> None:
    """x: √(height·width) on a log axis, each tick named by its size (1024, 480x832)."""
    names = dict(zip(frame["side"], frame["size"], strict=True))
    sides = sorted(names)
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(sides) / 1.3, max(sides) * 1.3)
    ax.xaxis.set_major_locator(FixedLocator(sides))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: names.get(v, f"{v:g}")))
    ax.xaxis.set_minor_locator(NullLocator())
    square = all("x" not in name for name in names.values())
    ax.set_xlabel("image resolution (px, square)" if square else
                  "image size (px; height x width where not square, placed at √(h·w))")


def _log_y(ax, speedup: bool = False) -> None:
    ax.set_yscale("log")
    if speedup:
        ticks = [m * 10.0**e for e in range(-3, 5) for m in (1, 2, 5)]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.yaxis.set_minor_locator(NullLocator())
    else:
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))


def _minor_labels(ax, axis: str = "y") -> None:
    """Label minor ticks of a log axis only when it spans less than about a decade."""
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    target = ax.yaxis if axis == "y" else ax.xaxis
    if lo > 0 and hi / lo < 15:
        keep = (2, 3, 4, 5, 6, 8) if hi / lo < 4 else (2, 3, 5)

        def minor(v: float, _pos=None) -> str:
            mantissa = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
            return f"{v:.2g}" if mantissa in keep else ""

        target.set_minor_formatter(FuncFormatter(minor))
    else:
        target.set_minor_formatter(NullFormatter())


def _figure(ncols: int, title: str, height: float = 4.3) -> tuple[Figure, list]:
    width = {1: 6.4, 2: 11.0, 3: 15.0}.get(ncols, 4.8 * ncols)
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0].tolist()
    fig.suptitle(title)
    return fig, axes


def _title(title: str, subtitle: str) -> str:
    return f"{title}\n{subtitle}"


def save_figure(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written atomically (a killed report leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    runfolder.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))


# --------------------------------------------------------------------------- speed plots

SPEED_METRICS = {
    # name: (column, figure title, y label, what the caption says)
    "latency": ("latency_ms", "Latency vs resolution", "latency per call (ms, log)",
                "Median latency per call; bars span p20–p80 of the repetitions."),
    "speedup": ("speedup_vs_softmax", "Speedup vs softmax", "speedup vs softmax (×, log)",
                "Softmax latency / method latency at the same point; above 1× is faster."),
    "memory": ("peak_mib", "Peak memory vs resolution", "peak memory per call (MiB, log)",
               "Peak memory of one call above the baseline before it."),
    "flops": ("gflop_actual", "FLOPs vs resolution", "forward FLOPs (GFLOP, log)",
              "FLOPs each method does (analytic model, 2 FLOPs per multiply-add). The "
              "dense-equivalent (softmax on the same shapes) is softmax's line; a method "
              "whose dense-equivalent differs from it by more than 5 % (e.g. other heads) "
              "has it dashed."),
    "tflops": ("tflops_achieved", "Achieved throughput", "achieved TFLOP/s (log)",
               "Actual FLOPs / median latency: how well each method uses the device."),
}


def speed_plots(runs: list[Run], frame: pd.DataFrame, out: Path, subtitle: str,
                baselines: pd.DataFrame | None = None) -> list[Plot]:
    """Latency, speedup, memory, FLOPs and TFLOP/s vs resolution: one panel per level."""
    frame = speed_rows(frame)
    lvls = levels(frame)
    ok = frame[frame["status"] == STATUS_OK]
    styles = Styles(frame, [r.name for r in runs])
    plots = []
    for name, (column, title, ylabel, caption) in SPEED_METRICS.items():
        values = ok[column]
        if name == "speedup":
            values = ok[ok["method"] != BASELINE_METHOD][column]
        if not (values > 0).any():
            continue
        with rc_context(STYLE):
            fig, axes = _figure(len(lvls), _title(title, subtitle))
            extras: dict[str, Line2D] = {}
            for ax, lvl in zip(axes, lvls, strict=True):
                _panel(ax, frame[frame["level"] == lvl], lvl, name, column, styles, extras,
                       baselines)
                ax.set_ylabel(ylabel)
                if name != "speedup":
                    _minor_labels(ax)
            _legend(fig, frame, styles, extras, skip_softmax=name == "speedup")
            path = out / f"{name}.png"
            save_figure(fig, path)
        note = _not_drawn_note(frame, column, name)
        if any(key.startswith("published") for key in extras):
            note += (" Stars: speedups published in the papers, in their own setting (model, "
                     "GPU; beside the model level: whole-generation, end-to-end speedups); see "
                     "*Published numbers*.")
        plots.append(Plot(name, path, title, caption + note))
    return plots


def _panel(ax, frame: pd.DataFrame, level: str, name: str, column: str, styles: Styles,
           extras: dict, baselines: pd.DataFrame | None) -> None:
    ax.set_title(level_title(level))
    _resolution_axis(ax, frame)
    _log_y(ax, speedup=name == "speedup")
    if name == "speedup":
        ax.axhline(1.0, color=PALETTE[0], linewidth=1.0, linestyle="-", alpha=0.6, zorder=1)
        extras.setdefault("softmax = 1×", Line2D([], [], color=PALETTE[0], alpha=0.6))
    missing_slot, drawn = 0, 0
    soft = frame[(frame["method"] == BASELINE_METHOD) & (frame["status"] == STATUS_OK)]
    softmax_flops = soft.groupby("side")["gflop_actual"].first()
    for lab in styles.labels:
        for run in styles.runs:
            rows = frame[(frame["label"] == lab) & (frame["run"] == run)].sort_values("side")
            if rows.empty or (name == "speedup" and rows["method"].iloc[0] == BASELINE_METHOD):
                continue
            st = styles(lab, run)
            good = rows[(rows["status"] == STATUS_OK) & (rows[column] > 0)]
            if len(good):
                drawn += 1
                x, y = good["side"].to_numpy(float), good[column].to_numpy(float)
                ax.plot(x, y, color=st.colour, marker=st.marker, linestyle=st.linestyle,
                        linewidth=1.6, markersize=5.5, markerfacecolor=st.face,
                        markeredgewidth=1.3, zorder=3 if st.filled else 3.5)
                if name == "latency":
                    lo = (y - good["latency_p20_ms"].to_numpy(float))
                    hi = (good["latency_p80_ms"].to_numpy(float) - y)
                    err = np.nan_to_num(np.vstack([lo, hi]).clip(min=0))
                    ax.errorbar(x, y, yerr=err, fmt="none", ecolor=st.colour, elinewidth=1,
                                capsize=2, zorder=2)
                if name == "flops":
                    _dense(ax, good, st, extras, softmax_flops)
            bad = rows[rows["status"] != STATUS_OK]
            if len(bad):
                trans = blended_transform_factory(ax.transData, ax.transAxes)
                ax.plot(bad["side"].to_numpy(float),
                        np.full(len(bad), 0.04 + 0.045 * missing_slot), transform=trans,
                        linestyle="none", marker="x", color=st.colour, markersize=7,
                        markeredgewidth=2, clip_on=False, zorder=4)
                missing_slot += 1
                extras.setdefault("not measured (see the tables)",
                                  Line2D([], [], linestyle="none", marker="x", color="#555555",
                                         markersize=7, markeredgewidth=2))
    if name == "speedup" and baselines is not None and not baselines.empty:
        _published_speedups(ax, level, styles, extras, baselines)
    if not drawn:
        ax.set_yticks([], minor=True)
        ax.set_yticks([])
        ax.text(0.5, 0.55, "nothing measured here\n(see Points not measured)", ha="center",
                va="center", transform=ax.transAxes, color="#777777", fontsize=9)
    elif missing_slot:  # room under the data for the × row(s)
        lo, hi = ax.get_ylim()
        if lo > 0 and hi > lo:
            room = 0.06 + 0.045 * missing_slot
            ax.set_ylim(lo / (hi / lo) ** (room / (1 - room)), hi)


def _dense(ax, good: pd.DataFrame, st: Style, extras: dict, softmax: pd.Series) -> None:
    """The dense-equivalent FLOPs of a method, where they differ from softmax's (> 5 %)."""
    dense = good[good["gflop_dense"] > 0]
    reference = dense["side"].map(softmax)
    differs = ~np.isclose(dense["gflop_dense"], reference, rtol=0.05)
    if dense.empty or not differs.any():
        return
    ax.plot(dense["side"].to_numpy(float), dense["gflop_dense"].to_numpy(float),
            color=st.colour, linestyle=(0, (4, 3)), linewidth=1.0, alpha=0.8, zorder=2)
    extras.setdefault("dashed: dense-equivalent",
                      Line2D([], [], color="#555555", linestyle=(0, (4, 3)), linewidth=1.0))


def _published_speedups(ax, level: str, styles: Styles, extras: dict,
                        baselines: pd.DataFrame) -> None:
    rows = bl.published_speedups(baselines, level)
    lo, hi = ax.get_xlim()
    for _, row in rows.iterrows():
        res = float(row["resolution"])
        matches = [lab for lab in styles.labels if lab.split(":")[0] == row["method"]]
        if not matches or not (lo <= res <= hi) or not row["value"] > 0:
            continue
        st = styles(matches[0])
        ticks = sorted({*ax.xaxis.get_major_locator().tick_values(lo, hi), res})
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.plot([res], [row["value"]], marker="*", markersize=14, color=st.colour,
                markeredgecolor="black", markeredgewidth=0.8, linestyle="none", zorder=5)
        right = res >= max(ticks)
        ax.annotate(f"paper {row['value']:g}×",
                    (res, row["value"]), xytext=(-8 if right else 8, 6),
                    textcoords="offset points", ha="right" if right else "left",
                    fontsize=7.5, color="#333333")
        extras.setdefault("published (the paper's setting)",
                          Line2D([], [], linestyle="none", marker="*", markersize=11,
                                 color="#bbbbbb", markeredgecolor="black",
                                 markeredgewidth=0.8))


def _legend(fig: Figure, frame: pd.DataFrame, styles: Styles, extras: dict,
            skip_softmax: bool = False) -> None:
    handles, names = [], []
    present = set(zip(frame["label"], frame["run"], strict=True))
    softmax = set(frame[frame["method"] == BASELINE_METHOD]["label"])
    for lab in styles.labels:
        for run in styles.runs:
            if (lab, run) not in present or (skip_softmax and lab in softmax):
                continue
            st = styles(lab, run)
            handles.append(Line2D([], [], color=st.colour, marker=st.marker,
                                  markerfacecolor=st.face, markeredgewidth=1.3,
                                  linestyle=st.linestyle, linewidth=1.6, markersize=5))
            names.append(styles.name(lab, run))
    handles += list(extras.values())
    names += list(extras.keys())
    ncol = _legend_columns(names, fig.get_figwidth())
    fig.legend(handles, names, loc="outside lower center", ncol=ncol, frameon=False)


def _legend_columns(names: list[str], width: float) -> int:
    """The most columns whose entries (filled column by column) fit ``width`` inches."""
    for ncol in range(min(len(names), 6), 1, -1):
        rows = math.ceil(len(names) / ncol)
        columns = [names[i:i + rows] for i in range(0, len(names), rows)]
        needed = sum(0.068 * max(len(n) for n in col) + 0.75 for col in columns)
        if needed <= width * 0.96:
            return len(columns)  # e.g. 6 entries in "5 columns" are 3 columns of 2
    return 1


def _not_drawn_note(frame: pd.DataFrame, column: str, name: str) -> str:
    ok = frame[frame["status"] == STATUS_OK]
    zero = ok[~(ok[column] > 0)]
    if name == "speedup":
        zero = zero[zero["method"] != BASELINE_METHOD]
    bad = int((frame["status"] != STATUS_OK).sum())
    notes = []
    if bad:
        notes.append(f"{bad} point(s) not measured are marked × at the bottom")
    if len(zero) and name == "speedup":
        notes.append(f"{len(zero)} measured point(s) have no speedup: softmax was not measured "
                     "at the same point")
    elif len(zero):
        notes.append(f"{len(zero)} measured point(s) without a positive value (e.g. 0 MiB: "
                     "below the meter's resolution) cannot be drawn on a log axis")
    return (" " + "; ".join(notes) + ".") if notes else ""


# --------------------------------------------------------------------------- quality


def pareto_front(points: list[tuple[float, float]], higher_better: bool) -> list[tuple]:
    """Points no other point beats on both speed (lower latency) and quality."""
    ordered = sorted(points, key=lambda p: (p[0], -p[1] if higher_better else p[1]))
    front, best = [], None
    for x, y in ordered:
        if best is None or (y > best if higher_better else y < best):
            front.append((x, y))
            best = y
    return front


def pareto_plot(runs: list[Run], frame: pd.DataFrame, out: Path, subtitle: str) -> Plot | None:
    """Quality vs latency, one panel per metric, the Pareto front dashed."""
    quality = quality_table(frame)
    quality = quality[quality["latency_ms"].notna() & (quality["latency_ms"] > 0)]
    if quality.empty:
        return None
    metrics = list(dict.fromkeys(quality["metric"]))[:4]
    styles = Styles(frame, [r.name for r in runs])
    with rc_context(STYLE):
        fig, axes = _figure(len(metrics), _title("Quality vs speed", subtitle), height=4.4)
        extras: dict[str, Line2D] = {}
        for ax, metric in zip(axes, metrics, strict=True):
            rows = quality[quality["metric"] == metric]
            better = rows["higher_is_better"].iloc[0]
            one_res = rows["size"].nunique() == 1
            for n, (_, row) in enumerate(rows.sort_values("latency_ms").iterrows()):
                st = styles(row["label"], row["run"])
                ax.plot([row["latency_ms"]], [row["value"]], marker=st.marker, color=st.colour,
                        markerfacecolor=st.face, markeredgewidth=1.5,
                        markersize=8, linestyle="none", zorder=3)
                text = row["label"] if one_res else f"{row['label']} @{row['size']}px"
                if len(runs) > 1:
                    text += f" [{row['run']}]"
                ax.annotate(text, (row["latency_ms"], row["value"]),
                            xytext=(6, 5 if n % 2 == 0 else -11), textcoords="offset points",
                            fontsize=7.5, color="#333333")
            if better is not None and len(rows) > 1:
                front = pareto_front(list(zip(rows["latency_ms"], rows["value"],
                                              strict=True)), bool(better))
                xs, ys = zip(*front, strict=True)
                ax.step(xs, ys, where="post", color="#777777", linestyle="--", linewidth=1,
                        zorder=2)
                extras.setdefault("Pareto front", Line2D([], [], color="#777777",
                                                         linestyle="--"))
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(_plain))
            ax.set_xlabel("latency (ms, log; lower is faster)")
            direction = {True: "higher is better", False: "lower is better",
                         None: "direction unknown"}[better]
            ax.set_ylabel(f"{metric} ({direction})")
            ax.set_title(f"{metric} at {rows['size'].iloc[0]} px" if one_res
                         else metric)
            ax.margins(x=0.25, y=0.15)
            _minor_labels(ax, "x")
        _legend(fig, frame[frame["label"].isin(set(quality["label"]))], styles, extras)
        path = out / "pareto.png"
        save_figure(fig, path)
    return Plot("pareto", path, "Quality vs speed",
                "Each quality point against the latency of the same method and resolution "
                "(its own latency, else the model level); the dashed step is the Pareto front.")


def samples_plot(runs: list[Run], out: Path, per_row: int = 8) -> Plot | None:
    """A grid of sample images: one row per method, up to ``per_row`` images."""
    sources = sample_sources(runs)
    rows = [(lab, imgs) for lab, src in sources if (imgs := _images(src, per_row))]
    if not rows:
        return None
    ncols = max(len(imgs) for _, imgs in rows)
    with rc_context(STYLE):
        fig = Figure(figsize=(1.6 * ncols + 1.6, 1.6 * len(rows) + 0.6), dpi=DPI,
                     layout="constrained")
        axes = fig.subplots(len(rows), ncols, squeeze=False)
        for r, (lab, imgs) in enumerate(rows):
            for c in range(ncols):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c < len(imgs):
                    ax.imshow(imgs[c])
                if c == 0:
                    ax.set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=9)
        fig.suptitle("Samples")
        path = out / "samples.png"
        save_figure(fig, path)
    return Plot("samples", path, "Samples", "The first images of each method's sample folder.")


def _images(source: Path, limit: int) -> list[np.ndarray]:
    try:
        if source.suffix == ".npz":
            with np.load(source) as data:
                arr = data["arr_0"] if "arr_0" in data else data[data.files[0]]
                return [np.asarray(a) for a in arr[:limit]]
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in
                       (".png", ".jpg", ".jpeg", ".webp"))[:limit]
        return [np.asarray(Image.open(p).convert("RGB")) for p in files]
    except (OSError, ValueError, KeyError, IndexError):
        return []
