"""The one results schema: a row per (method, options, level, resolution, ...) point.

A leaf module (of attnbench it imports only :mod:`attnbench.runfolder`, itself a
stdlib-only leaf, for locks, claimed files and atomic writes; not torch): the sweep and the
quality stage write rows, the report reads them, and all three share the statuses,
the point key, the baseline, the metric directions and :func:`label` from here.

Rows are appended to ``results.jsonl`` as they are measured (and mirrored to
``results.csv``), so an interrupted sweep keeps everything it measured and a
rerun with the same run directory resumes where it stopped. ``finalize``
adds the ratios against softmax at the same point and writes
``results.csv``, ``results.json`` (rows + metadata) and, when pyarrow is
installed, ``results.parquet``. ``meta.json`` holds how the run was made.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from . import runfolder

#: bump when a column changes meaning; readers refuse other versions with a clear message
SCHEMA_VERSION = 1
#: the method every other is compared with (speedup and memory ratios, plots)
BASELINE_METHOD = "softmax"

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"  # predicted over budget / memory: not run
STATUS_OOM = "oom"  # ran out of memory for real
STATUS_UNAVAILABLE = "unavailable"  # the method cannot run on this device/dtype
STATUS_ERROR = "error"  # anything else; retried on resume
FINAL_STATUSES = {STATUS_OK, STATUS_SKIPPED, STATUS_OOM, STATUS_UNAVAILABLE}

#: a row's ``level``: the speed levels ``run`` measures, in the order of every table
SPEED_LEVELS = ("attention", "block", "model")
#: the rows of ``eval`` (FID family, GenEval proxy, fidelity to the teacher)
QUALITY_LEVEL = "quality"
#: the rows of the zero-shot command (``fidelity``): each method vs softmax on the model's
#: own q, k, v
ZERO_SHOT_LEVEL = "zero-shot"
#: level names rows were written with before, read as today's
FORMER_LEVELS = {"fidelity": ZERO_SHOT_LEVEL}

#: whether higher is better, for every quality metric attnbench writes or the report knows
HIGHER_IS_BETTER: dict[str, bool] = {
    "fid": False, "sfid": False, "fid_vs_teacher": False, "kid": False, "lpips": False,
    "mse": False, "mse_vs_teacher": False, "fd_dinov2": False, "eps_mse_vs_teacher": False,
    "inception_score": True, "is": True, "precision": True, "recall": True,
    "clip_score": True, "psnr": True, "ssim": True,
    "geneval": True, "geneval_strict": True,
    **{f"geneval_{t}": True for t in ("single_object", "two_object", "counting", "colors",
                                      "position", "color_attr")},
}


class Size(NamedTuple):
    """An image size in px, ``height × width``; a square one reads as its side.

    Rows keep the width in ``resolution`` and the height in ``height`` only when it
    differs (0 = square), so every square run reads as before: :meth:`of_row` and
    :attr:`row_height` are that mapping."""

    height: int
    width: int

    @staticmethod
    def sides(text: str) -> tuple[int, ...] | None:
        """The integers of ``"1024"`` or ``"480x832"`` (``×``/``X`` too), or None when the
        text is not of that form. Signs are read, not checked: callers say what is wrong."""
        try:
            sides = tuple(int(p) for p in text.strip().lower().replace("×", "x").split("x"))
        except ValueError:
            return None
        return sides if len(sides) in (1, 2) else None

    @classmethod
    def of(cls, value: int | str | tuple[int, int] | Size) -> Size:
        """``1024`` or ``"1024"`` (square), ``"480x832"`` or ``(480, 832)`` (height × width)."""
        if isinstance(value, str):
            sides = cls.sides(value)
            if sides is None or min(sides) < 0:
                raise ValueError(f"{value!r} is not a size: give px (1024) or HEIGHTxWIDTH "
                                 "(480x832)")
            value = sides
        if isinstance(value, (tuple, list)):
            if len(value) == 1:
                value = value[0]
            elif len(value) == 2:
                return cls(int(value[0]), int(value[1]))
            else:
                raise ValueError(f"a size is px or (height, width) px, got {value!r}")
        return cls(int(value), int(value))

    @classmethod
    def of_row(cls, resolution: Any, height: Any = 0) -> Size:
        """The size of a row's ``resolution`` (width) and ``height`` (0, NaN or None: square)."""
        h = int(height) if height == height and height else 0
        return cls(h or int(resolution), int(resolution))

    @property
    def row_height(self) -> int:
        """The ``height`` a row stores: 0 for a square image."""
        return 0 if self.square else self.height

    @property
    def square(self) -> bool:
        return self.height == self.width

    @property
    def side(self) -> float:
        """√(height·width): the square side of the same area (a resolution axis)."""
        return math.sqrt(self.height * self.width)

    def __str__(self) -> str:
        return str(self.width) if self.square else f"{self.height}x{self.width}"


def size_text(resolution: Any, height: Any = 0) -> str:
    """A row's image size as text: ``1024`` (square) or ``480x832`` (height × width)."""
    return str(Size.of_row(resolution, height))


@dataclass
class Result:
    """One measured (or skipped) point. Times in seconds, memory in bytes, FLOPs forward."""

    method: str
    options: str  # canonical JSON of the method's resolved options
    level: str  # one of SPEED_LEVELS, QUALITY_LEVEL or ZERO_SHOT_LEVEL
    resolution: int  # image width in px (the side of a square image)
    tokens: int
    batch: int
    dtype: str
    device: str
    model: str
    heads: int
    head_dim: int
    impl: str = ""
    #: fraction of query–key pairs computed exactly (softmax 1, LiT 0); NaN when unknown
    density: float = math.nan
    #: canonical JSON of the options after rounding, when they differ from ``options``
    effective: str = ""
    #: image height in px when it differs from ``resolution`` (the width); 0: square
    height: int = 0
    status: str = STATUS_OK
    reason: str = ""
    latency_median_s: float | None = None
    latency_p20_s: float | None = None
    latency_p80_s: float | None = None
    repetitions: int | None = None
    timer: str = ""
    peak_memory_bytes: float | None = None
    memory_meter: str = ""
    flops_actual: float | None = None
    flops_dense: float | None = None
    flops_counted: float | None = None
    tflops_achieved: float | None = None
    overhead_s: float | None = None
    overheads: str = "{}"  # JSON {name: seconds}, e.g. {"block_mask": 0.012}
    predicted_s: float | None = None
    predicted_bytes: float | None = None
    speedup_vs_softmax: float | None = None
    memory_ratio_vs_softmax: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: context parallelism (``run --context-parallel``): ranks, strategy, torch.distributed
    #: backend; one process: 1, "", ""
    world_size: int = 1
    strategy: str = ""
    dist_backend: str = ""
    #: bytes one rank sent per call (the most of any rank): counted, and the analytic model
    comm_bytes: float | None = None
    comm_bytes_model: float | None = None
    #: the one-process latency of the same point, and t₁ / (world_size · latency)
    latency_one_rank_s: float | None = None
    scaling_efficiency: float | None = None

    @property
    def size(self) -> Size:
        return Size.of_row(self.resolution, self.height)

    def key(self) -> tuple:
        return point_key(self.method, self.options, self.level, self.resolution, self.batch,
                         self.dtype, self.device, self.model, self.height,
                         self.world_size, self.strategy)

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["extra"] = json.dumps(self.extra, sort_keys=True, default=str)
        return row


COLUMNS = [f.name for f in fields(Result)]
#: the columns holding numbers (int or float fields of :class:`Result`)
NUMERIC_COLUMNS = [f.name for f in fields(Result)
                   if str(f.type).split(" | ")[0] in ("int", "float")]
#: columns added within schema 1, with a default: rows written before them still read
OPTIONAL_COLUMNS = {"density", "effective", "height", "world_size", "strategy", "dist_backend",
                    "comm_bytes", "comm_bytes_model", "latency_one_rank_s",
                    "scaling_efficiency"}


def point_key(method, options, level, resolution, batch, dtype, device, model,
              height=0, world_size=1, strategy="") -> tuple:
    """What identifies a point across runs (for resuming and comparing); ``height`` equal
    to ``resolution`` is the square image (0); a context-parallel point adds its world size
    and strategy (a one-process key is as before)."""
    key = (method, options, level, int(resolution), Size.of_row(resolution, height).row_height,
           int(batch), str(dtype), str(device), model)
    return (*key, int(world_size), strategy) if strategy else key


def canonical_options(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=str)


def label(method: str, options: str) -> str:
    """``clear:radius=16.0`` from a row's method and canonical options JSON.

    Text that is not an options JSON object is shown as it is (``method:text``).
    """
    try:
        opts = json.loads(options) if options else {}
    except (ValueError, TypeError):
        opts = None
    if not isinstance(opts, dict):
        return f"{method}:{options}" if options and options != "{}" else method
    return ":".join([method, *(f"{k}={v}" for k, v in sorted(opts.items()))])


def effective_label(method: str, options: str, effective: str = "",
                    density: float = math.nan) -> str:
    """The label of what ran: ``sla:topk=0.05 (kept 25%)`` when rounding changed the request.

    The requested label alone when the effective options equal the requested ones
    (or are unknown); the density in the parentheses when it is known, else the
    effective options.
    """
    requested = label(method, options)
    if not effective or effective == options:
        return requested
    try:
        known = math.isfinite(float(density))
    except (TypeError, ValueError):
        known = False
    ran = f"kept {float(density) * 100:.3g}%" if known else label(method, effective)
    return f"{requested} ({ran})"


class SchemaError(ValueError):
    """A results file from another attnbench version, or not a results file."""


class ResultsWriter:
    """Appends rows to a run directory and finalises the table."""

    def __init__(self, run_dir: Path | str, meta: dict[str, Any], *, force: bool = False,
                 command: str = "run") -> None:
        self.run_dir = Path(run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"cannot write to run directory {self.run_dir}: {err}") from None
        runfolder.lock_folder(self.run_dir, command)
        runfolder.claim_files(self.run_dir, RESULT_FILES, force=force, ours=_is_results_file)
        self.jsonl = self.run_dir / "results.jsonl"
        runfolder.repair_tail(self.jsonl)
        self.rows: list[Result] = load_rows(self.jsonl) if self.jsonl.exists() else []
        self._restore_from_table()
        meta_path = self.run_dir / "meta.json"
        previous = read_meta(meta_path) if meta_path.exists() else {}
        history = previous.get("history", [])
        if previous:
            history.append({k: previous.get(k) for k in ("command", "date", "git_revision")})
        self.meta = {**meta, "schema_version": SCHEMA_VERSION, "history": history}
        self.write_meta()

    def _restore_from_table(self) -> None:
        """Rows of ``results.json`` missing from ``results.jsonl`` (emptied or deleted by
        hand) are appended back, with a note, instead of being measured again and replaced."""
        path = self.run_dir / "results.json"
        try:
            table = json.loads(path.read_text())
            saved = [_result_from_row(row, f"{path} row {i}")
                     for i, row in enumerate(table["rows"], 1)]
        except (OSError, ValueError, KeyError, TypeError):
            return  # no table, or one of another version: the JSONL is all there is
        have = {r.key() for r in self.rows}
        missing = [r for r in saved if r.key() not in have]
        if not missing:
            return
        for result in missing:
            runfolder.append_jsonl(self.jsonl, result.as_row(), kept=self._kept())
            self.rows.append(result)
        print(f"attnbench: note: {self.jsonl} lacked {len(missing)} row(s) that results.json "
              "holds (the file was emptied or deleted): restored them from results.json, so "
              "those points are not measured again", file=sys.stderr, flush=True)

    def write_meta(self) -> None:
        runfolder.atomic_write(self.run_dir / "meta.json",
                               json.dumps(self.meta, indent=2, default=str), kept=self._kept())

    def _kept(self) -> str:
        return f"{len(self.rows)} rows kept in {self.jsonl.name}"

    def done(self, stated: Callable[[Result], Result] | None = None) -> set[tuple]:
        """Keys of points already measured to a final status (skipped on resume), of each
        row as ``stated`` says it (a row measured under an older default keeps its
        options: bench/sweep.py)."""
        rows = map(stated, self.rows) if stated else self.rows
        return {r.key() for r in rows if r.status in FINAL_STATUSES}

    def append(self, result: Result) -> None:
        """Persist one row at once (JSONL is the source of truth; CSV mirrors it). A row
        that replaces one of the same point (a rerun) rewrites the JSONL atomically, so the
        file holds one row a point, never the old one beside the new."""
        replaces = any(r.key() == result.key() for r in self.rows)
        rows = [r for r in self.rows if r.key() != result.key()] + [result]
        if replaces:
            text = "".join(json.dumps(r.as_row(), default=str) + "\n" for r in rows)
            runfolder.atomic_write(self.jsonl, text, kept=self._kept())
        else:
            runfolder.append_jsonl(self.jsonl, result.as_row(), kept=self._kept())
        self.rows = rows
        write_csv(self.run_dir / "results.csv", self.rows)

    def finalize(self) -> list[Result]:
        self.write_meta()
        add_ratios(self.rows)
        write_csv(self.run_dir / "results.csv", self.rows)
        table = {"schema_version": SCHEMA_VERSION, "meta": self.meta,
                 "rows": [r.as_row() for r in self.rows]}
        runfolder.atomic_write(self.run_dir / "results.json",
                               json.dumps(table, indent=2, default=str), kept=self._kept())
        try:
            to_dataframe(self.rows).to_parquet(self.run_dir / "results.parquet")
        except ImportError:  # pyarrow / fastparquet not installed: CSV and JSON suffice
            pass
        return self.rows


#: the files a results table consists of (claimed in its folder: see runfolder.claim_files)
RESULT_FILES = ("results.jsonl", "results.csv", "results.json", "results.parquet", "meta.json")


def _is_results_file(path: Path) -> bool:
    """A results file of a folder written before attnbench recorded its files."""
    try:
        if path.suffix == ".csv":
            header = set(path.open().readline().strip().split(","))
            return set(COLUMNS) - OPTIONAL_COLUMNS <= header <= set(COLUMNS)
        if path.suffix in (".json", ".jsonl"):
            first = path.open().readline() if path.suffix == ".jsonl" else path.read_text()
            data = json.loads(first)
            return isinstance(data, dict) and ("schema_version" in data or "method" in data)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return path.suffix == ".parquet" and (path.parent / "results.jsonl").exists()


def read_meta(path: Path) -> dict[str, Any]:
    """A run's ``meta.json``, checked: a JSON object of this schema version."""
    remedy = "restore it, delete it (the rows in results.jsonl are kept), or use another folder"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SchemaError(f"{path} is not readable JSON ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}): {remedy}") from None
    if not isinstance(data, dict):
        raise SchemaError(f"{path} holds a JSON {type(data).__name__}, not the object attnbench "
                          f"writes: {remedy}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise SchemaError(f"{path} has results schema {version!r}, this attnbench writes "
                          f"{SCHEMA_VERSION}: re-run into a new folder (or use the attnbench "
                          "version that made it)")
    return data


def write_csv(path: Path, rows: list[Result]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=COLUMNS)
            writer.writeheader()
            for r in rows:
                writer.writerow(r.as_row())

    runfolder.atomic_write(path, write, kept=f"{len(rows)} rows kept in results.jsonl")


def load_rows(path: Path) -> list[Result]:
    """Rows of a ``results.jsonl`` (the last row of a key wins), schema-checked."""
    rows: dict[tuple, Result] = {}
    for number, data in runfolder.read_jsonl(path):  # a row cut short is measured again
        if not isinstance(data, dict):
            raise SchemaError(f"{path}:{number} is not a results row (a JSON "
                              f"{type(data).__name__}): re-run the sweep into a new directory")
        result = _result_from_row(data, f"{path}:{number}")
        rows[result.key()] = result
    return list(rows.values())


def _result_from_row(data: dict[str, Any], where: str) -> Result:
    missing = [c for c in COLUMNS if c not in data and c not in OPTIONAL_COLUMNS]
    unknown = [c for c in data if c not in COLUMNS]
    if missing or unknown:
        raise SchemaError(
            f"{where} is not an attnbench {SCHEMA_VERSION} results row "
            f"(missing {missing[:5]}, unknown {unknown[:5]}): it was written by another "
            "attnbench version; re-run the sweep into a new directory"
        )
    data = dict(data)
    data["level"] = FORMER_LEVELS.get(data["level"], data["level"])
    extra = data.pop("extra")
    data["extra"] = json.loads(extra) if isinstance(extra, str) else (extra or {})
    return Result(**data)


def _baseline_key(r: Result) -> tuple:
    return (r.level, r.size, r.batch, r.dtype, r.device, r.model, r.world_size, r.strategy)


def add_ratios(rows: list[Result]) -> None:
    """Speedup and memory ratio against softmax at the same level/resolution/batch/dtype/device."""
    base: dict[tuple, Result] = {}
    for r in rows:
        if r.method == BASELINE_METHOD and r.status == STATUS_OK:
            base[_baseline_key(r)] = r
    for r in rows:
        ref = base.get(_baseline_key(r))
        r.speedup_vs_softmax = r.memory_ratio_vs_softmax = None
        if ref is None or r.status != STATUS_OK:
            continue
        if r.latency_median_s and ref.latency_median_s:
            r.speedup_vs_softmax = ref.latency_median_s / r.latency_median_s
        if r.peak_memory_bytes and ref.peak_memory_bytes:
            r.memory_ratio_vs_softmax = r.peak_memory_bytes / ref.peak_memory_bytes


def to_dataframe(rows: list[Result]):
    """The table as a pandas DataFrame (one column per ``Result`` field)."""
    import pandas as pd  # lazy: rows are read and written without pandas (a leaf module)

    frame = pd.DataFrame([r.as_row() for r in rows], columns=COLUMNS)
    return frame


def load_table(path: Path | str):
    """``(DataFrame, meta)`` of a run directory or a ``results.json`` file, schema-checked."""
    path = Path(path)
    if path.is_dir():
        # results.jsonl is the source of truth: results.json is only rewritten when a
        # command finishes, so after an interruption it misses the last rows measured
        if (path / "results.jsonl").exists():
            meta_path = path / "meta.json"
            meta = read_meta(meta_path) if meta_path.exists() else {}
            rows = load_rows(path / "results.jsonl")
            add_ratios(rows)
            return to_dataframe(rows), meta
        elif (path / "results.json").exists():
            path = path / "results.json"
        else:
            raise FileNotFoundError(f"{path} holds no results (results.json / results.jsonl)")
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SchemaError(f"{path} is not JSON: {err}") from None
    version = table.get("schema_version") if isinstance(table, dict) else None
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{path} has results schema {version!r}, this attnbench reads {SCHEMA_VERSION}: "
            "re-run the sweep with this version"
        )
    rows, meta = table.get("rows", []), table.get("meta", {})
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SchemaError(f"{path}: 'rows' is not a list of result rows: the file was damaged "
                          "or not written by attnbench; re-run the sweep")
    if not isinstance(meta, dict):
        raise SchemaError(f"{path}: 'meta' is not an object: the file was damaged or not "
                          "written by attnbench; re-run the sweep")
    rows = [_result_from_row(row, str(path)) for row in rows]
    return to_dataframe(rows), meta

