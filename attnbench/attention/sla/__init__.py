"""SLA: Sparse-Linear Attention (Zhang et al., arXiv 2509.24006; code thu-ml/SLA).

Tokens are cut into blocks of ``block_q`` queries and ``block_kv`` keys: 1-D
runs in the given (row-major) token order, as the official code does, or, with
``order="attnbench-tiles"`` (attnbench's extension, ``order.py``), in a
locality-preserving order: 8×8 tiles of an image, 4×4×4 cubes of a video, text
tokens after them in blocks of their own. Every path -- the block map, the
selection, both branches, gather and Triton -- runs on the tokens in that
order; the outputs go back to the layout's. Per query
block, the ``topk`` fraction of KV blocks with the highest pooled score are
*critical* and get exact softmax attention restricted to them (``O_s``); the
other, *marginal*, blocks are summarised by linear attention (``O_l``)::

    O_s = softmax(Q Kᵀ/√d restricted to the critical blocks) V
    O_l = φ(Q) Σ_j φ(K_j)ᵀV_j / (φ(Q) Σ_j φ(K_j)ᵀ + eps)      j over the marginal blocks
    O   = O_s + proj_l(O_l)                                    proj_l = identity in attend()

The default, ``linear_over="all"``, runs the linear branch over every token, as
the official code's ``main`` branch (``calc_linear`` over all of k) and
TurboDiffusion's SLA do; ``"marginal"`` is the paper's formula above (the
``SLA-1`` branch's kernel), and with ``topk=1.0`` it is exact softmax attention.

Checked against the official code (thu-ml/SLA, ``sparse_linear_attention/core.py``
and ``utils.py``): kept blocks per query block ``min(K, int(topk·K))`` (here at
least 1: 0 would leave a softmax over nothing), block sizes 64, eps 1e-5, φ =
softmax by default; the official code returns ``real_topk / K``, the effective
fraction, beside the output (here :meth:`SLA.effective_options`). Where attnbench
differs -- at least one block, eps also in the marginal mode, no bf16 cast of
the inputs -- :attr:`SLA.notes` says so (``attnbench list``).

Files: ``blocks.py`` the selection, ``reference.py`` the naive parts,
``gather.py``, ``batched.py`` (the CPU path) and ``triton.py`` (the Triton
kernel) the fast paths,
``core.py`` the learned ``proj_l``, ``constants.py`` the shared constants,
``order.py`` the token order.
The pieces, each usable alone (benchmarks time :func:`block_map` as overhead):

* :func:`block_logits` / :func:`block_scores` -- pooled, centred block scores;
* :func:`selected_count`, :func:`block_indices`, :func:`block_map` -- the selection,
  shared by every implementation so they attend to identical blocks;
* :func:`sla_reference_parts` -- the naive ``(O_s, O_l)``: masked score matrices,
  chunked over query blocks (any dtype, float64 included);
* :func:`sla_gather_parts` -- the fast ``(O_s, O_l)``: dense attention over the
  gathered critical blocks, and the marginal linear branch from per-block states
  as "total minus selected" (nothing N×N), differentiable, CPU and CUDA.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .. import _triton
from ..backend import AttentionBackend
from ..costs import Flops, dense_flops
from ..inputs import Grid
from ..layout import KINDS, Layout, text_first_geometry
from ..options import Option, positive, unit_fraction
from ..paths import FastPath
from ..recipes import OWN_CHOICE, ConversionRecipe, DistillRecipe, Optimisation
from ..registry import register
from . import batched as _batched_module
from . import gather as _gather_module
from . import reference as _reference_module
from .batched import sla_batched, sla_batched_parts
from .blocks import (
    FEATURE_MAPS,
    block_indices,
    block_logits,
    block_map,
    block_scores,
    indices_to_map,
    mean_pool,
    num_blocks,
    official_count,
    selected_count,
    selection_bytes,
)
from .constants import BLOCK_KV, BLOCK_Q, CORRECTION, CORRECTIONS, EPS, TOPK
from .core import SLACore
from .gather import gather_chunk_blocks, sla_gather_parts
from .order import ALIASES, ORDERS, ROW_MAJOR, describe_order, token_order
from .reference import sla_reference_parts

#: the kernel module (imports triton; loaded lazily by the path)
TRITON_MODULE = f"{__name__}.triton"
OFFICIAL = "thu-ml/SLA sparse_linear_attention/core.py"
#: SLA's published fine-tuning (the SLA authors' TurboDiffusion, Wan2.1 text-to-video)
TURBO = "thu-ml/TurboDiffusion turbodiffusion/rcm/models/t2v_model_sla.py"
TURBO_CONFIG = "thu-ml/TurboDiffusion turbodiffusion/rcm/configs/experiments/sla/wan2pt1_t2v.py"


def sla_triton_parts(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O_s, O_l)`` by the fused Triton kernel (``triton.py``), forward only."""
    return _triton.load(TRITON_MODULE).sla_triton_parts(*args, **kwargs)


PARTS = {"reference": sla_reference_parts, "gather": sla_gather_parts, "triton": sla_triton_parts,
         "batched": sla_batched_parts}


def on_sla_blocks(
    fn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    topk: float,
    order: str = ROW_MAJOR,
    grid=None,
    layout: Layout | None = None,
    **branches: Any,
):
    """``fn(q, k, v, indices, block_q=, block_kv=, **branches)`` on the tokens in SLA's
    ``order`` of a text-first layout (``grid=`` or ``layout=``), with the selection of
    :func:`block_indices`; its output (a tensor or a tuple) goes back to the given order.
    Without a geometry the tokens are taken in the given order."""
    perm = None
    if layout is not None or grid is not None:
        geometry = text_first_geometry(layout, grid)
        geometry.check(k.shape[2])
        perm = token_order(geometry, order, min(block_q, block_kv), q.device)
    if perm is not None:
        q, k, v = (t.index_select(2, perm[0]) for t in (q, k, v))
    indices = block_indices(q, k, block_q, block_kv, topk)
    out = fn(q, k, v, indices, block_q=block_q, block_kv=block_kv, **branches)
    if perm is None:
        return out
    if isinstance(out, tuple):
        return tuple(o.index_select(2, perm[1]) for o in out)
    return out.index_select(2, perm[1])


def sla_parts(impl: str, q, k, v, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O_s, O_l)`` by implementation ``impl`` (:func:`on_sla_blocks` with its parts
    function): the options of ``attend``, ``grid=``/``layout=`` text first."""
    return on_sla_blocks(PARTS[impl], q, k, v, **options)


def _gather(q, k, v, **options) -> torch.Tensor:
    o_s, o_l = sla_parts("gather", q, k, v, **options)
    return o_s + o_l


def _batched(q, k, v, **options) -> torch.Tensor:
    return on_sla_blocks(sla_batched, q, k, v, **options)


def _triton_attend(q, k, v, **options) -> torch.Tensor:
    o_s, o_l = sla_parts("triton", q, k, v, **options)
    return o_s + o_l


def _triton_workspace(batch, heads, tokens, head_dim, layout, *, element_size, topk, block_q,
                      block_kv, linear_over, **_opts) -> float:
    """The selection, then the int32 LUT, the second output, the float32 total state and,
    for the "gemm" correction, the per-block states, the 0/1 selection and its product
    with them (bf16 for half inputs)."""
    bh, n, d = batch * heads, tokens, head_dim
    block_map_bytes, indices, nq, nk, kk = selection_bytes(bh, n, block_q, block_kv, topk)
    output = bh * n * d * element_size
    marginal = linear_over == "marginal"
    state = bh * (d * d + d) * 4 if (kk < nk or not marginal) else 0
    corr = 0
    if marginal and kk < nk and CORRECTION == "gemm":
        c = 4 if element_size >= 4 else 2
        corr = bh * ((nk + nq) * (d * d + d) + nq * nk) * c
    return float(max(block_map_bytes, indices + bh * nq * kk * 4 + output + state + corr))


TRITON = FastPath(
    "triton",
    _triton_attend,
    devices=("cuda", "cpu"),  # CPU only under Triton's interpreter (the probe says)
    dtypes=_triton.KERNEL_DTYPES,
    head_dim_max=128,
    grad_devices=(),  # forward only: training takes the gather path
    requires=("triton",),
    install="pip install 'attnbench[triton]'",
    probe=_triton.kernel_probe(TRITON_MODULE),
    workspace=_triton_workspace,
    flop_countable=False,  # Triton kernels are invisible to FlopCounterMode
    doc="one Triton kernel: online softmax over the critical blocks + the marginal "
    "linear branch (total state minus the critical blocks' share); forward only",
)
BATCHED = FastPath(
    "batched",
    _batched,  # plain torch ops (index_select, SDPA, matmul): every device and dtype
    workspace=_batched_module._workspace,
    auto_devices=("cpu",),
    doc="pure torch, O(N·d) memory: the kept blocks gathered once per chunk for every head "
    "and query block, one SDPA over them, the linear branch as two matmuls (the CPU path)",
)
GATHER = FastPath(
    "gather",
    _gather,  # plain torch ops (gather, SDPA, matmul): every device and dtype
    workspace=_gather_module._workspace,
    doc="pure torch: SDPA over the gathered critical blocks + block-state linear branch",
)


@register
class SLA(AttentionBackend):
    """SLA: exact softmax on the top-k blocks, linear attention on the rest."""

    name = "sla"
    summary = (
        "SLA: block-sparse softmax on the top-k KV blocks per query block + a linear "
        "attention branch (all tokens, or the marginal blocks); fast path gathers the "
        "critical blocks"
    )
    paper = "Zhang et al., SLA, arXiv 2509.24006"
    options = (
        Option("topk", TOPK,
               "fraction of KV blocks each query block attends exactly: int(topk·K) as "
               "the official code, at least 1",
               float, check=unit_fraction, source="SLA paper: 5% critical blocks (95% sparsity)"),
        Option("block_q", BLOCK_Q, "query block size (tokens)", int, check=positive,
               source=OFFICIAL + " (BLKQ=64)"),
        Option("block_kv", BLOCK_KV, "key/value block size (tokens)", int, check=positive,
               source=OFFICIAL + " (BLKK=64)"),
        Option("feature_map", "softmax",
               "φ of the linear branch: softmax over the head dim, relu, or elu+1", str,
               choices=tuple(FEATURE_MAPS), source=OFFICIAL + " (feature_map='softmax')"),
        Option("linear_over", "all",
               "keys of the linear branch: all tokens (official main branch) or the "
               "non-selected blocks only (the paper's formula, the SLA-1 branch)",
               str, choices=("marginal", "all"),
               source=OFFICIAL + " on main (calc_linear over every k) and TurboDiffusion's "
               "SLA; the paper and the SLA-1 branch's kernel take the marginal blocks"),
        Option("eps", EPS, "added to the linear branch's normaliser (in both linear_over "
               "modes)", float, check=positive,
               source=OFFICIAL + " on main (1e-5 + φ(q)·Σφ(k)); the SLA-1 branch's marginal "
               "kernel adds none"),
        Option("order", ROW_MAJOR,
               "token order of the blocks: the order given (row-major, as the official "
               "code), or attnbench's 8×8 tiles / 4×4×4 cubes with the text after them "
               "(attnbench-tiles; 'tiles' before it was an option, the default until then)",
               str, choices=ORDERS, aliases=ALIASES,
               source=OFFICIAL + " and utils.py (blocks of the given order; TurboDiffusion "
               "feeds Wan's frames × H × W); attnbench-tiles is attnbench's extension: a "
               "block is a compact patch of the grid, not a strip of a row"),
    )
    notes = (
        "kept blocks: min(K, int(topk·K)) as thu-ml/SLA utils.py get_block_map, but at "
        "least 1 where that is 0 (a softmax over no block is undefined); a row's effective "
        "options then carry official_kept_blocks=0",
        "eps 1e-5 is added to the linear normaliser with linear_over=marginal too; the "
        "official marginal kernel (SLA-1 branch, kernel.py) adds none -- with the softmax "
        "feature map φ(q)·Σφ(k) > 0, so the two differ by eps/(φ(q)·Σφ(k)) relative",
        "precision: the official module casts q, k, v to bf16 for both branches (use_bf16="
        "True) and runs proj_l under bf16 autocast; attnbench computes in the input dtype, "
        "accumulating half inputs in float32 (pass bf16 inputs for the official precision)",
        "token order: row-major as the official code (order=attnbench-tiles is attnbench's "
        "extension); text that follows the grid is moved before it first",
    )
    layout_kinds = KINDS
    core_class = SLACore
    fast_paths = (TRITON, BATCHED, GATHER)
    conversion_recipe = ConversionRecipe(
        "sla",
        "SLA: inherit q/k/v/out; the linear-branch projection is zero-initialised so the "
        "fresh student equals block-sparse attention; teacher's heads",
        "SLA, arXiv 2509.24006 (fine-tunes the pretrained model with proj_l added)",
        inherit_projections=True,
    )
    distill_recipe = DistillRecipe(
        "sla", {"kd_out": 1.0}, "all",
        "SLA as TurboDiffusion fine-tunes Wan2.1 with it: the teacher-output MSE only, "
        "every parameter trains (proj_l starts at zero), topk 0.1 with the linear branch "
        "over all tokens",
        TURBO + " (T2VModel_SLA.training_step: loss = MSE(student, teacher); the "
        "net trains whole, the teacher is frozen)",
        options={"topk": 0.1, "linear_over": "all"},
        optimisation=Optimisation(
            "adamw", 1e-5, 0.01, {"betas": (0.9, 0.999), "eps": 1e-8}, ema_decay=0.999,
            warmup_steps=100, grad_clip=0.0, steps=100_000,
            batch="4 videos per GPU (Wan2.1 1.3B, 480p)",
            source=TURBO_CONFIG + " (optimizer lr 1e-5, weight_decay 0.01, betas (0.9, "
            "0.999); trainer max_iter 100_000; grad_clip False) and defaults/scheduler.py "
            "(LambdaLinear: 100 warm-up steps, then constant)",
            substitutes="TurboDiffusion's power EMA (defaults/ema.py, rate 0.1) is "
            "approximated by attnbench's constant-decay EMA 0.999"),
    )
    distill_alternatives = (
        DistillRecipe(
            "sla-attnbench", {"diffusion": 1.0, "kd_out": 1.0}, "all",
            "attnbench's earlier SLA recipe, kept for short runs on small models: the data "
            "term beside the teacher-output MSE and AdamW 2e-4 -- the published 1e-5 is "
            "set for 100K steps of a 1.3B model and barely moves a few hundred steps",
            OWN_CHOICE,
        ),
    )

    def reference(self, q, k, v, **options) -> torch.Tensor:
        o_s, o_l = sla_parts("reference", q, k, v, **options)
        return o_s + o_l

    def attend_parts(
        self, q, k, v, *, grid: Grid | None = None, layout: Layout | None = None,
        impl: str = "auto", **options: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(O_s, O_l)`` separately, checked and dispatched exactly as ``attend``.

        The core needs them apart to apply ``proj_l`` to the linear branch only.
        """
        chosen, layout, opts = self.prepare(q, k, v, grid=grid, layout=layout, impl=impl,
                                            options=options)
        return self.dispatch(chosen, q, k, v, layout, fn=functools.partial(sla_parts, chosen),
                             **opts)

    def block_map(self, q: torch.Tensor, k: torch.Tensor, *, grid: Grid | None = None,
                  layout: Layout | None = None, **options: Any) -> torch.Tensor:
        """The critical-block map ``attend`` would use with these options (the overhead):
        over the blocks of SLA's token order when a geometry is given."""
        opts = self.resolve(options)
        if layout is not None or grid is not None:
            layout, opts = self.geometry(layout, grid, opts, tokens=k.shape[2])
            perm = token_order(layout, opts["order"], min(opts["block_q"], opts["block_kv"]),
                               q.device)
            q, k = layout.to_text_first(q), layout.to_text_first(k)  # as attend runs them
            if perm is not None:
                q, k = q.index_select(2, perm[0]), k.index_select(2, perm[0])
        return block_map(q, k, opts["block_q"], opts["block_kv"], opts["topk"])

    sparse_pairs = True

    def exact_rows_model(self, q, k, layout, **opts):
        """The selected blocks' pairs, each token placed in its block of SLA's order."""
        selected = self.block_map(q, k, layout=layout, **opts)  # [B, H, nq, nk]
        n = k.shape[2]
        place = torch.arange(n, device=k.device)
        perm = token_order(layout, opts["order"], min(opts["block_q"], opts["block_kv"]),
                           k.device)
        if perm is not None:
            place = perm[1]  # token t sits at perm[1][t] in SLA's order
        q_block, kv_block = place // opts["block_q"], place // opts["block_kv"]
        return lambda r0, r1: selected[:, :, q_block[r0:r1]][..., kv_block]

    def overhead_steps(self, q, k, v, *, grid=None, layout=None, impl: str, **options: Any):
        """The block map (the token order, pooling, scoring, top-k): timed apart from the
        attention."""
        return {"block_map": lambda: self.block_map(q, k, grid=grid, layout=layout, **options)}

    def workspace_model(self, batch, heads, tokens, head_dim, layout, *, element_size, impl,
                        **opts) -> float:
        """The path's model plus, when the tokens are re-ordered, the re-ordered q, k, v
        and the two parts before they go back."""
        base = super().workspace_model(batch, heads, tokens, head_dim, layout,
                                       element_size=element_size, impl=impl, **opts)
        block = min(opts["block_q"], opts["block_kv"])
        ordered = opts["order"] != ROW_MAJOR and token_order(layout, opts["order"], block,
                                                                "cpu") is not None
        return base + (5.0 * batch * heads * tokens * head_dim * element_size if ordered else 0)

    def mixer_flops(self, batch, heads, tokens, head_dim, *, layout=None, **options) -> float:
        return 2.0 * batch * heads * tokens * head_dim * head_dim  # proj_l on O_l

    def flop_model(
        self,
        batch,
        heads,
        tokens,
        head_dim,
        layout,
        *,
        topk,
        block_q,
        block_kv,
        feature_map,
        linear_over,
        eps,
        order,
    ) -> Flops:
        """FLOPs of the gather path (what FlopCounterMode counts on it).

        Block scoring ``2·nq·nk·d`` (also the ``overhead``); sparse ``4·pairs·d``
        with ``pairs = nq·bq · kk·bkv`` -- a partial last block counts as full, as
        the gather path computes it padded (exact when bq and bkv divide N);
        linear branch: states ``2·nk·bkv·d²``, readout ``2·nq·bq·(d² + d)``,
        skipped when every block is critical and ``linear_over="marginal"``.
        Pooling, centring, softmax, feature maps and the state sums are
        element-wise and not counted.
        """
        nq, nk = num_blocks(tokens, block_q), num_blocks(tokens, block_kv)
        kk = selected_count(nk, topk)
        bh, d = batch * heads, head_dim
        scoring = 2.0 * bh * nq * nk * d
        sparse = 4.0 * bh * (nq * block_q) * (kk * block_kv) * d
        linear = 0.0
        if linear_over == "all" or kk < nk:
            linear = 2.0 * bh * (nk * block_kv * d * d + nq * block_q * (d * d + d))
        dense = dense_flops(batch, heads, tokens, head_dim)
        return Flops(actual=scoring + sparse + linear, dense=dense, overhead=scoring)

    def reference_workspace(self, *args, **kwargs) -> float:
        return _reference_module.reference_workspace(*args, **kwargs)

    # ----- honest labels ------------------------------------------------------------
    def _kept(self, tokens, block_q, block_kv, topk):
        nq, nk = num_blocks(tokens, block_q), num_blocks(tokens, block_kv)
        return nq, nk, selected_count(nk, topk)

    def density_model(self, layout, *, topk, block_q, block_kv, **_opts) -> float:
        """Exact pairs of the kept blocks over N²: every query block keeps ``kk`` KV blocks;
        a partial last block (queries or keys) counts its real tokens only. The selection
        depends on the data, so the count of a partial last KV block is taken at its
        share ``kk/nk`` of the query blocks' choices (exact when bkv divides N)."""
        tokens = layout.tokens
        _, nk, kk = self._kept(tokens, block_q, block_kv, topk)
        last = tokens - (nk - 1) * block_kv  # tokens of the last KV block
        keys_per_query = kk * block_kv if last == block_kv else \
            kk * ((nk - 1) * block_kv + last) / nk
        return min(1.0, tokens * keys_per_query / float(tokens) ** 2)

    def rounded_options(self, layout, *, topk, block_q, block_kv, order, **_opts):
        nq, nk, kk = self._kept(layout.tokens, block_q, block_kv, topk)
        rounded = {"q_blocks": nq, "kv_blocks": nk, "kept_blocks": kk, "effective_topk": kk / nk,
                   "blocks": describe_order(layout, order, min(block_q, block_kv))}
        if official_count(nk, topk) != kk:  # the official rule keeps none: one is kept
            rounded["official_kept_blocks"] = official_count(nk, topk)
        return rounded

    def rounding_checks(self, layout, *, topk, block_q, block_kv, **_opts):
        _, nk, kk = self._kept(layout.tokens, block_q, block_kv, topk)
        return [(topk, kk / nk,
                 f"sla:topk={topk:g} keeps {kk} of {nk} blocks ({kk / nk:.0%})")]


__all__ = [
    "CORRECTION",
    "CORRECTIONS",
    "FEATURE_MAPS",
    "PARTS",
    "SLA",
    "TRITON_MODULE",
    "SLACore",
    "block_indices",
    "block_logits",
    "block_map",
    "block_scores",
    "gather_chunk_blocks",
    "indices_to_map",
    "mean_pool",
    "num_blocks",
    "selected_count",
    "sla_gather_parts",
    "sla_parts",
    "sla_reference_parts",
    "sla_triton_parts",
]
