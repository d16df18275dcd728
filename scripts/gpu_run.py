#!/usr/bin/env python3
"""attnbench's GPU run, sized for one short lease: 520 s, at most 8 files back.

Stages, in priority order; each has a share of the run's time that it may not
exceed. A stage's deadline is the end of the run less the shares of the stages
after it, so time an earlier stage leaves unused goes to the next one, and no
stage eats into a later one's share. A stage that reaches its deadline is
stopped (SIGINT, then SIGTERM, then SIGKILL to its process group), recorded as
cut short, and the next stage starts.

1. ``kernels``   the Triton kernel tests compiled on the GPU (``KERNEL_TESTS``:
                 float32, float16 and bfloat16; bfloat16 is checked only there);
2. ``attention`` one attention layer at 8192 px with DiT-XL/2 shapes (262,144
                 tokens, 16 heads of 72), bfloat16, by ``attnbench run``: softmax
                 (SDPA as torch picks it), lit, clear r=8 and r=16, sla at 95% and 90%;
3. ``peers``     ``scripts/gpu_peers.py`` at the same point: each SDPA backend forced,
                 FlexAttention without a mask, flash-attn and xformers when importable
                 (the fastest exact kernel of stages 2-3 is every speed-up's baseline);
                 LiT vs fla's Triton kernel (causal, its only mode) and plain PyTorch;
                 SLA vs the official thu-ml/SLA kernel (``.peers/SLA``) at 95% and 90%;
                 CLEAR's paths forced at 8192 and 2048 px; each peer's error against a
                 float64 reference at 1024 px;
4. ``model``     one DiT-XL/2 denoising step at 8192 px (lit, clear r=8, sla 95%,
                 softmax), then at 4096 and 2048 px;
5. ``diffusers`` FLUX.1-dev shapes: model level at 1024/2048/4096 px and attention
                 at 8192 px with clear r=8/16 and softmax; Wan2.1-T2V-1.3B shapes
                 (81 frames, 480×832) attention with sla 95% against the exact
                 kernels. Only where the diffusers adapter, the zoo entries and
                 ``run``'s flags for them exist; otherwise skipped with the reason;
6. ``floors``    the device's ceilings (HBM copy bandwidth, bf16 matmul) and every
                 kernel's fraction of its floor (``FLOOR_MODULE``);
7. ``profile``   ``torch.profiler`` over the DiT target missed by most (``profile/``
                 in results.tar.gz, its table in the summary);

then the report of the stages' run folders and ``summary.md``: the targets of
``baselines/targets.csv`` as met / MISSED / not measured, the peers, beside the
published numbers. A FLUX.1-dev softmax step at 8192 px does not fit the lease:
that target stays "not measured".

Everything is written as it is measured: ``attnbench run`` appends each point to
its folder's ``results.jsonl``; after every stage the summary is rewritten and
the returned files are refreshed, so a run cut short (by a deadline, or by the
device call's own limit) still returns every finished point. A second call on
the same run folder resumes: jobs that completed are not run again (``--redo
STAGE`` forces one), and an interrupted ``attnbench run`` skips the points its
folder already holds.

The run folder (``--run-dir``, default ``reports/<gpu-name>/``) holds every
stage's output. Returned, into ``--return-dir`` (default ``$OUT``), always the
same six files, none in a folder: ``results.tar.gz`` (the whole run folder),
``summary.md``, ``gpu_run.log``, ``stages.json``, ``kernel_tests.txt`` and
``floor.md``.

The device call (the device tool's ``run`` verb), from the repository root::

    scripts/fetch_gpu_wheels.sh        # here, once: wheels into .whl/, the official SLA
                                       # source into .peers/ (both ignored, ~10 MiB)
    command:   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
               --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
               PYTHONUNBUFFERED=1 python3 scripts/gpu_run.py
    carry:     [".whl", ".peers"]
    timeout_s: 560

Back here, ``tar xzf <files_at>/results.tar.gz -C reports/`` restores the run
folder (``reports/nvidia-h200/``); a rerun sends it along (untracked files
travel) and resumes.

``--dry-run`` runs the same stages on the CPU in float32 with a tiny DiT and tiny
resolutions in about a minute (the tests run it). ``--plan`` runs nothing and
prints each stage's points and the time attnbench's FLOP/byte models predict for
them on an H200.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the targets' reader from this checkout (standard library only)

from attnbench.bench.targets import EXACT_METHODS, Target, load_targets  # noqa: E402
from attnbench.bench.targets import fastest_exact as fastest_of  # noqa: E402

# ---- where attnbench's pieces live: the one place to adjust when they move
#: the kernels against their floors (``measure --model --res --dtype --out``)
FLOOR_MODULE = "attnbench.bench.floor"
#: the kernel tests, compiled on a GPU (the interpreter on CPU)
KERNEL_TESTS = ("tests/attention/test_kernels.py",)
#: the diffusers adapter, and the zoo of diffusers configurations (module, names function)
DIFFUSERS_ADAPTER = "attnbench.integrations.diffusers"
DIFFUSERS_ZOO = ("attnbench.models.diffusers_configs", "diffusers_config_names")
#: the flags ``run --help`` must list for a diffusers model (FLUX) and for video (Wan)
DIFFUSERS_RUN_FLAG = "--model-path"
VIDEO_RUN_FLAG = "--frames"
PUBLISHED = REPO / "baselines" / "published.csv"
#: attnbench's kernels beside the peers, in one process; the peers' source it imports
PEERS_SCRIPT = REPO / "scripts" / "gpu_peers.py"
PEERS_DIR = REPO / ".peers"
#: peers the run cannot carry, and why (the summary lists them)
LEFT_OUT = (
    ("NATTEN (neighbourhood attention)", "no binary wheel on PyPI for CPython 3.12 (source "
     "only, built with nvcc); NATTEN's own wheels for torch 2.11 + CUDA 13.0 "
     "(natten==0.21.6+torch2110cu130) are served by whl.natten.org, which the machine that "
     "prepares the run cannot reach"),
    ("flash-attn", "no binary wheel on PyPI for CPython 3.12 (source only, built with nvcc: "
     "far longer than a lease); torch's SDPA flash backend stands in"),
)

#: the H200's ceilings for ``--plan``: copy bandwidth and bf16 matmul on random data,
#: as measured on such a machine (the device library's KINDS.md)
H200_BYTES_PER_S = 4.3e12
H200_FLOPS_PER_S = 790e12

#: flash, xformers and each SDPA backend are timed by the peers stage, beside the peers
ATTENTION_METHODS = ("softmax", "lit", "clear:radius=8", "sla:topk=0.05", "clear:radius=16",
                     "sla:topk=0.1")
#: the baseline last: the methods the targets name are measured first
MODEL_METHODS = ("lit", "clear:radius=8", "sla:topk=0.05", "softmax")
FLUX_METHODS = ("clear:radius=8", "clear:radius=16", "softmax")
WAN_METHODS = ("sla:topk=0.05", "flash", "softmax")

#: the files returned, always these six
RETURNED = ("results.tar.gz", "summary.md", "gpu_run.log", "stages.json", "kernel_tests.txt",
            "floor.md")
RETURN_FILE_LIMIT = 16 * 2**20
#: seconds a process gets to exit after SIGINT, then after SIGTERM
STOP_GRACE_S = (5.0, 3.0)
#: a job is not started with less time than this left
MIN_JOB_S = 1.0


@dataclass(frozen=True)
class Profile:
    """What a run measures: the device, the shapes, the points and the time."""

    name: str
    device: str
    dtype: str
    model: str
    attention_res: int
    attention_methods: tuple[str, ...]
    #: the peers stage: the size of its error checks, the sizes of CLEAR's paths, and
    #: whether FlexAttention is compiled (the CPU dry run compiles nothing)
    peers_check_res: int
    clear_res: tuple[int, ...]
    compile: bool
    model_res: int  # the resolution of the model-level targets, measured first
    model_more_res: tuple[int, ...]
    model_methods: tuple[str, ...]
    flux: str
    flux_model_res: tuple[int, ...]
    flux_attention_res: int
    wan: str
    wan_args: tuple[str, ...]  # how ``run`` is told the video's frames and size
    kernel_test_args: tuple[str, ...]
    #: whether env.txt records ``attnbench list`` on the device (which path runs, or why not)
    list_methods: bool
    total_s: float
    #: seconds an ``attnbench run`` needs before its first point (imports, device, calibration)
    startup_s: float
    #: ``run --budget``: the seconds one point may take (at most the time left in the stage),
    #: so that slow points take few repetitions and no point takes a stage's share alone
    point_budget_s: float


GPU = Profile(
    name="gpu", device="cuda", dtype="bfloat16", model="DiT-XL/2", attention_res=8192,
    attention_methods=ATTENTION_METHODS, peers_check_res=1024, clear_res=(8192, 2048),
    compile=True, model_res=8192, model_more_res=(4096, 2048),
    model_methods=MODEL_METHODS, flux="flux.1-dev", flux_model_res=(1024, 2048, 4096),
    flux_attention_res=8192, wan="wan2.1-t2v-1.3b",
    # Wan2.1's 480p: 81 frames of 480x832 px, 21 latent frames x 30x52 tokens
    wan_args=("--frames", "81", "--res", "480x832"), kernel_test_args=(), list_methods=True,
    total_s=520.0, startup_s=15.0, point_budget_s=60.0,
)
DRY_RUN = Profile(
    name="dry-run", device="cpu", dtype="float32", model="DiT-T/2", attention_res=128,
    attention_methods=("softmax", "lit", "sla:topk=0.05", "flash"),  # no FlexAttention compile
    peers_check_res=128, clear_res=(128,), compile=False, model_res=32, model_more_res=(),
    model_methods=("lit", "softmax"), flux="flux-tiny",
    flux_model_res=(32, 64), flux_attention_res=64, wan="wan-tiny",
    wan_args=("--frames", "5", "--res", "32x48"),
    kernel_test_args=("-k", "head_tiles or head_pieces or availability"), list_methods=False,
    total_s=240.0, startup_s=3.0, point_budget_s=20.0,
)


# ------------------------------------------------------------------ results rows


def point_key(row: dict[str, Any]) -> tuple:
    """What identifies a point in a results table (as ``attnbench run`` resumes by)."""
    return (*(str(row.get(k)) for k in ("method", "options", "level", "batch", "dtype",
                                        "device", "model")), size_of(row))


def size_of(row: dict[str, Any]) -> str:
    """A row's image size as ``--res`` names it: ``1024`` (square) or ``480x832`` (what
    ``attnbench.results.size_text`` says; the run itself imports of attnbench only the
    standard-library targets reader -- ``--plan`` more -- so a broken install fails a
    stage's subprocess, not the run)."""
    width, height = row.get("resolution"), row.get("height") or 0
    return str(width) if not height or str(height) == str(width) else f"{height}x{width}"


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run folder's ``results.jsonl``, the last of each point (stdlib only)."""
    path = run_dir / "results.jsonl"
    if not path.exists():
        return []
    rows: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a row cut short by a stop: measured again on resume
        if isinstance(row, dict):
            rows[point_key(row)] = row
    return list(rows.values())


FINAL = ("ok", "skipped", "oom", "unavailable")


def repair_tail(run_dir: Path, name: str = "results.jsonl") -> bool:
    """Drop a partial last line a stopped writer left in ``name`` (True if one was)."""
    path = run_dir / name
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    with path.open("r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
    return True


def read_peers(folder: Path) -> list[dict[str, Any]]:
    """The peers stage's rows (``peers.jsonl``), the last of each ``key``."""
    path = folder / "peers.jsonl"
    rows: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict) and "key" in row:
                    rows[row["key"]] = row
    return list(rows.values())


def options_of(row: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(row.get("options") or "{}")
    except json.JSONDecodeError:
        return {}


def label_of(row: dict[str, Any]) -> str:
    opts = options_of(row)
    return ":".join([row["method"], *(f"{k}={v}" for k, v in sorted(opts.items()))])


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"clear:radius=8"`` → ``("clear", {"radius": "8"})``."""
    name, *pairs = spec.split(":")
    return name, dict(p.split("=", 1) for p in pairs)


def matches(row: dict[str, Any], spec: str) -> bool:
    """Whether a row is the method variant ``spec`` (option values compared as numbers)."""
    name, wanted = parse_spec(spec)
    if row.get("method") != name:
        return False
    have = options_of(row)
    for key, value in wanted.items():
        if key not in have:
            return False
        try:
            if not math.isclose(float(have[key]), float(value), rel_tol=1e-9):
                return False
        except (TypeError, ValueError):
            if str(have[key]) != value:
                return False
    return True


# ------------------------------------------------------------------ jobs and stages


@dataclass
class Job:
    """One subprocess of a stage; ``run_dir`` is the folder it fills (an attnbench run
    folder, or the peers' ``peers.jsonl``)."""

    name: str
    argv: list[str]
    run_dir: Path | None = None
    planned: int = 0
    #: ``--budget`` set at launch: "point" (``attnbench run``: the seconds one point may
    #: take, at most the time left in the stage) or "stage" (the time left in the stage)
    budget: str = ""
    #: where its output goes besides the log (the kernel tests' report)
    output: Path | None = None
    #: its rows are the peers' (``peers.jsonl``, one per ``key``), not ``attnbench run``'s
    peers: bool = False


@dataclass
class JobRecord:
    name: str
    status: str = "not started"  # done | failed | cut short | not started | skipped
    rc: int | None = None
    reason: str = ""
    elapsed_s: float = 0.0
    budget_s: float | None = None
    planned: int = 0
    final: int = 0
    ok: int = 0
    new: int = 0
    resumed: int = 0
    earlier: bool = False  # kept from an earlier call, not run again


@dataclass
class StageRecord:
    key: str
    title: str
    status: str = "not started"
    reason: str = ""
    elapsed_s: float = 0.0
    allowed_s: float = 0.0
    jobs: list[JobRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    key: str
    title: str
    share: float  # of the run's total seconds
    jobs: Callable[[Context], list[Job] | str]  # the jobs, or why the stage is skipped


@dataclass
class Outcome:
    rc: int | None
    cut: bool
    elapsed_s: float
    tail: list[str]


class Log:
    """Lines to stdout and to every log file, flushed at once (a cut run keeps them)."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.files = []
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.files.append(path.open("a", buffering=1))
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            for line in text.splitlines() or [""]:
                print(line, flush=True)
                for f in self.files:
                    f.write(line + "\n")


_CURRENT: list[subprocess.Popen] = []


def stop(proc: subprocess.Popen) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the job's process group, each after a grace."""
    for sig, grace in ((signal.SIGINT, STOP_GRACE_S[0]), (signal.SIGTERM, STOP_GRACE_S[1]),
                       (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_job(argv: list[str], *, deadline: float, log: Log, env: dict[str, str] | None = None,
            cwd: Path = REPO, prefix: str = "", output: Path | None = None) -> Outcome:
    """Run ``argv`` until it exits or ``deadline`` (``time.monotonic()``) passes.

    Its output goes to the log line by line (and to ``output``); at the deadline its
    process group is stopped. The job gets its own process group (not its own
    session), so that whatever ends this script ends the job too.
    """
    started = time.monotonic()
    if deadline - started < MIN_JOB_S:
        return Outcome(None, True, 0.0, [])
    tail: collections.deque[str] = collections.deque(maxlen=30)
    sink = output.open("w", buffering=1) if output else None
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, process_group=0)
    _CURRENT.append(proc)

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            log(prefix + line)
            tail.append(line)
            if sink:
                sink.write(line + "\n")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    cut = False
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        cut = True
        log(f"{prefix}-- deadline reached: stopping the job")
        stop(proc)
    reader.join(timeout=5)
    _CURRENT.remove(proc)
    if sink:
        sink.close()
    return Outcome(proc.returncode, cut, time.monotonic() - started, list(tail))


# ------------------------------------------------------------------ the context


@dataclass
class Context:
    profile: Profile
    run_dir: Path
    return_dir: Path | None
    caps: dict[str, Any]
    log: Log
    t0: float
    shares: dict[str, float]  # seconds per stage
    caps_s: dict[str, float]  # hard caps from --stage-seconds
    redo: set[str]
    report: bool
    argv: list[str]
    records: dict[str, StageRecord] = field(default_factory=dict)
    previous: dict[str, dict] = field(default_factory=dict)  # stages.json of earlier calls

    @property
    def t_end(self) -> float:
        return self.t0 + self.profile.total_s

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH"))
                                            if p)
        env["PYTHONUNBUFFERED"] = "1"
        if self.profile.device != "cpu":
            env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
        return env

    def run_argv(self, folder: str, level: str, res: Iterable[int | str], methods: Iterable[str],
                 *, model: str | None = None, extra: Iterable[str] = ()) -> tuple[list[str], Path]:
        run_dir = self.run_dir / folder
        argv = [sys.executable, "-m", "attnbench", "run", "--device", self.profile.device,
                "--dtype", self.profile.dtype, "--model", model or self.profile.model,
                "--level", level, "--methods", ",".join(methods), "--out", str(run_dir),
                "--no-progress", "--no-report"]
        res = ",".join(str(r) for r in res)
        if res:
            argv += ["--res", res]
        return argv + list(extra), run_dir


def _run_job(ctx: Context, name: str, folder: str, level: str, res: Iterable[int],
             methods: tuple[str, ...], **kw: Any) -> Job:
    """An ``attnbench run`` job; ``res`` empty when ``extra`` gives the size."""
    res = list(res)
    argv, run_dir = ctx.run_argv(folder, level, res, methods, **kw)
    return Job(name, argv, run_dir, planned=max(1, len(res)) * len(methods), budget="point")


def kernel_jobs(ctx: Context) -> list[Job] | str:
    missing = [t for t in KERNEL_TESTS if not (REPO / t).exists()]
    if missing:
        return f"kernel tests not found: {', '.join(missing)} (adjust KERNEL_TESTS)"
    argv = [sys.executable, "-m", "pytest", *KERNEL_TESTS, "-q", "-rfE", "-p", "no:cacheprovider",
            *ctx.profile.kernel_test_args]
    workers = min(8, (os.cpu_count() or 1) // 2)
    if ctx.caps.get("xdist") and ctx.profile.device != "cpu" and workers > 1:
        argv += ["-n", str(workers)]  # compilation is CPU-bound; the GPU has room
    return [Job("pytest", argv, output=ctx.run_dir / "kernel_tests.txt")]


def attention_jobs(ctx: Context) -> list[Job]:
    p = ctx.profile
    return [_run_job(ctx, f"{p.model} attention {p.attention_res}px", "attention", "attention",
                     [p.attention_res], p.attention_methods)]


def model_jobs(ctx: Context) -> list[Job]:
    p = ctx.profile
    jobs = [_run_job(ctx, f"{p.model} model {p.model_res}px", "model", "model", [p.model_res],
                     p.model_methods)]
    if p.model_more_res:
        # the baseline first at the smaller sizes: cheap there, and every speed-up needs it
        jobs.append(_run_job(ctx, f"{p.model} model {'/'.join(map(str, p.model_more_res))}px",
                             "model", "model", p.model_more_res,
                             p.model_methods[-1:] + p.model_methods[:-1]))
    return jobs


def diffusers_jobs(ctx: Context) -> list[Job] | str:
    p, caps = ctx.profile, ctx.caps
    if caps.get("adapter_error"):
        return f"the diffusers adapter is not available: {caps['adapter_error']}"
    zoo = caps.get("zoo") or []
    help_text = caps.get("run_help", "")
    jobs: list[Job] = []
    reasons = []
    if p.flux not in zoo:
        reasons.append(f"the zoo has no {p.flux!r} ({caps.get('zoo_error') or 'not listed'})")
    elif DIFFUSERS_RUN_FLAG not in help_text:
        reasons.append(f"`attnbench run` has no {DIFFUSERS_RUN_FLAG}: diffusers models are not "
                       "wired into run yet")
    else:
        jobs.append(_run_job(ctx, f"{p.flux} attention", "flux-attention", "attention",
                             [p.flux_attention_res], FLUX_METHODS, model=p.flux))
    if p.wan not in zoo:
        reasons.append(f"the zoo has no {p.wan!r}")
    elif VIDEO_RUN_FLAG not in help_text:
        reasons.append(f"`attnbench run` has no {VIDEO_RUN_FLAG}: video is not wired into run yet")
    else:
        jobs.append(_run_job(ctx, f"{p.wan} attention", "wan-attention", "attention", (),
                             WAN_METHODS, model=p.wan, extra=p.wan_args))
    if p.flux in zoo and DIFFUSERS_RUN_FLAG in help_text:
        # the costliest last: a 12 B-parameter step per point, softmax at 4096 px
        jobs.append(_run_job(ctx, f"{p.flux} model", "flux-model", "model", p.flux_model_res,
                             FLUX_METHODS, model=p.flux))
    if not jobs:
        return "; ".join(reasons)
    for reason in reasons:
        ctx.log(f"   part of the stage skipped: {reason}")
    return jobs


def peers_jobs(ctx: Context) -> list[Job] | str:
    if not PEERS_SCRIPT.exists():
        return f"{_short(str(PEERS_SCRIPT))} not found (adjust PEERS_SCRIPT)"
    p = ctx.profile
    argv = [sys.executable, str(PEERS_SCRIPT), "--device", p.device, "--dtype", p.dtype,
            "--model", p.model, "--res", str(p.attention_res), "--check-res",
            str(p.peers_check_res), "--clear-res", ",".join(map(str, p.clear_res)),
            "--out", str(ctx.run_dir / "peers"), "--peers-dir", str(PEERS_DIR)]
    if not p.compile:
        argv.append("--no-compile")
    return [Job("peers", argv, ctx.run_dir / "peers", budget="stage", peers=True)]


def floor_jobs(ctx: Context) -> list[Job] | str:
    if not ctx.caps.get("floor_module"):
        return f"{FLOOR_MODULE} not found (adjust FLOOR_MODULE)"
    if not ctx.caps.get("cuda"):
        return "needs a CUDA GPU: the floors are measured on the GPU's own kernels"
    p = ctx.profile
    argv = [sys.executable, "-m", FLOOR_MODULE, "measure", "--model", p.model, "--res",
            str(p.attention_res), "--dtype", p.dtype, "--out", str(ctx.run_dir / "floor")]
    return [Job("floor measure", argv)]


def profile_jobs(ctx: Context) -> list[Job] | str:
    """torch.profiler over the target missed by most (the floor module's ``profile``)."""
    if not ctx.caps.get("floor_module"):
        return f"{FLOOR_MODULE} not found (adjust FLOOR_MODULE)"
    verdicts = [judge(ctx, t) for t in TARGETS]
    missed = [v for v in verdicts if v.verdict == "MISSED" and v.target.profile
              and v.model.lower().startswith("dit")]  # the profiler builds DiT points only
    if not missed:
        judged = [v for v in verdicts if v.verdict in ("met", "MISSED")]
        return ("no DiT target was missed" if judged else "no target was measured") + \
            " (nothing to profile)"
    worst = min(missed, key=lambda v: v.score)
    level = "model" if worst.target.level == "model" else "attention"
    out = ctx.run_dir / "profile"
    out.mkdir(parents=True, exist_ok=True)
    (out / "target.txt").write_text(f"{worst.target.name}: {worst.measured}, required "
                                    f"{worst.required}; profiled: {worst.target.profile} at "
                                    f"{level} level, {worst.model} {worst.res} px\n")
    p = ctx.profile
    argv = [sys.executable, "-m", FLOOR_MODULE, "profile", "--model", worst.model, "--res",
            str(worst.res), "--level", level, "--method", worst.target.profile, "--dtype",
            p.dtype, "--device", p.device, "--calls", "1" if level == "model" else "3",
            "--out", str(out)]
    return [Job("profile", argv)]


STAGES = (
    Stage("kernels", "kernel tests compiled on the device (fp32, fp16, bf16)", 0.10, kernel_jobs),
    Stage("attention", "attention level at the largest size: softmax vs lit/clear/sla", 0.14,
          attention_jobs),
    Stage("peers", "attnbench's kernels beside the peers: each SDPA backend, flex, fla, xformers, "
          "the official SLA kernel, CLEAR's paths", 0.20, peers_jobs),
    Stage("model", "model level: one denoising step, the largest size first", 0.26, model_jobs),
    Stage("diffusers", "FLUX.1-dev and Wan2.1-1.3B shapes (diffusers adapter)", 0.12,
          diffusers_jobs),
    Stage("floors", "device ceilings and each kernel's fraction of its floor", 0.09, floor_jobs),
    Stage("profile", "torch.profiler over the target missed by most", 0.03, profile_jobs),
)
#: the rest of the time: the report of every stage's folder, the summary, the packing
REPORT_SHARE = 1.0 - sum(s.share for s in STAGES)


# ------------------------------------------------------------------ running a stage


def stage_deadline(ctx: Context, index: int, started: float) -> float:
    """The run's end less the shares of the later stages (and the report); ``--stage-seconds``
    caps a stage from its start."""
    later = sum(ctx.shares[s.key] for s in STAGES[index + 1:]) + REPORT_SHARE * ctx.profile.total_s
    deadline = ctx.t_end - later
    cap = ctx.caps_s.get(STAGES[index].key)
    if cap is not None:
        deadline = min(deadline, started + cap)
    return deadline


def _flag(job: Job, flag: str) -> str:
    return job.argv[job.argv.index(flag) + 1] if flag in job.argv else ""


def _methods_of(job: Job) -> list[str]:
    return _flag(job, "--methods").split(",")


def _level_of(job: Job) -> str:
    return _flag(job, "--level")


def _res_of(job: Job) -> set[str]:
    return set(_flag(job, "--res").split(","))


def _job_rows(job: Job) -> list[dict[str, Any]]:
    """The rows of ``job``'s points in its folder (several jobs may share one folder)."""
    if job.run_dir is None:
        return []
    if job.peers:
        return read_peers(job.run_dir)
    res = _res_of(job)
    return [r for r in read_rows(job.run_dir)
            if r.get("level") == _level_of(job) and any(matches(r, m) for m in _methods_of(job))
            and size_of(r) in res]


def _key(job: Job, row: dict[str, Any]) -> tuple:
    return (row.get("key"),) if job.peers else point_key(row)


def _count(job: Job, jr: JobRecord, rows: list[dict[str, Any]]) -> None:
    jr.final = sum(r.get("status") in FINAL for r in rows)
    jr.ok = sum(r.get("status") == "ok" for r in rows)
    if job.peers:  # the script knows its peers: each gets a row, measured or not
        jr.planned = len(rows)


def run_stage(ctx: Context, index: int) -> StageRecord:
    stage = STAGES[index]
    started = time.monotonic()
    deadline = stage_deadline(ctx, index, started)
    record = StageRecord(stage.key, stage.title, allowed_s=round(max(0.0, deadline - started), 1))
    ctx.records[stage.key] = record
    ctx.log(f"\n== [{index + 1}/{len(STAGES)}] {stage.key}: {stage.title} "
            f"(at {started - ctx.t0:.0f} s; {record.allowed_s:.0f} s allowed, "
            f"run ends by {ctx.profile.total_s:.0f} s)")
    jobs = stage.jobs(ctx)
    if isinstance(jobs, str):
        record.status, record.reason = "skipped", jobs
        ctx.log(f"   skipped: {jobs}")
        return record
    earlier = {j["name"]: j for j in ctx.previous.get(stage.key, {}).get("jobs", [])}
    for job in jobs:
        jr = JobRecord(job.name, planned=job.planned)
        record.jobs.append(jr)
        prior = earlier.get(job.name)
        if prior and stage.key not in ctx.redo and _complete(stage.key, prior):
            kept = {k: v for k, v in prior.items() if k in JobRecord.__dataclass_fields__}
            jr.__dict__.update(kept)
            jr.earlier = True
            if job.run_dir is not None:
                _count(job, jr, _job_rows(job))
                jr.new, jr.resumed = 0, jr.final
            ctx.log(f"   {job.name}: {jr.status} in an earlier call; not run again "
                    f"(--redo {stage.key} runs it)")
            continue
        before = {_key(job, r): r for r in _job_rows(job)}
        argv = list(job.argv)
        if job.budget:
            left = deadline - time.monotonic() - ctx.profile.startup_s
            cap = ctx.profile.point_budget_s if job.budget == "point" else left
            jr.budget_s = round(max(5.0, min(cap, left)), 1)
            argv += ["--budget", f"{jr.budget_s:g}"]
        ctx.log(f"   {job.name}: {' '.join(_short(a) for a in argv)}")
        out = run_job(argv, deadline=deadline, log=ctx.log, env=ctx.env(),
                      prefix=f"   [{stage.key}] ", output=job.output)
        jr.rc, jr.elapsed_s = out.rc, round(out.elapsed_s, 1)
        rows_file = "peers.jsonl" if job.peers else "results.jsonl"
        if job.run_dir is not None and repair_tail(job.run_dir, rows_file):
            ctx.log(f"   {job.name}: dropped a partial last row of {rows_file}")
        rows = _job_rows(job)
        _count(job, jr, rows)
        old = {k for k, r in before.items() if r.get("status") in FINAL}
        jr.resumed = sum(_key(job, r) in old for r in rows if r.get("status") in FINAL)
        jr.new = jr.final - jr.resumed
        if out.rc is None and out.cut:
            jr.status, jr.reason = "not started", "no time left in the stage"
        elif out.cut:
            jr.status = "cut short"
            jr.reason = f"stopped at the stage's deadline after {jr.elapsed_s:g} s"
        elif out.rc == 0:
            jr.status = "done"
        else:
            jr.status = "failed"
            jr.reason = f"exit {out.rc}: " + _last_error(out.tail)
        if stage.key == "kernels":
            jr.reason = (_pytest_summary(out.tail) or jr.reason) if not out.cut else jr.reason
        ctx.log(f"   {job.name}: {jr.status}"
                + (f" ({jr.ok} ok / {jr.planned} points; {jr.new} new, {jr.resumed} resumed)"
                   if job.run_dir is not None else "")
                + (f" -- {jr.reason}" if jr.reason else ""))
    record.elapsed_s = round(time.monotonic() - started, 1)
    record.status = _stage_status(record)
    return record


def _complete(stage: str, prior: dict[str, Any]) -> bool:
    """A job an earlier call finished: run (exit 0), or the tests ran to the end (exit 1)."""
    if prior.get("status") == "done":
        return True
    return stage == "kernels" and prior.get("status") == "failed" and prior.get("rc") == 1


def _stage_status(record: StageRecord) -> str:
    statuses = [j.status for j in record.jobs]
    if any(s in ("cut short", "not started") for s in statuses):
        return "cut short"
    if any(s == "failed" for s in statuses):
        return "failed"
    if record.jobs and all(j.earlier for j in record.jobs):
        return "done earlier"
    return "done"


def _short(arg: str) -> str:
    return os.path.relpath(arg, REPO) if os.path.isabs(arg) and arg.startswith(str(REPO)) else arg


def _last_error(tail: list[str]) -> str:
    lines = [t.strip() for t in tail if t.strip()]
    errors = [t for t in lines if "error" in t.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def _pytest_summary(tail: list[str]) -> str:
    for line in reversed(tail):
        if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", line):
            return line.strip("= ").strip()
    return ""


# ------------------------------------------------------------------ the summary


TARGETS = load_targets()


@dataclass(frozen=True)
class Verdict:
    """A target judged on this run's rows."""

    target: Target
    model: str
    res: int
    measured: str
    verdict: str  # met | MISSED | not measured (why)
    score: float | None = None  # what was achieved over what is required

    @property
    def required(self) -> str:
        t = self.target
        return f"≥ {t.minimum:.0%}" if t.kind == "bandwidth" else f"≥ {t.minimum:g}×"


def px(row: dict[str, Any]) -> int:
    """A row's resolution in px (-1 when it is not one number)."""
    try:
        return int(row.get("resolution"))
    except (TypeError, ValueError):
        return -1


def target_point(profile: Profile, t: Target) -> tuple[str, int]:
    """Where a target is judged: its own point on the GPU; the dry run's stand-in there."""
    if profile.name == GPU.name:
        return t.model, t.resolution
    if t.stage == "flux-model":
        return profile.flux, max(profile.flux_model_res)
    return profile.model, profile.model_res if t.stage == "model" else profile.attention_res


def exact_rows(ctx: Context, stage: str, level: str, res: int) -> list[tuple[float, str]]:
    """``(seconds, name)`` of every exact kernel timed at a point: ``attnbench run``'s rows of
    the stage (softmax, flash, xformers) and, at attention level, the peers stage's exact
    group (each SDPA backend, FlexAttention without a mask, flash-attn, xformers)."""
    found = [(r["latency_median_s"], f"{label_of(r)} [{r.get('impl', '')}]")
             for r in read_rows(ctx.run_dir / stage)
             if r.get("method") in EXACT_METHODS and r.get("status") == "ok"
             and r.get("level") == level and px(r) == res and r.get("latency_median_s")]
    if level == "attention" and stage in ("attention", "peers"):
        found += [(r["latency_median_s"], r["key"].split("/")[1])
                  for r in read_peers(ctx.run_dir / "peers")
                  if r.get("group") == "exact" and r.get("status") == "ok" and px(r) == res]
    return found


def fastest_exact(ctx: Context, stage: str, level: str, res: int) -> tuple[float, str] | None:
    """The baseline of every speed-up: the fastest exact kernel timed at the point."""
    return fastest_of(exact_rows(ctx, stage, level, res))


def _why_not(row: dict[str, Any] | None, what: str) -> str:
    if row is None:
        return f"no {what} row"
    return f"{what}: {row.get('status')} ({(row.get('reason') or '')[:120]})"


def judge(ctx: Context, t: Target) -> Verdict:
    model, res = target_point(ctx.profile, t)
    if t.kind == "bandwidth":
        return _judge_bandwidth(ctx, t, model, res)
    if t.kind == "peer":
        rows = {r["key"]: r for r in read_peers(ctx.run_dir / "peers") if px(r) == res}
        mine, theirs = rows.get(t.spec), rows.get(t.baseline)
        for row, what in ((mine, t.spec), (theirs, t.baseline)):
            if row is None or row.get("status") != "ok":
                return Verdict(t, model, res, "–", f"not measured ({_why_not(row, what)})")
        ratio = theirs["latency_median_s"] / mine["latency_median_s"]
        note = "; not the same function: " + theirs["label"].split(",")[1].strip() \
            if "causal" in theirs["label"] else ""
        return Verdict(t, model, res,
                       f"{ratio:.2f}× ({t.spec} {mine['latency_median_s'] * 1e3:.3f} ms, "
                       f"{t.baseline} {theirs['latency_median_s'] * 1e3:.3f} ms{note})",
                       "met" if ratio >= t.minimum else "MISSED", ratio / t.minimum)
    rows = read_rows(ctx.run_dir / t.stage)
    mine = [r for r in rows if matches(r, t.spec) and r.get("level") == t.level and px(r) == res]
    row = mine[-1] if mine else None
    if row is None or row.get("status") != "ok":
        return Verdict(t, model, res, "–", f"not measured ({_why_not(row, t.spec)} at {res} px)")
    base = fastest_exact(ctx, t.stage, t.level, res)
    if base is None:
        exact = [r for r in rows if r.get("method") in EXACT_METHODS
                 and r.get("level") == t.level and px(r) == res]
        why = "; ".join(_why_not(r, r["method"]) for r in exact) or "no exact-kernel row"
        return Verdict(t, model, res, f"{t.spec} {row['latency_median_s'] * 1e3:.3f} ms",
                       f"not measured (baseline: {why})")
    speedup = base[0] / row["latency_median_s"]
    return Verdict(t, model, res,
                   f"{speedup:.1f}× ({t.spec} [{row.get('impl', '')}] "
                   f"{row['latency_median_s'] * 1e3:.3f} ms, fastest exact {base[1]} "
                   f"{base[0] * 1e3:.3f} ms)",
                   "met" if speedup >= t.minimum else "MISSED", speedup / t.minimum)


def _judge_bandwidth(ctx: Context, t: Target, model: str, res: int) -> Verdict:
    floor = _floor_data(ctx)
    kernel = next((k for k in (floor or {}).get("kernels", []) if k.get("kernel") == t.spec),
                  None)
    if kernel is None or kernel.get("fraction_of_floor") is None:
        why = (kernel or {}).get("error") or ctx.records.get("floors", StageRecord("", "")).reason \
            or "no floor.json"
        return Verdict(t, model, res, "–", f"not measured ({why})")
    frac = kernel["fraction_of_floor"]
    bw = floor["ceilings"]["hbm_bytes_per_s"]
    return Verdict(t, model, res,
                   f"{frac:.0%} ({kernel['median_s'] * 1e3:.3f} ms; floor "
                   f"{kernel['floor_s'] * 1e3:.3f} ms at {bw / 1e12:.2f} TB/s measured)",
                   "met" if frac >= t.minimum else "MISSED", frac / t.minimum)


def target_rows(ctx: Context) -> list[list[str]]:
    p = ctx.profile
    return [[v.target.name, f"{v.model}, {v.res} px, {v.target.level} level, {p.dtype}",
             v.measured, v.required, v.verdict] for v in map(partial(judge, ctx), TARGETS)]


def _floor_data(ctx: Context) -> dict[str, Any] | None:
    path = ctx.run_dir / "floor" / "floor.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def published_rows() -> list[list[str]]:
    """The published speed claims (``baselines/published.csv``): other settings, labelled."""
    if not PUBLISHED.exists():
        return []
    with PUBLISHED.open() as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] in ("speedup", "latency")
                and r["method"] in ("lit", "clear", "sla", "softmax")
                and r["level"] in ("attention", "model", "end-to-end")]
    return [[r["method"] + (f" ({r['options']})" if r["options"] else ""), r["model"],
             r["setting"], r["resolution"] or "–", r["level"], r["metric"],
             f"{r['value']} {r['unit']}".strip(), r["source"], r["provenance"]] for r in rows]


def flux_comparison(ctx: Context) -> list[list[str]]:
    """CLEAR r=8 on FLUX.1-dev: one step measured here vs the published whole generation."""
    rows = read_rows(ctx.run_dir / "flux-model")
    if not rows or not PUBLISHED.exists():
        return []
    with PUBLISHED.open() as f:
        published = {int(r["resolution"]): r["value"] for r in csv.DictReader(f)
                     if r["method"] == "clear" and r["metric"] == "speedup"
                     and r["model"] == "FLUX.1-dev" and r["resolution"]}
    out = []
    for res in sorted(set(ctx.profile.flux_model_res) | set(published)):
        base = fastest_exact(ctx, "flux-model", "model", res)
        clear = [r for r in rows if matches(r, "clear:radius=8") and r.get("status") == "ok"
                 and px(r) == res]
        measured = (f"{base[0] / clear[0]['latency_median_s']:.2f}× (vs {base[1]})"
                    if base and clear else "not measured")
        out.append([str(res), measured, f"{published.get(res, '–')}×"])
    return out


def peers_section(ctx: Context) -> list[str]:
    """Every peer by group: latency, speed-up over the fastest exact kernel (named), the
    error check; CLEAR's paths: which is fastest at each size; the peers left out."""
    rows = read_peers(ctx.run_dir / "peers")
    lines = ["", "## Peers", ""]
    if not rows:
        r = ctx.records.get("peers")
        lines.append(f"Not measured: {(r.reason if r else '') or 'the stage has not run'}.")
    groups = {"exact": "Exact attention (the fastest is the baseline)", "lit": "LiT",
              "sla": "SLA (equal settings: the official main branch's)",
              "clear": "CLEAR: each path forced"}
    for group, title in groups.items():
        mine = sorted((r for r in rows if r.get("group") == group),
                      key=lambda r: (-px(r), r["key"]))
        if not mine:
            continue
        table = []
        for r in mine:
            lat = r.get("latency_median_s")
            base = fastest_exact(ctx, "peers", "attention", px(r))
            vs = f"{base[0] / lat:.1f}× vs {base[1]} ({base[0] * 1e3:.3f} ms)" if base and lat \
                else "–"
            check = r.get("check") or {}
            err = (f"max {check['max_abs_err']:.1e}, rel {check['rel_l2_err']:.1e} at "
                   f"{check['res']} px" + ("" if check.get("against", "").startswith(
                       "attnbench's float64") else f" ({check['against']})")) if check else "–"
            what = r["label"] + (f" -- {r['reason']}" if r.get("reason") else "")
            table.append([r["key"], size_of(r), r["status"], f"{lat * 1e3:.3f}" if lat else "–",
                          vs, err, what[:400]])
        lines += ["", f"### {title}", ""]
        lines += md_table(["peer", "px", "status", "median ms", "vs fastest exact",
                           "error vs float64 reference", "what ran"], table)
    winners = []
    for res in sorted({px(r) for r in rows if r.get("group") == "clear"}, reverse=True):
        for spec in sorted({r.get("spec", "") for r in rows if r.get("group") == "clear"}):
            ok = [r for r in rows if r.get("group") == "clear" and px(r) == res
                  and r.get("spec") == spec and r.get("status") == "ok"]
            if ok:
                best = min(ok, key=lambda r: r["latency_median_s"])
                others = ", ".join(f"{r['options']['impl']} {r['latency_median_s'] * 1e3:.2f} ms"
                                   for r in ok if r is not best) or "no other path ran"
                winners.append(f"- {res} px, {spec}: **{best['options']['impl']}** "
                               f"{best['latency_median_s'] * 1e3:.2f} ms ({others})")
    if winners:
        lines += ["", "CLEAR's fastest path at each size:", "", *winners]
    lines += ["", "Left out:", ""]
    lines += [f"- {name}: {why}" for name, why in LEFT_OUT]
    return lines


def profile_section(ctx: Context) -> list[str]:
    """The profile of the target missed by most (``profile/profile.md``), if one was taken."""
    folder = ctx.run_dir / "profile"
    r = ctx.records.get("profile")
    if not (folder / "profile.md").exists():
        why = (r.reason if r else "") or "the stage has not run"
        return ["", "## Where the time went (profile of the target missed by most)", "",
                f"No profile: {why}."]
    target = (folder / "target.txt").read_text().strip() if (folder / "target.txt").exists() \
        else ""
    body = (folder / "profile.md").read_text().split("\n", 1)[1]  # its own title dropped
    return ["", "## Where the time went (profile of the target missed by most)", "", target,
            body.rstrip(), "", "The trace: `profile/trace.json.gz` in results.tar.gz."]


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(x) for x in r) + " |" for r in rows)]


def point_rows(ctx: Context) -> list[list[str]]:
    out = []
    for folder in ("attention", "model", "flux-model", "flux-attention", "wan-attention"):
        rows = read_rows(ctx.run_dir / folder)
        for r in sorted(rows, key=lambda r: (px(r), r["level"])):
            base = fastest_exact(ctx, folder, r["level"], px(r))
            lat = r.get("latency_median_s")
            vs = (f"{base[0] / lat:.1f}× ({base[1]})" if base and lat and r["status"] == "ok"
                  else "–")
            out.append([folder, label_of(r), r["level"], size_of(r), r["status"],
                        f"{lat * 1e3:.3f}" if lat else "–", vs, r.get("impl", ""),
                        r.get("repetitions") or "–",
                        "" if r.get("density") is None else f"{r['density']:.4g}",
                        (r.get("reason") or "")[:160]])
    return out


def floor_rows(ctx: Context) -> list[list[str]]:
    data = _floor_data(ctx)
    if not data:
        return []
    out = []
    for k in data.get("kernels", []):
        if "error" in k:
            out.append([k["kernel"], "–", "–", "–", k["error"][:160]])
            continue
        floor, frac = k.get("floor_s"), k.get("fraction_of_floor")
        out.append([k["kernel"], f"{k['median_s'] * 1e3:.3f}",
                    "–" if floor is None else f"{floor * 1e3:.3f}",
                    "–" if frac is None else f"{frac:.0%}", k.get("note", "")])
    return out


def write_summary(ctx: Context, final: bool = False) -> str:
    p, caps = ctx.profile, ctx.caps
    elapsed = time.monotonic() - ctx.t0
    lines = [
        f"# attnbench GPU run: {caps.get('gpu') or p.device}"
        + (" (dry run: CPU, tiny shapes)" if p.name == "dry-run" else ""),
        "",
        f"{_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC; {elapsed:.0f} s of "
        f"{p.total_s:.0f} s{'' if final else ' (in progress)'}; python {caps.get('python')}, "
        f"torch {caps.get('torch')}, triton {caps.get('triton') or '–'}, diffusers "
        f"{caps.get('diffusers') or '–'}; attnbench {caps.get('git') or '?'}.",
        f"Command: `{' '.join(ctx.argv)}`. Shapes: {p.model}, {p.dtype} on {p.device}.",
        "",
        "## Stages",
        "",
    ]
    stage_rows = []
    for i, s in enumerate(STAGES, 1):
        r = ctx.records.get(s.key) or StageRecord(s.key, s.title)
        ok = sum(j.ok for j in r.jobs)
        planned = sum(j.planned for j in r.jobs)
        new = sum(j.new for j in r.jobs)
        notes = "; ".join(f"{j.name}: {j.status}" + (f" ({j.reason})" if j.reason else "")
                          + (" [earlier call]" if j.earlier else "") for j in r.jobs)
        stage_rows.append([i, s.key, r.status, f"{r.elapsed_s:g}", f"{r.allowed_s:g}",
                           f"{ok}/{planned}" if planned else "–", new if planned else "–",
                           r.reason or notes])
    lines += md_table(["#", "stage", "status", "seconds", "allowed s", "points ok/planned",
                       "new this call", "notes"], stage_rows)
    lines += ["", "## Targets", "",
              "Speed-ups over the fastest exact kernel that ran (softmax = SDPA as torch "
              "picks it, flash, xformers) at the same point; benchmarks, not tests.", ""]
    lines += md_table(["target", "setting", "measured", "required", "verdict"], target_rows(ctx))
    flux = flux_comparison(ctx)
    if flux:
        lines += ["", "## FLUX.1-dev: CLEAR r=8", "",
                  "Measured: one denoising step; published: the whole generation (H100).", ""]
        lines += md_table(["px", "measured (one step)", "published (end to end)"], flux)
    lines += peers_section(ctx)
    lines += profile_section(ctx)
    lines += ["", "## Published numbers (other settings, labelled)", ""]
    lines += md_table(["method", "model", "setting", "px", "level", "metric", "value", "source",
                       "provenance"], published_rows())
    lines += ["", "## Points", ""]
    lines += md_table(["stage", "method", "level", "px", "status", "median ms",
                       "vs fastest exact", "impl", "reps", "density", "reason"], point_rows(ctx))
    floors = floor_rows(ctx)
    lines += ["", "## Kernels against their floors", ""]
    if floors:
        data = _floor_data(ctx)
        c = data["ceilings"]
        lines += [f"Measured ceilings: HBM copy {c['hbm_bytes_per_s'] / 1e12:.2f} TB/s, dense "
                  f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s ({c['matmul']}).", ""]
        lines += md_table(["kernel", "median ms", "floor ms", "fraction of floor", "note"], floors)
    else:
        r = ctx.records.get("floors")
        lines.append(f"Not measured: {(r.reason if r else '') or 'the stage has not run'}.")
    text = "\n".join(lines) + "\n"
    (ctx.run_dir / "summary.md").write_text(text)
    return text


# ------------------------------------------------------------------ files back


def save_state(ctx: Context) -> None:
    data = {"profile": asdict(ctx.profile), "argv": ctx.argv,
            "stages": {k: asdict(r) for k, r in ctx.records.items()}}
    for key, prior in ctx.previous.items():  # stages this call has not reached keep theirs
        data["stages"].setdefault(key, prior)
    tmp = ctx.run_dir / "stages.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(ctx.run_dir / "stages.json")


def placeholders(ctx: Context) -> None:
    """kernel_tests.txt and floor.md: the stage's output, or a line saying why there is none."""
    for name, stage in (("kernel_tests.txt", "kernels"), ("floor.md", "floors")):
        path = ctx.run_dir / name
        source = ctx.run_dir / "floor" / "floor.md" if name == "floor.md" else None
        if source is not None and source.exists():
            shutil.copyfile(source, path)
            continue
        marker = f"{stage}: "
        if path.exists() and path.stat().st_size and not path.read_text().startswith(marker):
            continue  # the stage's own output
        r = ctx.records.get(stage)
        why = (f"{r.status}: {r.reason}" if r and r.reason else r.status if r
               else "the stage has not run")
        path.write_text(f"{marker}{why}\n")


def pack(ctx: Context) -> None:
    """Refresh the returned files (the tarball last, written beside and renamed)."""
    if ctx.return_dir is None:
        return
    ctx.return_dir.mkdir(parents=True, exist_ok=True)
    for name in RETURNED[1:]:
        src = ctx.run_dir / name
        if src.exists() and name != "gpu_run.log":  # the log is written there live
            shutil.copyfile(src, ctx.return_dir / name)
    target = ctx.return_dir / RETURNED[0]
    tmp = ctx.return_dir / ".results.tar.gz.tmp"
    for exclude in ((), (".html", ".png", ".parquet")):

        def keep(info: tarfile.TarInfo, exclude=exclude) -> tarfile.TarInfo | None:
            return None if exclude and info.name.endswith(exclude) else info

        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(ctx.run_dir, arcname=ctx.run_dir.name, filter=keep)
        if tmp.stat().st_size <= RETURN_FILE_LIMIT:
            break
        ctx.log(f"results.tar.gz over {RETURN_FILE_LIMIT >> 20} MiB: packed again without "
                "reports, plots and parquet")
    tmp.replace(target)


def refresh(ctx: Context, final: bool = False) -> None:
    save_state(ctx)
    write_summary(ctx, final)
    placeholders(ctx)
    pack(ctx)


def write_report(ctx: Context) -> None:
    """attnbench's report over every stage folder that has rows, within the report share."""
    folders = [str(d) for d in sorted(ctx.run_dir.iterdir())
               if d.is_dir() and (d / "results.jsonl").exists()]
    if not ctx.report or not folders:
        ctx.log("\n== report: " + ("not asked for (--no-report)" if not ctx.report
                                   else "no results to report"))
        return
    ctx.log("\n== report of " + ", ".join(Path(f).name for f in folders))
    deadline = ctx.t_end - 5.0
    argv = [sys.executable, "-m", "attnbench", "report", *folders, "--out",
            str(ctx.run_dir / "report"), "--title", f"attnbench GPU run ({ctx.profile.name})"]
    out = run_job(argv, deadline=deadline, log=ctx.log, env=ctx.env(), prefix="   [report] ")
    if out.cut or out.rc:
        ctx.log(f"   report not written ({'cut short' if out.cut else f'exit {out.rc}'}); "
                "retry with python -m attnbench report")


# ------------------------------------------------------------------ capabilities


PROBE = r"""
import contextlib, importlib, importlib.util, io, json, platform, subprocess, sys
import importlib.metadata as metadata
device, dtype, floor_module, adapter, zoo_module, zoo_fn, listing = sys.argv[1:8]
out = {"python": platform.python_version()}
import torch
out["torch"] = torch.__version__
out["cuda"] = torch.cuda.is_available()
out["gpu"] = torch.cuda.get_device_name(0) if out["cuda"] else None
for key, dist in (("triton", "triton"), ("xdist", "pytest-xdist"), ("diffusers", "diffusers"),
                  ("flash_attn", "flash-attn"), ("xformers", "xformers")):
    try:
        out[key] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        out[key] = None
from attnbench.cli import main
def cli(args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main(args)
        except SystemExit:
            pass
        except Exception as err:
            print(f"{type(err).__name__}: {err}")
    return buf.getvalue()
out["list"] = cli(["list", "--device", device, "--dtype", dtype]) if listing == "1" else (
    "attnbench list: not run in this profile\n")
out["run_help"] = cli(["run", "--help"])
try:
    out["floor_module"] = importlib.util.find_spec(floor_module) is not None
except ModuleNotFoundError:
    out["floor_module"] = False
try:
    importlib.import_module(adapter)
    out["adapter_error"] = None
except Exception as err:
    out["adapter_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
try:
    out["zoo"] = list(getattr(importlib.import_module(zoo_module), zoo_fn)())
except Exception as err:
    out["zoo"], out["zoo_error"] = [], f"{type(err).__name__}: {err}"
print("PROBE " + json.dumps(out))
"""


def probe(profile: Profile, log: Log) -> dict[str, Any]:
    """What this machine has, from one subprocess (torch, CUDA, packages, attnbench's CLI)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, profile.device, profile.dtype, FLOOR_MODULE,
         DIFFUSERS_ADAPTER, *DIFFUSERS_ZOO, "1" if profile.list_methods else "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")), None)
    if line is None:
        log(done.stdout + done.stderr)
        raise SystemExit(f"gpu_run: the capability probe failed (exit {done.returncode}); "
                         "see above")
    caps = json.loads(line[len("PROBE "):])
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                         capture_output=True, text=True)
    caps["git"] = git.stdout.strip() if git.returncode == 0 else None
    return caps


def write_environment(ctx: Context) -> None:
    """env.txt: the probe, nvidia-smi and ``attnbench list`` on this device and dtype."""
    caps = {k: v for k, v in ctx.caps.items() if k not in ("list", "run_help")}
    listing = ctx.caps.get("list", "")
    smi = "nvidia-smi: not found"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    (ctx.run_dir / "env.txt").write_text(
        json.dumps(caps, indent=2) + "\n\n" + smi + "\n\n" + listing)
    ctx.log(f"device: {caps.get('gpu') or ctx.profile.device}; torch {caps.get('torch')}, "
            f"triton {caps.get('triton')}, diffusers {caps.get('diffusers')}, xdist "
            f"{caps.get('xdist')}; diffusers adapter: "
            f"{'yes' if not caps.get('adapter_error') else caps['adapter_error']}")


# ------------------------------------------------------------------ --plan


#: assumptions of the estimate, not measurements: CPU rates of the inputs' and the
#: weights' initialisation, the compile of FlexAttention, of a kernel test
RANDN_PER_S = 2e8
INIT_PER_S = 3e8
FLEX_COMPILE_S = 20.0
TEST_COMPILE_S = 3.0
#: the floor module's timing budgets: seconds per kernel entry, entries
FLOOR_ENTRY_S = 2.0
FLOOR_ENTRIES = 13


def _call_wall(t: float) -> float:
    """Seconds attnbench's protocol spends on a point whose call takes ``t`` s: a first call,
    two estimates, warm-up (0.2 s, at least one call), repetitions by a 0.5 s budget (at
    least 3), a memory call and, when cheap, a FLOP-counting call."""
    return 3 * t + max(t, 0.2) + max(3 * t, 0.5) + t + (t if t < 2.0 else 0.0)


def plan(profile: Profile, kernel_tests: int | None = None) -> str:
    """Each stage's points and their predicted seconds on an H200 (attnbench's FLOP/byte models).

    ``kernel_tests``: how many kernel tests run on the GPU (default: counted by collecting them).
    """
    import torch

    from attnbench import attention
    from attnbench.bench.workloads import Point, model_flops
    from attnbench.models.configs import get_config
    from attnbench.models.dit import DiT

    config = get_config(profile.model)
    esize = torch.empty((), dtype=getattr(torch, profile.dtype)).element_size()
    with torch.device("meta"):
        params = sum(p.numel() for p in DiT(config).parameters())
    lines = [f"plan: {profile.name}, {profile.model} in {profile.dtype}; H200 at "
             f"{H200_BYTES_PER_S / 1e12:.1f} TB/s and {H200_FLOPS_PER_S / 1e12:.0f} TFLOP/s; "
             f"{profile.total_s:.0f} s in all", ""]
    totals: dict[str, float] = {}
    slow: dict[str, float] = {}  # points the budget rule skips, measured with fewer repetitions
    shares = {s.key: s.share * profile.total_s for s in STAGES}

    def point(level: str, res: int, spec: str) -> tuple[float, float]:
        name, opts = parse_spec(spec)
        backend = attention.get(name)
        pt = Point(config, res, 1)
        b, h, n, d = 1, pt.heads, pt.tokens, pt.head_dim
        fl = backend.flops(b, h, n, d, pt.grid, **opts)
        mem = backend.memory(b, h, n, d, pt.grid, element_size=esize, **opts)
        t_attn = fl.actual / H200_FLOPS_PER_S + mem.actual / H200_BYTES_PER_S
        if level == "attention":
            return t_attn, 3 * b * h * n * d / RANDN_PER_S
        total = model_flops(config, b, n, fl, mixer_flops=backend.mixer_flops(b, h, n, d))
        linear = total.actual - config.depth * fl.actual
        t = linear / H200_FLOPS_PER_S + config.depth * t_attn + params * esize / H200_BYTES_PER_S
        return t, params / INIT_PER_S

    try:
        from attnbench.bench.sweep import EXTRA_CALLS, PREDICTION_MARGIN
    except ImportError:  # the sweep's rule as it stood: 4 extra calls, 3 repetitions, ×2
        EXTRA_CALLS, PREDICTION_MARGIN = 4, 2.0
    budget_calls = (EXTRA_CALLS + 3) * PREDICTION_MARGIN

    def run_estimate(stage: str, level: str, res_list, methods) -> None:
        budget = min(profile.point_budget_s, shares[stage] - profile.startup_s)
        seconds = profile.startup_s
        compiled_flex = False
        for res in res_list:
            for spec in methods:
                name = parse_spec(spec)[0]
                if name in ("flash", "xformers") and profile.device == "cpu":
                    continue
                if name == "xformers":
                    lines.append(f"  {spec:16} {level:9} {res:>5} px: unavailable unless "
                                 "xformers is installed (0 s)")
                    continue
                t, setup = point(level, res, spec)
                predicted = t * budget_calls
                if predicted > budget:
                    lines.append(f"  {spec:16} {level:9} {res:>5} px: one call {t * 1e3:10.2f} ms, "
                                 f"predicted {predicted:.0f} s > budget {budget:.0f} s: skipped "
                                 "by run's budget rule unless slow points take fewer "
                                 f"repetitions (then ~{3 * t + setup:.0f} s: one untimed, one "
                                 "timed and one memory call)")
                    slow[stage] = slow.get(stage, 0.0) + 3 * t + setup
                    continue
                wall = _call_wall(t) + setup
                if name == "clear" and not compiled_flex:
                    wall += FLEX_COMPILE_S
                    compiled_flex = True
                seconds += wall
                lines.append(f"  {spec:16} {level:9} {res:>5} px: one call {t * 1e3:10.2f} ms, "
                             f"point ~{wall:6.1f} s (setup {setup:.1f} s)")
        totals[stage] = totals.get(stage, 0.0) + seconds

    tests = _kernel_test_count() if kernel_tests is None else kernel_tests
    workers = 8
    totals["kernels"] = profile.startup_s + tests * TEST_COMPILE_S / workers
    lines.append(f"kernels: ~{tests} tests compiled (fp32, fp16, bf16), {TEST_COMPILE_S:g} s "
                 f"of compilation assumed per test, {workers} pytest-xdist workers")
    lines.append(f"attention: {profile.model} at {profile.attention_res} px")
    run_estimate("attention", "attention", [profile.attention_res], profile.attention_methods)
    lines.append(f"model: {profile.model}, one denoising step ({params / 1e6:.0f} M parameters)")
    run_estimate("model", "model", [profile.model_res], profile.model_methods)
    run_estimate("model", "model", profile.model_more_res, profile.model_methods)
    # the peers: the exact kernels (efficient ~2× flash; flex compiled once), three LiT
    # rows, four SLA rows (two kernels compiled), CLEAR's two paths at each size and radius
    peer_t = [point("attention", profile.attention_res, "softmax")[0]] * 3
    peer_t += [2 * peer_t[0], point("attention", profile.attention_res, "lit")[0] * 3]
    peer_t += [point("attention", profile.attention_res, f"sla:topk={t}")[0] * 2
               for t in (0.05, 0.1)]
    peer_t += [2 * point("attention", res, f"clear:radius={r}")[0]
               for res in profile.clear_res for r in (8, 16)]
    totals["peers"] = (profile.startup_s + sum(min(_call_wall(t), 6.0) for t in peer_t)
                       + FLEX_COMPILE_S * (1 + len(profile.clear_res)) + 2 * TEST_COMPILE_S)
    lines.append(f"peers: {len(peer_t)} timed groups of peers at {profile.attention_res} px "
                 f"(CLEAR at {', '.join(map(str, profile.clear_res))} px), each capped at 6 s, "
                 f"{1 + len(profile.clear_res)} FlexAttention compiles")
    totals["profile"] = profile.startup_s + FLEX_COMPILE_S / 2
    lines.append("diffusers: FLUX.1-dev and Wan2.1-1.3B shapes; not modelled here (needs the "
                 "adapter's FLOP model), the stage takes at most its share")
    totals["diffusers"] = shares["diffusers"]
    floor_sdpa = point("attention", profile.attention_res, "softmax")[0]
    totals["floors"] = (profile.startup_s + FLOOR_ENTRIES * FLOOR_ENTRY_S + FLEX_COMPILE_S
                        + 2 * max(3.0, 7 * floor_sdpa)
                        + 3 * config.heads * Point(config, profile.attention_res, 1).tokens
                        * (config.hidden_size // config.heads) / RANDN_PER_S)
    lines.append(f"floors: {FLOOR_ENTRIES} kernel entries at ~{FLOOR_ENTRY_S:g} s each, SDPA "
                 f"flash and cuDNN at {floor_sdpa * 1e3:.0f} ms a call, one FlexAttention "
                 "compile")
    lines += ["", f"{'stage':10} {'share s':>8} {'estimate s':>11}  (estimates: call times at "
              "the peaks above, attnbench's timing protocol, assumed setup costs)"]
    for s in STAGES:
        est = totals.get(s.key, 0.0)
        note = "  <- over its share: cut short, later points lost" if est > shares[s.key] else ""
        lines.append(f"{s.key:10} {shares[s.key]:8.0f} {est:11.0f}{note}")
    lines.append(f"{'report':10} {REPORT_SHARE * profile.total_s:8.0f}")
    for key, extra in slow.items():
        lines.append(f"{key}: +{extra:.0f} s where run measures its slow points with fewer "
                     "repetitions instead of skipping them (time earlier stages leave unused "
                     "goes to the next stage)")
    lines.append(f"{'total':10} {profile.total_s:8.0f} "
                 f"{sum(min(totals.get(s.key, 0.0), shares[s.key]) for s in STAGES):11.0f}"
                 "  (each stage capped at its share)")
    return "\n".join(lines)


def _kernel_test_count() -> int:
    """The kernel tests on a GPU: those collected here, plus a bfloat16 twin of each float16 one."""
    import io

    import pytest

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *map(str, (
            REPO / t for t in KERNEL_TESTS))])
    ids = [ln for ln in buf.getvalue().splitlines() if "::" in ln]
    return len(ids) + sum("float16" in i for i in ids)


# ------------------------------------------------------------------ main


def _gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="the same stages on the CPU: float32, a tiny DiT, tiny sizes")
    parser.add_argument("--plan", action="store_true",
                        help="print each stage's points and predicted seconds on an H200; "
                             "run nothing")
    parser.add_argument("--run-dir", help="the run folder (default reports/<gpu-name>/; dry "
                        "run: reports/runs/gpu-run-dry/); an existing one resumes")
    parser.add_argument("--return-dir", help="where the returned files go (default $OUT; "
                        "none when unset)")
    parser.add_argument("--total-seconds", type=float,
                        help="the whole run's seconds (default 520; dry run 240)")
    parser.add_argument("--stage-seconds", action="append", default=[], metavar="STAGE=S",
                        help="a hard cap on one stage's seconds from its start (repeatable)")
    parser.add_argument("--redo", action="append", default=[], metavar="STAGE",
                        help="run a stage's jobs again although an earlier call completed them")
    parser.add_argument("--no-report", action="store_true",
                        help="skip attnbench's report of the stage folders")
    args = parser.parse_args(argv)
    names = {s.key for s in STAGES}
    for item in args.stage_seconds:
        key, sep, value = item.partition("=")
        try:
            ok = sep and key in names and float(value) >= 0
        except ValueError:
            ok = False
        if not ok:
            parser.error(f"--stage-seconds {item!r}: expected STAGE=SECONDS with STAGE one of "
                         f"{', '.join(sorted(names))} and SECONDS ≥ 0")
    for key in args.redo:
        if key not in names:
            parser.error(f"--redo {key!r}: not a stage; stages: {', '.join(s.key for s in STAGES)}")
    if args.total_seconds is not None and not args.total_seconds > 0:
        parser.error(f"--total-seconds {args.total_seconds:g}: must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    profile = DRY_RUN if args.dry_run else GPU
    if args.total_seconds:
        profile = Profile(**{**asdict(profile), "total_s": args.total_seconds})
    if args.plan:
        print(plan(profile))
        return 0
    t0 = time.monotonic()
    boot = Log([])
    caps = probe(profile, boot)
    if profile.device == "cuda" and not caps.get("cuda"):
        print("gpu_run: torch sees no CUDA GPU here; use --dry-run for the CPU rehearsal",
              file=sys.stderr)
        return 2
    default_dir = (REPO / "reports" / _gpu_slug(caps["gpu"]) if profile.device == "cuda"
                   else REPO / "reports" / "runs" / "gpu-run-dry")
    run_dir = Path(args.run_dir).resolve() if args.run_dir else default_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    return_dir = args.return_dir or os.environ.get("OUT")
    return_dir = Path(return_dir).resolve() if return_dir else None
    if return_dir == run_dir:
        print("gpu_run: --return-dir must differ from the run folder", file=sys.stderr)
        return 2
    logs = [run_dir / "gpu_run.log"] + ([return_dir / "gpu_run.log"] if return_dir else [])
    log = Log(logs)
    previous = {}
    if (run_dir / "stages.json").exists():
        with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
            previous = json.loads((run_dir / "stages.json").read_text()).get("stages", {})
    ctx = Context(
        profile=profile, run_dir=run_dir, return_dir=return_dir, caps=caps, log=log, t0=t0,
        shares={s.key: s.share * profile.total_s for s in STAGES},
        caps_s={k: float(v) for k, _, v in (i.partition("=") for i in args.stage_seconds)},
        redo=set(args.redo), report=not args.no_report,
        argv=["scripts/gpu_run.py", *argv], previous=previous,
    )
    log(f"== gpu_run {_dt.datetime.now(_dt.UTC):%Y-%m-%dT%H:%M:%SZ}: {profile.name}, "
        f"{profile.total_s:.0f} s, run folder {_short(str(run_dir))}"
        + (f", {len(previous)} stages recorded by an earlier call" if previous else ""))
    write_environment(ctx)

    def on_term(signum, _frame):
        for proc in list(_CURRENT):
            stop(proc)
        log(f"gpu_run: signal {signum}: stopped; every finished point is in {run_dir}")
        with contextlib.suppress(Exception):
            refresh(ctx)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    refresh(ctx)
    for index in range(len(STAGES)):
        run_stage(ctx, index)
        refresh(ctx)
    write_report(ctx)
    refresh(ctx, final=True)
    targets = target_rows(ctx)
    log("\n== summary (" + _short(str(run_dir / "summary.md")) + ")")
    for s in STAGES:
        r = ctx.records[s.key]
        log(f"   {s.key:10} {r.status:13} {r.elapsed_s:6.1f} s  {r.reason[:100]}")
    for t in targets:
        log(f"   {t[-1][:13]:13} {t[0]}: {t[2][:90]}")
    log(f"== done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
