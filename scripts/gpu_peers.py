#!/usr/bin/env python3
"""attnbench's kernels beside the peers a user would pick instead, timed in one process.

The ``peers`` stage of ``scripts/gpu_run.py``. At one attention layer of a DiT
(``--model``, ``--res``; the GPU run: DiT-XL/2 at 8192 px, 262,144 tokens, 16
heads of 72, bfloat16), on the same q, k, v, with attnbench's timer
(:func:`attnbench.bench.timer.measure`, the protocol and settings of ``attnbench
run``: warm-up, L2 flushed, median; slow calls take fewer repetitions):

* ``exact``  SDPA with each backend forced (cuDNN, flash, memory-efficient),
             FlexAttention without a mask, flash-attn and xformers when importable.
             The fastest that ran is the baseline (gpu_run's summary names it in
             every row, beside ``attnbench run``'s own exact rows);
* ``lit``    attnbench's LiT; fla-core's Triton ``chunk_linear_attn`` (causal: its
             only mode, so its row is not the same function, and its error is taken
             against the float64 *causal* form it computes); and the same formula in
             plain PyTorch matmuls, as a user writes it by hand (in the input dtype);
* ``sla``    attnbench's SLA and the official thu-ml/SLA kernel (its source in
             ``.peers/SLA``, fetched by ``scripts/fetch_gpu_wheels.sh``, never
             committed) at topk 0.05 and 0.1, both in row-major token order with the
             linear branch over all tokens, as the official ``main`` branch computes;
* ``clear``  attnbench's CLEAR with each of its paths forced (FlexAttention with the
             official mask, masked SDPA, and any path added since), r = 8 and 16, at
             each size of ``--clear-res``, so the summary says which path wins where
             (SDPA cuDNN and flash are timed at those sizes too, as their baseline).

Each peer is first run at ``--check-res`` (small) and its output compared with
attnbench's float64 reference of the same function on the same inputs (max
absolute and relative L2 error); then timed at ``--res``. A peer that cannot run
here is a row with status ``unavailable`` and the reason, so the dry run on CPU
walks every code path.

Rows are appended to ``OUT/peers.jsonl`` as measured; a second call skips the
peers whose row is final (ok, unavailable, oom) and measures the rest.
``--budget`` seconds bound the whole job: peers not reached get a ``not reached``
row (measured by the next call).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.metadata as metadata
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attnbench import attention  # noqa: E402
from attnbench.attention.sla import num_blocks, selected_count  # noqa: E402
from attnbench.bench.timer import measure  # noqa: E402
from attnbench.bench.workloads import Point  # noqa: E402
from attnbench.models.configs import get_config  # noqa: E402

#: the timer's settings: those of ``attnbench run`` (sweep.py: rep budget 0.5 s, warm-up 0.1 s)
REP_BUDGET_S = 0.5
WARMUP_S = 0.1
#: at most this long per timed peer (slow calls then take fewer repetitions)
POINT_LIMIT_S = 6.0
FINAL = ("ok", "unavailable", "oom")
SLA_TOPKS = (0.05, 0.1)
CLEAR_RADII = (8.0, 16.0)
#: SLA at the official code's settings (thu-ml/SLA main: BLKQ = BLKK = 64, φ = softmax,
#: eps 1e-5, the linear branch over every token, the tokens in the order given)
SLA_OFFICIAL = {"block_q": 64, "block_kv": 64, "feature_map": "softmax", "linear_over": "all",
                "eps": 1e-5, "order": "row-major"}
LIT_OPTIONS = {"eps": 1e-6, "phi_shift": 1e-6}


@dataclasses.dataclass
class Inputs:
    """q, k, v ``[B, H, N, d]`` at one size, and the grid they sit on."""

    res: int
    grid: tuple[int, int]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.q.shape[2]


@dataclasses.dataclass
class Peer:
    """One implementation to time: ``build(inputs)`` returns the call (setup outside it)."""

    key: str
    group: str
    label: str
    build: Callable[[Inputs], Callable[[], torch.Tensor]]
    #: the float64 function it must compute: ``reference(inputs64) -> out``
    reference: Callable[[Inputs], torch.Tensor]
    #: what the error is taken against, when it is not attnbench's output of the row's method
    check_note: str = ""
    #: ``None`` when it can run here, else why not (asked before any work)
    unavailable: Callable[[], str | None] = lambda: None
    #: the attnbench method spec the row stands for (matched by the targets), if any
    spec: str = ""
    who: str = "attnbench"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    res: int | None = None  # timed at this size instead of --res (CLEAR's sizes)
    #: SLA: the KV blocks each query block keeps, of how many, at a token count
    kept: Callable[[int], tuple[int, int]] | None = None


# ---------------------------------------------------------------------------- inputs


def make_inputs(model: str, res: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> Inputs:
    """Random q, k, v at one DiT point (drawn on the device: 8192 px is 1.8 GB in bf16)."""
    point = Point(get_config(model), res, 1)
    shape = (1, point.heads, point.tokens, point.head_dim)
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
    return Inputs(res, point.grid, q, k, v)


def as_float64(x: Inputs) -> Inputs:
    return dataclasses.replace(x, q=x.q.double(), k=x.k.double(), v=x.v.double())


# ---------------------------------------------------------------------------- exact


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, name, None)


def sdpa_peer(key: str, backend: str, words: str) -> Peer:
    def build(x: Inputs):
        from torch.nn.attention import sdpa_kernel

        chosen = _sdpa_backend(backend)

        def call():
            with sdpa_kernel(chosen):
                return F.scaled_dot_product_attention(x.q, x.k, x.v)

        return call

    return Peer(key, "exact", f"torch SDPA, {words} backend forced (sdpa_kernel({backend}))",
                build, softmax_reference, who="torch",
                unavailable=lambda: None if _sdpa_backend(backend) is not None
                else f"this torch has no SDPBackend.{backend}")


def flex_peer(compiled: bool) -> Peer:
    def build(x: Inputs):
        from torch.nn.attention.flex_attention import flex_attention

        fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
        return lambda: fn(x.q, x.k, x.v)

    how = "compiled (torch.compile, static shapes)" if compiled else \
        "eager, not compiled (the dry run compiles nothing)"
    return Peer("exact/flex", "exact", f"FlexAttention without a mask or score_mod, {how}",
                build, softmax_reference, who="torch")


def _import_or_reason(module: str, hint: str) -> tuple[Any, str | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module), None
    except Exception as err:  # ImportError, or a build that does not load
        return None, f"{module} is not importable here ({type(err).__name__}: " \
                     f"{' '.join(str(err).split())[:160]}); {hint}"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def flash_attn_peer() -> Peer:
    def build(x: Inputs):
        mod, _ = _import_or_reason("flash_attn", "")
        q, k, v = (t.transpose(1, 2).contiguous() for t in (x.q, x.k, x.v))  # [B, N, H, d]
        return lambda: mod.flash_attn_func(q, k, v)

    def unavailable():
        return _import_or_reason("flash_attn", "not on the device image and not carried "
                                 "(built from source with nvcc)")[1]

    return Peer("exact/flash-attn", "exact",
                f"flash-attn {_version('flash-attn')} flash_attn_func on [B, N, H, d] inputs",
                build, softmax_reference, who="flash-attn", unavailable=unavailable)


def xformers_peer() -> Peer:
    def build(x: Inputs):
        ops = importlib.import_module("xformers.ops")
        q, k, v = (t.transpose(1, 2).contiguous() for t in (x.q, x.k, x.v))  # [B, N, H, d]
        return lambda: ops.memory_efficient_attention(q, k, v)

    def unavailable():
        _, reason = _import_or_reason("xformers.ops", "carried as a wheel by "
                                        "scripts/fetch_gpu_wheels.sh")
        if reason is None and not getattr(importlib.import_module("xformers"),
                                          "_has_cpp_library", True):
            return "xformers cannot load its compiled kernels (built for another torch)"
        return reason

    return Peer("exact/xformers", "exact",
                f"xformers {_version('xformers')} memory_efficient_attention (its dispatcher "
                "picks the kernel) on [B, N, H, d] inputs", build, softmax_reference,
                who="xformers", unavailable=unavailable)


def softmax_reference(x: Inputs) -> torch.Tensor:
    return attention.get("softmax").reference(x.q, x.k, x.v)


# ---------------------------------------------------------------------------- LiT


def lit_reference(x: Inputs) -> torch.Tensor:
    return attention.get("lit").reference(x.q, x.k, x.v, **LIT_OPTIONS)


def lit_causal_reference(x: Inputs) -> torch.Tensor:
    """LiT's feature map with the sums over the tokens up to each query (fla's function):
    ``φ(q_t) Σ_{s≤t} φ(k_s)ᵀ v_s / (φ(q_t) · Σ_{s≤t} φ(k_s))``, fla's 1e-10 left out."""
    shift = LIT_OPTIONS["phi_shift"]
    fq, fk = torch.relu(x.q) + shift, torch.relu(x.k) + shift
    scores = torch.tril(fq @ fk.transpose(-1, -2))
    return (scores @ x.v) / scores.sum(-1, keepdim=True)


def lit_peer(device: torch.device, dtype: torch.dtype) -> Peer:
    backend = attention.get("lit")

    def build(x: Inputs):
        return lambda: backend.attend(x.q, x.k, x.v, grid=x.grid, **LIT_OPTIONS)

    impl = backend.select(device, dtype)
    return Peer("lit/attnbench", "lit", f"attnbench lit [{impl}]: relu + 1e-6 feature map, "
                "normaliser φ(q)·mean φ(k) + 1e-6, non-causal", build, lit_reference,
                spec="lit", options={"impl": impl, **LIT_OPTIONS})


def lit_by_hand_peer() -> Peer:
    def by_hand(q, k, v, eps=LIT_OPTIONS["eps"], shift=LIT_OPTIONS["phi_shift"]):
        fq, fk = torch.relu(q) + shift, torch.relu(k) + shift
        state = fk.transpose(-1, -2) @ v / k.shape[-2]
        z = fk.mean(dim=-2, keepdim=True)
        return (fq @ state) / ((fq * z).sum(dim=-1, keepdim=True) + eps)

    return Peer("lit/torch", "lit", "plain PyTorch matmuls, as written by hand: φ, φ(K)ᵀV, "
                "φ(Q)·S and the normaliser in the input dtype (matmuls accumulate in fp32)",
                lambda x: lambda: by_hand(x.q, x.k, x.v), lit_reference, who="torch")


def fla_peer(device: torch.device) -> Peer:
    def build(x: Inputs):
        from fla.ops.linear_attn import chunk_linear_attn

        shift = LIT_OPTIONS["phi_shift"]
        q, k, v = (t.transpose(1, 2).contiguous() for t in (x.q, x.k, x.v))  # [B, N, H, d]

        def call():
            out, _ = chunk_linear_attn(torch.relu(q) + shift, torch.relu(k) + shift, v,
                                       scale=1.0, normalize=True)
            return out.transpose(1, 2)

        return call

    def unavailable():
        if device.type != "cuda":
            return "fla's kernels are Triton kernels that need a GPU driver (CUDA here)"
        return _import_or_reason("fla.ops.linear_attn", "carried as the fla-core wheel by "
                                 "scripts/fetch_gpu_wheels.sh")[1]

    return Peer("lit/fla", "lit", f"fla-core {_version('fla-core')} chunk_linear_attn, causal "
                "(its only mode), φ = relu + 1e-6 by torch ops in the call, scale 1, normalised, "
                "[B, N, H, d] inputs", build, lit_causal_reference,
                check_note="error against the float64 causal form fla computes: not "
                "attnbench's (non-causal) function, so not a check against attnbench",
                who="fla", unavailable=unavailable)


# ---------------------------------------------------------------------------- SLA


def sla_reference(topk: float) -> Callable[[Inputs], torch.Tensor]:
    return lambda x: attention.get("sla").reference(x.q, x.k, x.v, grid=x.grid, topk=topk,
                                                    **SLA_OFFICIAL)


def sla_peer(topk: float, device: torch.device, dtype: torch.dtype) -> Peer:
    backend = attention.get("sla")

    def build(x: Inputs):
        return lambda: backend.attend(x.q, x.k, x.v, grid=x.grid, topk=topk, **SLA_OFFICIAL)

    impl = backend.select(device, dtype)
    return Peer(f"sla/attnbench/{topk:g}", "sla",
                f"attnbench sla [{impl}], topk {topk:g}, row-major, BLKQ = BLKK = 64, φ softmax, "
                "linear branch over all tokens (the official main branch's settings)", build,
                sla_reference(topk), spec=f"sla:topk={topk:g}",
                options={"impl": impl, "topk": topk, **SLA_OFFICIAL},
                kept=lambda n: (selected_count(num_blocks(n, 64), topk), num_blocks(n, 64)))


def official_sla_peer(topk: float, device: torch.device, peers_dir: Path) -> Peer:
    source = peers_dir / "SLA"
    commit = (source / "COMMIT").read_text().strip()[:12] if (source / "COMMIT").exists() else "?"

    def modules():
        if str(source) not in sys.path:
            sys.path.insert(0, str(source))
        return (importlib.import_module("sparse_linear_attention.kernel"),
                importlib.import_module("sparse_linear_attention.utils"))

    def build(x: Inputs):
        kernel, utils = modules()
        d = x.q.shape[-1]
        scale = d**-0.5
        # its kernels index the head dim with tl.arange(0, D): a power of two. Zero columns
        # change neither the block scores nor q·k; they are dropped from the output.
        width = max(16, 1 << (d - 1).bit_length())
        qp, kp, vp = (F.pad(t, (0, width - d)).contiguous() for t in (x.q, x.k, x.v))

        def call():
            sparse_map, lut, real_topk = utils.get_block_map(qp, kp, topk_ratio=topk,
                                                             BLKQ=64, BLKK=64)
            o_s = kernel._attention.apply(qp, kp, vp, sparse_map, lut, real_topk, 64, 64, scale)
            fq, fk = F.softmax(x.q, dim=-1), F.softmax(x.k, dim=-1)  # its feature_map='softmax'
            kv = fk.transpose(-1, -2) @ x.v
            o_l = (fq @ kv) / (1e-5 + (fq * fk.sum(dim=-2, keepdim=True)).sum(-1, keepdim=True))
            return o_s[..., :d] + o_l

        return call

    def unavailable():
        if not (source / "sparse_linear_attention").is_dir():
            return (f"the official source is not in {source} (scripts/fetch_gpu_wheels.sh "
                    "copies it there)")
        if device.type != "cuda":
            return "its Triton kernels need a GPU driver (CUDA here)"
        try:
            modules()
        except Exception as err:
            return f"it does not import: {type(err).__name__}: {' '.join(str(err).split())[:160]}"
        return None

    return Peer(f"sla/official/{topk:g}", "sla",
                f"thu-ml/SLA @{commit}: its get_block_map + _attention kernel + its linear "
                f"branch over all tokens (φ softmax, eps 1e-5; proj_l left out), topk {topk:g} "
                "(int(topk·K) blocks), BLKQ = BLKK = 64, row-major; head dim zero-padded to a "
                "power of two before the timed call (its kernels need one)", build,
                sla_reference(topk),
                check_note="against attnbench's float64 SLA with the same settings; block "
                "choices at near-ties may differ (its pooled scores are in the input dtype)",
                who="thu-ml/SLA", unavailable=unavailable,
                options={"topk": topk, **SLA_OFFICIAL},
                kept=lambda n: (min(num_blocks(n, 64), int(topk * num_blocks(n, 64))),
                                num_blocks(n, 64)))


# ---------------------------------------------------------------------------- CLEAR


def clear_peers(device: torch.device, dtype: torch.dtype, sizes: list[int], model: str,
                compile_ok: bool) -> list[Peer]:
    """Every path of attnbench's CLEAR but the reference, forced, at each radius and size."""
    backend = attention.get("clear")
    peers = []
    for res in sizes:
        point = Point(get_config(model), res, 1)
        shape = (1, point.heads, point.tokens, point.head_dim)
        reasons = backend.path_reasons(device, dtype, shape)
        for radius in CLEAR_RADII:
            for path, reason in reasons.items():
                if path == "reference":
                    continue
                if path == "flex" and not compile_ok:
                    reason = "the dry run compiles no FlexAttention (tens of seconds on CPU)"

                def build(x: Inputs, path=path, radius=radius):
                    return lambda: backend.attend(x.q, x.k, x.v, grid=x.grid, impl=path,
                                                  radius=radius)

                def reference(x: Inputs, radius=radius):
                    return backend.reference(x.q, x.k, x.v, grid=x.grid, radius=radius)

                peers.append(Peer(
                    f"clear/{path}/r{radius:g}/{res}", "clear",
                    f"attnbench clear [{path}] forced, r={radius:g}, official mask "
                    "(dy²+dx² < r²), no pooling", build, reference,
                    unavailable=lambda reason=reason: reason, spec=f"clear:radius={radius:g}",
                    options={"impl": path, "radius": radius}, res=res))
    return peers


# ---------------------------------------------------------------------------- measuring


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = out.double() - ref
    norm = ref.norm().item()
    return {"max_abs_err": diff.abs().max().item(),
            "rel_l2_err": diff.norm().item() / norm if norm else math.inf,
            "finite": bool(torch.isfinite(out).all())}


def _reason(err: BaseException, caught: list) -> str:
    text = " ".join(str(err).split())
    said = [" ".join(str(w.message).split())[:200] for w in caught]
    return "; ".join([f"{type(err).__name__}: {text[:300]}", *said[:3]])


class Runner:
    """Measures the peers in order, appending one row each to ``peers.jsonl``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "peers.jsonl"
        self.done = {r["key"]: r for r in read_rows(self.path) if r.get("status") in FINAL}
        self.deadline = time.monotonic() + args.budget
        self.inputs: dict[int, Inputs] = {}
        self.references: dict[tuple, torch.Tensor] = {}

    def at(self, res: int) -> Inputs:
        if res not in self.inputs:
            self.release()  # one size at a time: 8192 px is 1.8 GB of bf16 inputs
            self.inputs[res] = make_inputs(self.args.model, res, self.dtype, self.device)
        return self.inputs[res]

    def check(self, peer: Peer) -> dict[str, Any]:
        """The peer at the check size against its float64 reference (computed once)."""
        small = make_inputs(self.args.model, self.args.check_res, self.dtype, self.device,
                            seed=1)
        out = peer.build(small)()
        key = (peer.reference, self.args.check_res)
        if key not in self.references:
            self.references[key] = peer.reference(as_float64(small))
        return {"res": self.args.check_res, "tokens": small.tokens,
                **errors(out, self.references[key]),
                "against": peer.check_note or "attnbench's float64 reference of the same "
                "function on the same inputs"}

    def row(self, peer: Peer, res: int) -> dict[str, Any]:
        point = Point(get_config(self.args.model), res, 1)
        extra = {}
        if peer.kept is not None:
            extra["kept_blocks"], extra["kv_blocks"] = peer.kept(point.tokens)
        return {**extra, "key": peer.key, "group": peer.group, "label": peer.label, "who": peer.who,
                "spec": peer.spec, "options": peer.options, "model": self.args.model,
                "resolution": res, "tokens": point.tokens, "heads": point.heads,
                "head_dim": point.head_dim, "dtype": self.args.dtype, "device": self.args.device,
                "level": "attention"}

    def run(self, peer: Peer) -> None:
        if peer.key in self.done:
            print(f"{peer.key}: {self.done[peer.key]['status']} in an earlier call", flush=True)
            return
        res = peer.res or self.args.res
        row = self.row(peer, res)
        left = self.deadline - time.monotonic()
        reason = peer.unavailable()
        if reason is not None:
            row.update(status="unavailable", reason=reason)
        elif left < 2.0:
            row.update(status="not reached", reason="no time left in the stage's budget")
        else:
            row.update(self.measure(peer, res, left))
        self.write(row)

    def measure(self, peer: Peer, res: int, left: float) -> dict[str, Any]:
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                check = self.check(peer)
                x = self.at(res)
                timing = measure(peer.build(x), self.device, budget_s=REP_BUDGET_S,
                                 warmup_s=WARMUP_S, limit_s=min(POINT_LIMIT_S, left))
        except torch.cuda.OutOfMemoryError as err:
            self.release()
            return {"status": "oom", "reason": _reason(err, [])}
        except Exception as err:
            self.release()
            unavailable = any(s in str(err) for s in ("No available kernel", "No viable backend"))
            return {"status": "unavailable" if unavailable else "error",
                    "reason": _reason(err, caught)}
        return {"status": "ok", "latency_median_s": timing.median, "latency_p20_s": timing.p20,
                "latency_p80_s": timing.p80, "repetitions": timing.reps, "timer": timing.timer,
                "check": check}

    def release(self) -> None:
        self.inputs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        took = (f"{row['latency_median_s'] * 1e3:.3f} ms, max err "
                f"{row['check']['max_abs_err']:.2e}" if row["status"] == "ok"
                else row.get("reason", ""))
        print(f"{row['key']}: {row['status']} -- {took}", flush=True)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``peers.jsonl`` (a line cut short by a stop is dropped)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def peers(args: argparse.Namespace) -> list[Peer]:
    """Every peer, in the order they are measured: what the targets need first."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    compile_ok = not args.no_compile
    listed = [sdpa_peer("exact/sdpa-cudnn", "CUDNN_ATTENTION", "cuDNN"),
              sdpa_peer("exact/sdpa-flash", "FLASH_ATTENTION", "flash"),
              sdpa_peer("exact/sdpa-efficient", "EFFICIENT_ATTENTION", "memory-efficient"),
              flash_attn_peer(), xformers_peer(),
              lit_peer(device, dtype), fla_peer(device), lit_by_hand_peer()]
    for topk in SLA_TOPKS:
        listed += [sla_peer(topk, device, dtype), official_sla_peer(topk, device,
                                                                     Path(args.peers_dir))]
    listed.append(flex_peer(compile_ok))
    for res in (r for r in args.clear_res if r != args.res):  # CLEAR's other sizes' baseline
        listed += [dataclasses.replace(sdpa_peer(f"exact/sdpa-{name.lower()}/{res}", backend,
                                                 name), res=res)
                   for backend, name in (("CUDNN_ATTENTION", "cuDNN"),
                                         ("FLASH_ATTENTION", "flash"))]
    listed += clear_peers(device, dtype, args.clear_res, args.model, compile_ok)
    return listed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_peers.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--res", type=int, default=8192, help="the timed size in px")
    p.add_argument("--check-res", type=int, default=1024,
                   help="the size of the error check against the float64 references")
    p.add_argument("--clear-res", default="8192,2048",
                   help="comma-separated sizes at which CLEAR's paths are timed")
    p.add_argument("--out", required=True, help="folder of peers.jsonl")
    p.add_argument("--budget", type=float, default=120.0, help="seconds for the whole job")
    p.add_argument("--peers-dir", default=str(REPO / ".peers"),
                   help="where scripts/fetch_gpu_wheels.sh put the peers' source")
    p.add_argument("--no-compile", action="store_true",
                   help="FlexAttention eager, CLEAR's flex path skipped (the CPU dry run)")
    args = p.parse_args(argv)
    try:
        args.clear_res = [int(r) for r in args.clear_res.split(",") if r.strip()]
    except ValueError:
        p.error(f"--clear-res {args.clear_res!r}: expected sizes in px, e.g. 8192,2048")
    if args.budget <= 0 or not math.isfinite(args.budget):
        p.error(f"--budget {args.budget}: must be a positive number of seconds")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU here (use --device cpu)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner = Runner(args)
    listed = peers(args)
    print(f"peers: {len(listed)} at {args.model} {args.res} px (CLEAR at "
          f"{', '.join(map(str, args.clear_res))} px), {args.dtype} on {args.device}; "
          f"checked at {args.check_res} px; {len(runner.done)} done earlier", flush=True)
    with torch.no_grad():
        for peer in listed:
            runner.run(peer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
