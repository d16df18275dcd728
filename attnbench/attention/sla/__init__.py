"""SLA: Sparse-Linear Attention (Zhang et al., arXiv 2509.24006; code thu-ml/SLA).

Tokens are cut into blocks of ``block_q`` queries and ``block_kv`` keys: 1-D
runs in a locality-preserving order (``order.py``: 8×8 tiles of an image, 4×4×4
cubes of a video, text tokens after them in blocks of their own;
``order="row-major"`` keeps the given order, as the reference code does). Every
path -- the block map, the selection, both branches, gather and Triton -- runs
on the tokens in that order; the outputs go back to the layout's. Per query
block, the ``topk`` fraction of KV blocks with the highest pooled score are
*critical* and get exact softmax attention restricted to them (``O_s``); the
other, *marginal*, blocks are summarised by linear attention (``O_l``)::

    O_s = softmax(Q Kᵀ/√d restricted to the critical blocks) V
    O_l = φ(Q) Σ_j φ(K_j)ᵀV_j / (φ(Q) Σ_j φ(K_j)ᵀ + eps)      j over the marginal blocks
    O   = O_s + proj_l(O_l)                                    proj_l = identity in attend()

``linear_over="all"`` runs the linear branch over every token instead, as the
newer reference code does; ``topk=1.0`` with the default ``"marginal"`` is exact
softmax attention.

Checked against the official code (thu-ml/SLA, ``sparse_linear_attention/core.py``
and ``utils.py``): kept blocks per query block ``min(K, int(topk·K))`` (here at
least 1: 0 would leave a softmax over nothing), block sizes 64, eps 1e-5, φ =
softmax by default; the official code returns ``real_topk / K``, the effective
fraction, beside the output (here :meth:`SLA.effective_options`).

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
from ..base import (
    AttentionBackend,
    FastPath,
    Flops,
    Grid,
    Option,
    dense_flops,
    positive,
    unit_fraction,
)
from ..layout import KINDS, Layout, text_first_geometry
from ..recipes import OWN_CHOICE, ConversionRecipe, DistillRecipe
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
    selected_count,
    selection_bytes,
)
from .constants import BLOCK_KV, BLOCK_Q, CORRECTION, CORRECTIONS, EPS, TOPK
from .core import SLACore
from .gather import gather_chunk_blocks, sla_gather_parts
from .order import ORDERS, describe_order, token_order
from .reference import sla_reference_parts

#: the kernel module (imports triton; loaded lazily by the path)
TRITON_MODULE = f"{__name__}.triton"
OFFICIAL = "thu-ml/SLA sparse_linear_attention/core.py"


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
    order: str = "row-major",
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


def _triton_probe(device, dtype, shape) -> str | None:
    return _triton.kernel_reason(TRITON_MODULE, device, dtype, shape)


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
    probe=_triton_probe,
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
        "SLA: block-sparse softmax on the top-k KV blocks per query block + linear "
        "attention on the marginal ones; fast path gathers the critical blocks"
    )
    paper = "Zhang et al., SLA, arXiv 2509.24006"
    options = (
        Option("topk", TOPK,
               "fraction of KV blocks each query block attends exactly (floor, at least 1)",
               float, check=unit_fraction, source="SLA paper: 5% critical blocks (95% sparsity)"),
        Option("block_q", BLOCK_Q, "query block size (tokens)", int, check=positive,
               source=OFFICIAL + " (BLKQ=64)"),
        Option("block_kv", BLOCK_KV, "key/value block size (tokens)", int, check=positive,
               source=OFFICIAL + " (BLKK=64)"),
        Option("feature_map", "softmax",
               "φ of the linear branch: softmax over the head dim, relu, or elu+1", str,
               choices=tuple(FEATURE_MAPS), source=OFFICIAL + " (feature_map='softmax')"),
        Option("linear_over", "marginal",
               "keys of the linear branch: the non-selected blocks (paper) or all (newer code)",
               str, choices=("marginal", "all"),
               source="SLA paper (the main branch's code runs it over all tokens)"),
        Option("eps", EPS, "added to the linear branch's normaliser", float, check=positive,
               source=OFFICIAL + " (1e-5)"),
        Option("order", "tiles",
               "token order of the blocks: 8×8 tiles / 4×4×4 cubes, text after (tiles), or "
               "the order given (row-major, as the official code)", str, choices=ORDERS,
               source="attnbench's choice: a block is a compact patch of the grid, not a "
               "strip of a row; the official code blocks the given order (row-major)"),
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
        "sla", {"diffusion": 1.0, "kd_out": 1.0}, "all",
        "diffusion + teacher-output MSE; every parameter trains; proj_l starts at zero. "
        "SLA publishes no training code or distillation loss: the teacher-output term and "
        "its weight 1.0 are attnbench's choice",
        OWN_CHOICE,
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
        return self.run(chosen, q, k, v, layout, fn=functools.partial(sla_parts, chosen),
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
            if perm is not None:
                q, k = layout.to_text_first(q), layout.to_text_first(k)
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
        ordered = opts["order"] != "row-major" and token_order(layout, opts["order"], block,
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
        return {"q_blocks": nq, "kv_blocks": nk, "kept_blocks": kk, "effective_topk": kk / nk,
                "blocks": describe_order(layout, order, min(block_q, block_kv))}

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
