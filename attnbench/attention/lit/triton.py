"""LiT's linear attention as fused Triton kernels: forward and backward.

``O_i = φ(q_i) S̄ / (φ(q_i) z̄ + eps)``, ``S̄ = Σ_j φ(k_j)ᵀ v_j / N`` (d×d),
``z̄ = Σ_j φ(k_j) / N``, ``φ(x) = relu(x) + shift`` (0 outside the valid head
dims and tokens), everything accumulated in float32: the formula of
:func:`attnbench.attention.lit.reference.linear_attention`. The sums are the
kernels'; the division by N is one scaling of the small state.

Forward, two launches and one tiny reduction:

1. ``_state_kernel`` -- reads K and V once. Grid ``(tiles², B·H, splits)``: the
   head dim is cut into ``T = ceil(d / BD)`` tiles of ``BD`` (:func:`head_tile`:
   d=64 → one 64 tile; d=72 (DiT-XL) → three tiles of 32, padded to 96 with
   masks), every program owns one ``BD×BD`` tile of ``S`` (and of ``z``) over one
   contiguous split of the tokens, and writes its partial state. Splits exist
   only to fill the GPU when B·H is small (:func:`split_plan`); the per-split
   partials (``B·H·splits·(T·BD)²`` floats, ~2 MiB at DiT-XL/2 8192 px) are summed
   by one ``torch.sum`` -- deterministic, unlike atomics.
2. ``_readout_kernel`` -- reads Q once (T programs share each Q block through
   L2) and the fp32 state, writes O once.

HBM traffic is therefore ``4·B·H·N·d·s`` bytes (q, k, v read once, out written
once; ``s`` = element size) plus O(B·H·d²) for the states: the floor of any
implementation. Work per token and head is ``4·DP²`` FLOPs (DP = T·BD, the
padded dim), far below the tensor-core ridge of an H100 at d = 64 or 72, so
the kernel is bound by memory bandwidth (``attnbench.bench.floor`` measures both).

Precision: ``φ(k)ᵀv`` runs on the tensor cores in the input dtype (ReLU of a
half value is exact; other feature maps, used by SLA, are rounded to it) with
float32 accumulation; the readout ``φ(q)·S`` keeps S in float32 (TF32 operands
for half inputs -- exact for the bf16/fp16 ``φ(q)``, 2⁻¹¹ relative on S; IEEE
float32 for float32 inputs).

``attnbench.bench.compile_check`` compiles every autotuning config for sm_90/sm_80
without a GPU and reports register spills.

Backward (a ``torch.autograd.Function``, all Triton, for distillation): with
``w_i = 1/den_i`` and ``g_i = −(dO_i·O_i)/den_i`` (``_bwd_pre_kernel``),
``dS = Σ φ(q)ᵀ(w⊙dO)`` and ``dz = Σ g⊙φ(q)`` are the same state kernel with
row weights; ``_bwd_apply_kernel`` then gives, per token,
``dq = 1[q>0] ⊙ ((w⊙dO) Sᵀ + g zᵀ)``, ``dk = 1[k>0] ⊙ (v dSᵀ + dz)``, ``dv = φ(k) dS``.
It reads q, k, v, O, dO and writes dq, dk, dv: ~9 N·d tensors of traffic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import as_bhnd, cdiv, interpret_requested, next_pow2, program_target

#: decided once, as ``@triton.jit`` below decides: interpreted or compiled kernels
INTERPRETED = interpret_requested()

FEATURES = {"relu": 0, "softmax": 1, "elu": 2}
#: token granularity of the splits of the state kernel (a multiple of every BLOCK_N)
SPLIT_GRANULE = 128
#: fixed meta-parameters for the interpreter (autotuning would only multiply its time)
_INTERPRET_META = {"state": {"BLOCK_N": 32}, "readout": {"BLOCK_M": 32}, "bwd": {"BLOCK_M": 32}}


def _autotune(configs, key):
    """``triton.autotune`` when compiled; the identity under the interpreter."""
    if INTERPRETED:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


def _meta(name: str) -> dict:
    return dict(_INTERPRET_META[name]) if INTERPRETED else {}


def head_tile(d: int) -> int:
    """The tile BD of the head dim: one power-of-2 tile up to 64, else 32 or 64 by padding.

    64 → 64; 72 → 32 (3 tiles, 96 padded: 64 would pad to 128); 128 → 64;
    288 (LiT-XL's 4 heads) → 32 (9 tiles, no padding). ``tl.dot`` needs ≥ 16.
    """
    if d <= 64:
        return max(16, next_pow2(d))
    return min((64, 32), key=lambda t: (cdiv(d, t) * t, -t))


def dot_precision(dtype: torch.dtype) -> str:
    """Operand precision of the float32 dots: IEEE for float32 inputs, TF32 for half ones."""
    return "ieee" if dtype == torch.float32 else "tf32"


def split_plan(tokens: int, programs: int, device: torch.device, splits: int | None = None):
    """``(splits, chunk)``: token splits of the state kernel and tokens per split.

    Enough splits that ``programs × splits`` fills the device
    (:func:`~._triton.program_target`), each a multiple of ``SPLIT_GRANULE``
    tokens; ``splits`` forces a count (tests use it to exercise the reduction).
    """
    granules = cdiv(max(tokens, 1), SPLIT_GRANULE)
    want = splits if splits is not None else cdiv(program_target(device), max(1, programs))
    want = max(1, min(granules, want, 65535))
    chunk = cdiv(granules, want) * SPLIT_GRANULE
    return cdiv(max(tokens, 1), chunk), chunk


# --------------------------------------------------------------------------- kernels
#
# The kernels call no @triton.jit helper of triton.language itself (tl.zeros,
# tl.sum, tl.max are such helpers): those are interpreted only when triton was
# imported under TRITON_INTERPRET=1, and in a test process torch may import
# triton long before a test sets the variable. tl.full and tl.reduce are
# builtins; the combine functions below are triton's own, which the
# interpreter recognises and runs in NumPy.



@triton.jit
def _add(a, b):  # fallbacks for a triton without the combine functions below
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _add)
_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _maximum)


@triton.jit
def _rsum(x, AXIS: tl.constexpr):
    """``tl.sum(x, AXIS)`` of a float32 tensor."""
    return tl.reduce(x, AXIS, _SUM_COMBINE)


@triton.jit
def _rmax(x, AXIS: tl.constexpr):
    """``tl.max(x, AXIS)`` of a float32 tensor (no NaN handling needed here)."""
    return tl.reduce(x, AXIS, _MAX_COMBINE)


@triton.jit
def _phi(x, valid, FEATURE: tl.constexpr, AXIS: tl.constexpr):
    """Feature map of fp32 ``x`` (0 relu, 1 softmax over ``AXIS``, 2 elu+1), 0 where invalid.

    The softmax needs the whole row in ``x``; rows with no valid element give 0.
    """
    if FEATURE == 0:
        y = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif FEATURE == 1:
        x = tl.where(valid, x, float("-inf"))
        top = _rmax(x, AXIS)
        top = tl.where(top == float("-inf"), 0.0, top)
        e = tl.exp(x - tl.expand_dims(top, AXIS))
        total = _rsum(e, AXIS)
        total = tl.where(total > 0.0, total, 1.0)
        y = e / tl.expand_dims(total, AXIS)
    else:
        y = tl.where(x > 0.0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    return tl.where(valid, y, 0.0)


_STATE_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn in (64, 128)
    for w in (4, 8)
    for s in (2, 3)
]


@_autotune(_STATE_CONFIGS, key=["D", "T", "CHUNK", "SDIM", "FEATURE", "HAS_W", "F32_DOT"])
@triton.jit
def _state_kernel(
    A, B, W, U, S_part, Z_part,
    H, N, D, CHUNK, T, SDIM, SBLK, ZBLK, SHIFT,
    sa_b, sa_h, sa_n, sb_b, sb_h, sb_n,
    FEATURE: tl.constexpr, HAS_W: tl.constexpr, HAS_U: tl.constexpr,
    F32_DOT: tl.constexpr, PREC: tl.constexpr, BD: tl.constexpr, DROW: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Partial ``S[tk, tv] = Σ φ(A[:, tk])ᵀ (W ⊙ B[:, tv])`` and ``z[tk] = Σ U ⊙ φ(A[:, tk])``
    over one split of the tokens of one (batch, head).

    Split ``(bh, split)`` stores its state at ``S_part + (bh·splits + split)·SBLK`` as
    ``SDIM×SDIM`` (row stride SDIM: the padded T·BD, or d for compact per-block
    states) and its normaliser at ``Z_part + (bh·splits + split)·ZBLK``.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    n_split = tl.num_programs(2)
    tk = tile // T
    tv = tile % T
    a_ptr = A + (bh // H).to(tl.int64) * sa_b + (bh % H).to(tl.int64) * sa_h
    b_ptr = B + (bh // H).to(tl.int64) * sb_b + (bh % H).to(tl.int64) * sb_h
    offs_k = tk * BD + tl.arange(0, BD)
    offs_v = tv * BD + tl.arange(0, BD)
    k_ok = offs_k < D
    v_ok = offs_v < D
    acc = tl.full([BD, BD], 0.0, dtype=tl.float32)
    zacc = tl.full([BD], 0.0, dtype=tl.float32)
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, N)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < stop
        rows = offs_n.to(tl.int64)[:, None]
        a_ok = n_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptr + rows * sa_n + offs_k[None, :], mask=a_ok, other=0.0).to(tl.float32)
        if FEATURE == 1:  # softmax over the whole row: its max and sum from the full row
            offs_r = tl.arange(0, DROW)
            full = tl.load(a_ptr + rows * sa_n + offs_r[None, :],
                           mask=n_ok[:, None] & (offs_r < D)[None, :], other=float("-inf"))
            full = full.to(tl.float32)
            top = _rmax(full, 1)
            top = tl.where(top == float("-inf"), 0.0, top)
            total = _rsum(tl.exp(full - top[:, None]), 1)
            total = tl.where(total > 0.0, total, 1.0)
            fa = tl.where(a_ok, tl.exp(a - top[:, None]) / total[:, None], 0.0)
        else:
            fa = _phi(a, a_ok, FEATURE, 1)
        fa = tl.where(a_ok, fa + SHIFT, 0.0)  # LiT's relu(x) + shift; 0 for SLA's maps
        bt = tl.load(b_ptr + rows * sb_n + offs_v[None, :], mask=n_ok[:, None] & v_ok[None, :],
                     other=0.0)
        if HAS_W:
            w = tl.load(W + bh.to(tl.int64) * N + offs_n, mask=n_ok, other=0.0)
            bt = bt.to(tl.float32) * w[:, None]
        if HAS_U:
            u = tl.load(U + bh.to(tl.int64) * N + offs_n, mask=n_ok, other=0.0)
            zacc += _rsum(fa * u[:, None], 0)
        else:
            zacc += _rsum(fa, 0)
        if F32_DOT:
            acc = tl.dot(tl.trans(fa), bt.to(tl.float32), acc, input_precision=PREC)
        else:  # half inputs: φ(a) rounded to the input dtype (exact for ReLU)
            acc = tl.dot(tl.trans(fa.to(bt.dtype)), bt, acc)
    base = (bh * n_split + split).to(tl.int64)
    s_ok = (offs_k < SDIM)[:, None] & (offs_v < SDIM)[None, :]
    tl.store(S_part + base * SBLK + offs_k[:, None] * SDIM + offs_v[None, :],
             acc.to(S_part.dtype.element_ty), mask=s_ok)
    first = (tl.full([BD], 0, dtype=tl.int32) + tv) == 0  # one program per tk stores z
    tl.store(Z_part + base * ZBLK + offs_k, zacc.to(Z_part.dtype.element_ty),
             mask=first & (offs_k < SDIM))


_READOUT_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bm in (64, 128)
    for w in (4, 8)
    for s in (2, 3)
]


@_autotune(_READOUT_CONFIGS, key=["D", "T", "STORE_DEN"])
@triton.jit
def _readout_kernel(
    Q, S, Z, OUT, DEN,
    H, N, D, T, eps, SHIFT,
    sq_b, sq_h, sq_n, so_b, so_h, so_n,
    STORE_DEN: tl.constexpr, PREC: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``O[:, tv] = Σ_tk φ(Q[:, tk]) S[tk, tv] / (Σ_tk φ(Q[:, tk])·z[tk] + eps)`` for one
    block of queries; the denominator goes to ``DEN`` when the backward needs it."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    tv = pid % T
    pid_m = pid // T
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    q_ptr = Q + (bh // H).to(tl.int64) * sq_b + (bh % H).to(tl.int64) * sq_h + row0 * sq_n
    o_ptr = OUT + (bh // H).to(tl.int64) * so_b + (bh % H).to(tl.int64) * so_h + row0 * so_n
    dp = T * BD
    s_ptr = S + bh.to(tl.int64) * dp * dp
    z_ptr = Z + bh.to(tl.int64) * dp
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    offs_r = tl.arange(0, BLOCK_M)[:, None]
    offs_v = tv * BD + tl.arange(0, BD)
    num = tl.full([BLOCK_M, BD], 0.0, dtype=tl.float32)
    den = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    for tk in range(0, T):
        offs_k = tk * BD + tl.arange(0, BD)
        q_ok = m_ok[:, None] & (offs_k < D)[None, :]
        xq = tl.load(q_ptr + offs_r * sq_n + offs_k[None, :], mask=q_ok, other=0.0)
        fq = tl.maximum(xq.to(tl.float32), 0.0, propagate_nan=tl.PropagateNan.ALL)
        fq = tl.where(q_ok, fq + SHIFT, 0.0)
        s = tl.load(s_ptr + offs_k[:, None] * dp + offs_v[None, :])
        z = tl.load(z_ptr + offs_k)
        num = tl.dot(fq, s, num, input_precision=PREC)
        den += _rsum(fq * z[None, :], 1)
    den = den + eps
    out = num / den[:, None]
    o_ok = m_ok[:, None] & (offs_v < D)[None, :]
    tl.store(o_ptr + offs_r * so_n + offs_v[None, :], out.to(OUT.dtype.element_ty), mask=o_ok)
    if STORE_DEN:
        first = (tl.full([BLOCK_M], 0, dtype=tl.int32) + tv) == 0
        tl.store(DEN + bh.to(tl.int64) * N + offs_m, den, mask=m_ok & first)


@triton.jit
def _bwd_pre_kernel(
    DO, OUT, DEN, W, U,
    H, N, D, T,
    sd_b, sd_h, sd_n, so_b, so_h, so_n,
    BD: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``W = 1/den`` and ``U = −(dO·O)/den`` per token (float32 ``[B·H, N]``)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    do_ptr = DO + (bh // H).to(tl.int64) * sd_b + (bh % H).to(tl.int64) * sd_h + row0 * sd_n
    o_ptr = OUT + (bh // H).to(tl.int64) * so_b + (bh % H).to(tl.int64) * so_h + row0 * so_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    offs_r = tl.arange(0, BLOCK_M)[:, None]
    delta = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    for t in range(0, T):
        offs = t * BD + tl.arange(0, BD)
        ok = m_ok[:, None] & (offs < D)[None, :]
        do = tl.load(do_ptr + offs_r * sd_n + offs[None, :], mask=ok, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + offs_r * so_n + offs[None, :], mask=ok, other=0.0).to(tl.float32)
        delta += _rsum(do * o, 1)
    row = bh.to(tl.int64) * N + offs_m
    w = 1.0 / tl.load(DEN + row, mask=m_ok, other=1.0)
    tl.store(W + row, w, mask=m_ok)
    tl.store(U + row, -delta * w, mask=m_ok)


_BWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=2) for bm in (32, 64) for w in (4, 8)
]


@_autotune(_BWD_CONFIGS, key=["D", "T"])
@triton.jit
def _bwd_apply_kernel(
    Q, K, V, DO, W, U, S, Z, DS, DZ, DQ, DK, DV,
    H, N, D, T, SHIFT,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sd_b, sd_h, sd_n,
    sg_b, sg_h, sg_n,
    PREC: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Tile ``t`` of dq, dk, dv for one block of tokens (see the module docstring)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    t = pid % T
    pid_m = pid // T
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    q_ptr = Q + b * sq_b + h * sq_h + row0 * sq_n
    k_ptr = K + b * sk_b + h * sk_h + row0 * sk_n
    v_ptr = V + b * sv_b + h * sv_h + row0 * sv_n
    do_ptr = DO + b * sd_b + h * sd_h + row0 * sd_n
    dp = T * BD
    s_ptr = S + bh.to(tl.int64) * dp * dp
    ds_ptr = DS + bh.to(tl.int64) * dp * dp
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    rows = tl.arange(0, BLOCK_M)[:, None]
    w = tl.load(W + bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
    g = tl.load(U + bh.to(tl.int64) * N + offs_m, mask=m_ok, other=0.0)
    offs_t = t * BD + tl.arange(0, BD)
    t_ok = m_ok[:, None] & (offs_t < D)[None, :]
    gq = tl.full([BLOCK_M, BD], 0.0, dtype=tl.float32)
    gk = tl.full([BLOCK_M, BD], 0.0, dtype=tl.float32)
    gv = tl.full([BLOCK_M, BD], 0.0, dtype=tl.float32)
    for j in range(0, T):
        offs_j = j * BD + tl.arange(0, BD)
        j_ok = m_ok[:, None] & (offs_j < D)[None, :]
        do = tl.load(do_ptr + rows * sd_n + offs_j[None, :], mask=j_ok, other=0.0)
        do = do.to(tl.float32) * w[:, None]
        vj = tl.load(v_ptr + rows * sv_n + offs_j[None, :], mask=j_ok, other=0.0)
        kj = tl.load(k_ptr + rows * sk_n + offs_j[None, :], mask=j_ok, other=0.0)
        fkj = tl.where(j_ok, tl.maximum(kj.to(tl.float32), 0.0) + SHIFT, 0.0)
        s_tj = tl.load(s_ptr + offs_t[None, :] * dp + offs_j[:, None])  # S[t, j]ᵀ
        ds_tj = tl.load(ds_ptr + offs_t[None, :] * dp + offs_j[:, None])  # dS[t, j]ᵀ
        ds_jt = tl.load(ds_ptr + offs_j[:, None] * dp + offs_t[None, :])  # dS[j, t]
        gq = tl.dot(do, s_tj, gq, input_precision=PREC)
        gk = tl.dot(vj.to(tl.float32), ds_tj, gk, input_precision=PREC)
        gv = tl.dot(fkj, ds_jt, gv, input_precision=PREC)
    z = tl.load(Z + bh.to(tl.int64) * dp + offs_t)
    dz = tl.load(DZ + bh.to(tl.int64) * dp + offs_t)
    q = tl.load(q_ptr + rows * sq_n + offs_t[None, :], mask=t_ok, other=0.0)
    k = tl.load(k_ptr + rows * sk_n + offs_t[None, :], mask=t_ok, other=0.0)
    dq = tl.where(q > 0, gq + g[:, None] * z[None, :], 0.0)
    dk = tl.where(k > 0, gk + dz[None, :], 0.0)
    out = b * sg_b + h * sg_h + row0 * sg_n + (rows * sg_n + offs_t[None, :])
    tl.store(DQ + out, dq.to(DQ.dtype.element_ty), mask=t_ok)
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=t_ok)
    tl.store(DV + out, gv.to(DV.dtype.element_ty), mask=t_ok)


# --------------------------------------------------------------------------- launchers


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_state(a, b, s_part, z_part, splits, chunk, sdim, sblk, zblk, bd, feature, w, u,
                  shift=0.0):
    bsz, heads, n, d = a.shape
    t = cdiv(d, bd)
    if bsz * heads > 65535 or splits > 65535:
        raise ValueError(
            f"batch × heads = {bsz * heads} or {splits} splits exceed the kernel grid (65535)"
        )
    _state_kernel[(t * t, bsz * heads, splits)](
        a, b, w if w is not None else s_part, u if u is not None else s_part, s_part, z_part,
        heads, n, d, chunk, t, sdim, sblk, zblk, float(shift), *_strides(a), *_strides(b),
        FEATURE=FEATURES[feature], HAS_W=w is not None, HAS_U=u is not None,
        F32_DOT=a.dtype == torch.float32 or w is not None, PREC=dot_precision(a.dtype), BD=bd,
        DROW=max(16, next_pow2(d)), **_meta("state"),
    )  # fmt: skip


def linear_state(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    feature: str = "relu",
    w: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    tile: int | None = None,
    splits: int | None = None,
    shift: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(S, z, BD)``: ``S = Σ_n φ(a_n)ᵀ (w_n b_n)`` float32 ``[B·H, DP, DP]`` and
    ``z = Σ_n u_n φ(a_n)`` ``[B·H, DP]``, DP = ``ceil(d/BD)·BD`` (zero padding).

    ``a``, ``b``: ``[B, H, N, d]`` with unit stride over d; ``w``, ``u``: optional
    float32 ``[B·H, N]`` row weights (the backward's). The softmax feature map
    takes its row max and sum from the whole row, whatever the tile. ``shift`` is
    added to φ on valid entries (LiT's ``relu(x) + 1e-6``).
    """
    bsz, heads, n, d = a.shape
    bd = tile or head_tile(d)
    dp = cdiv(d, bd) * bd
    bh = bsz * heads
    n_split, chunk = split_plan(n, bh * cdiv(d, bd) ** 2, a.device, splits)
    s_part = torch.empty(bh, n_split, dp, dp, dtype=torch.float32, device=a.device)
    z_part = torch.empty(bh, n_split, dp, dtype=torch.float32, device=a.device)
    _launch_state(a, b, s_part, z_part, n_split, chunk, dp, dp * dp, dp, bd, feature, w, u,
                  shift)
    if n_split == 1:
        return s_part[:, 0], z_part[:, 0], bd
    return s_part.sum(dim=1), z_part.sum(dim=1), bd


def block_states(
    a: torch.Tensor, b: torch.Tensor, *, feature: str, block: int, dtype: torch.dtype
) -> torch.Tensor:
    """Per block of ``block`` tokens, ``[h_j | z_j]``: ``[B·H, blocks, d·d + d]`` in ``dtype``.

    ``h_j = Σ_{n∈j} φ(a_n)ᵀ b_n`` (row-major d×d) followed by ``z_j = Σ_{n∈j} φ(a_n)``,
    side by side so that one batched matmul sums both over any set of blocks
    (SLA's "gemm" correction). Float32 accumulation, stored in ``dtype``.
    """
    bsz, heads, n, d = a.shape
    blocks = cdiv(n, block)
    out = torch.empty(bsz * heads, blocks, d * d + d, dtype=dtype, device=a.device)
    _launch_state(a, b, out, out[..., d * d :], blocks, block, d, d * d + d, d * d + d,
                  head_tile(d), feature, None, None)
    return out


def _readout(q, state, normaliser, bd, eps, shift, need_den):
    bsz, heads, n, d = q.shape
    t = cdiv(d, bd)
    out = torch.empty(bsz, heads, n, d, dtype=q.dtype, device=q.device)
    den = torch.empty(bsz * heads, n, dtype=torch.float32, device=q.device) if need_den else out

    def grid(meta):
        return (t * cdiv(n, meta["BLOCK_M"]), bsz * heads)

    _readout_kernel[grid](
        q, state, normaliser, out, den, heads, n, d, t, float(eps), float(shift),
        *_strides(q), *_strides(out),
        STORE_DEN=need_den, PREC=dot_precision(q.dtype), BD=bd, **_meta("readout"),
    )  # fmt: skip
    return out, (den if need_den else None)


def forward(q, k, v, eps: float, *, phi_shift: float = 0.0, need_den: bool = False,
            splits: int | None = None):
    """``(out, S̄, z̄, den, BD)`` of LiT linear attention (``den`` only when ``need_den``)."""
    q, k, v = as_bhnd(q), as_bhnd(k), as_bhnd(v)
    state, normaliser, bd = linear_state(k, v, feature="relu", splits=splits, shift=phi_shift)
    n = max(1, k.shape[2])
    state, normaliser = state / n, normaliser / n  # sums → the means of the formula
    out, den = _readout(q, state, normaliser, bd, eps, phi_shift, need_den)
    return out, state, normaliser, den, bd


def backward(q, k, v, out, do, state, normaliser, den, bd, *, phi_shift: float = 0.0,
             splits: int | None = None):
    """``(dq, dk, dv)`` of LiT linear attention (see the module docstring); ``state`` and
    ``normaliser`` are the means S̄, z̄, so the state gradients are divided by N."""
    bsz, heads, n, d = q.shape
    t = cdiv(d, bd)
    do = as_bhnd(do)
    w = torch.empty(bsz * heads, n, dtype=torch.float32, device=q.device)
    u = torch.empty_like(w)
    block = 32 if INTERPRETED else 64
    _bwd_pre_kernel[(cdiv(n, block), bsz * heads)](
        do, out, den, w, u, heads, n, d, t, *_strides(do), *_strides(out), BD=bd, BLOCK_M=block,
    )  # fmt: skip
    dstate, dnorm, _ = linear_state(q, do, feature="relu", w=w, u=u, tile=bd, splits=splits,
                                    shift=phi_shift)
    dstate, dnorm = dstate / max(1, n), dnorm / max(1, n)
    dq, dk, dv = (torch.empty(bsz, heads, n, d, dtype=q.dtype, device=q.device) for _ in range(3))

    def grid(meta):
        return (t * cdiv(n, meta["BLOCK_M"]), bsz * heads)

    _bwd_apply_kernel[grid](
        q, k, v, do, w, u, state, normaliser, dstate, dnorm, dq, dk, dv, heads, n, d, t,
        float(phi_shift),
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        PREC=dot_precision(q.dtype), BD=bd, **_meta("bwd"),
    )  # fmt: skip
    return dq, dk, dv


class LinearAttention(torch.autograd.Function):
    """Autograd through the Triton forward and backward kernels."""

    @staticmethod
    def forward(ctx, q, k, v, eps, phi_shift):
        need = any(ctx.needs_input_grad[:3])
        out, state, normaliser, den, bd = forward(q, k, v, eps, phi_shift=phi_shift,
                                                  need_den=need)
        if need:
            ctx.save_for_backward(q, k, v, out, state, normaliser, den)
            ctx.bd, ctx.phi_shift = bd, phi_shift
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, state, normaliser, den = ctx.saved_tensors
        q, k, v = as_bhnd(q), as_bhnd(k), as_bhnd(v)
        dq, dk, dv = backward(q, k, v, out, do, state, normaliser, den, ctx.bd,
                              phi_shift=ctx.phi_shift)
        return dq, dk, dv, None, None


def linear_attention(q, k, v, *, eps: float, phi_shift: float = 0.0) -> torch.Tensor:
    """LiT linear attention ``[B, H, N, d]`` in and out, differentiable.

    ``phi_shift=0`` is the plain ReLU kernel; LiT's backend passes its 1e-6.
    """
    if q.shape[2] == 0:
        return torch.empty_like(q)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return LinearAttention.apply(q, k, v, eps, phi_shift)
    return forward(q, k, v, eps, phi_shift=phi_shift)[0]
