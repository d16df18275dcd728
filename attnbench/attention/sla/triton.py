"""SLA's forward as one Triton kernel: block-sparse softmax + the marginal linear branch.

Per (query block, batch·head) program, over the ``kk`` critical KV blocks of the
shared :func:`attnbench.attention.sla.block_indices` (the LUT), in one pass:

* ``O_s``: FlashAttention-style online softmax over the critical blocks only
  (``exp2`` with the scale folded in; a partial last block is masked);
* ``O_l`` (``linear_over="marginal"``): "total minus selected". The total
  state ``S = Σ_all φ(K_j)ᵀV_j``, ``z = Σ_all φ(K_j)`` is built once per (batch,
  head) by :func:`attnbench.attention.lit.triton.linear_state` (LiT's state kernel, here with
  SLA's feature map); while a critical block's K and V are on chip, the
  share of the critical blocks is taken out in one of three ways (``correction``):

  - ``"gemm"`` (default): per-block states ``[h_j | z_j]`` from one more pass
    of the state kernel over K and V, summed over each query block's critical
    blocks by one batched matmul with the 0/1 selection map
    (:func:`gemm_corrections`, ``2·nq·nk·(d²+d)`` FLOPs per head: 16% of the
    sparse attention's at 95% sparsity, on cuBLAS); the kernel reads its
    ``ΔS_i, Δz_i`` once and computes ``O_l = φ(q)(S − ΔS_i) / (φ(q)(z − Δz_i) + eps)``.
    Nothing extra in the inner loop. Workspace ``B·H·(nq·nk + (nk + nq)·(d²+d))``
    half floats (1.9 GB at DiT-XL/2 8192 px); h_j and ΔS_i are bfloat16 for half
    inputs (a 2⁻⁹ rounding of a share that is a few % of the state).
  - ``"output"``: in the loop, ``W = φ(q)φ(K_j)ᵀ`` and ``W·V_j``, ``rowsum(W)``
    accumulated in output space, ``O_l = (φ(q)S − ΣWV) / (φ(q)z − ΣW + eps)``;
    every dot has the query block's 64 rows; 4·bq·bkv·D FLOPs per block, as
    much again as the sparse attention's. No workspace.
  - ``"state"``: in the loop, ``ΔS = Σ_sel φ(K_j)ᵀV_j``, ``Δz`` accumulated in
    registers: 2·bkv·D² FLOPs per block (62% of the sparse attention's at
    D = 80, bq = 64), but a D×D fp32 accumulator and 16-row dot pieces.

  No per-block state is stored: the workspace is O(B·H·d²).
  ``linear_over="all"`` takes nothing out; when every block is critical the
  branch is skipped and ``O_l = 0`` exactly (as the gather path does).

Both parts are written separately (``SLAMixer`` applies ``proj_l`` to ``O_l``).

The head dim is held as two power-of-2 pieces (:func:`head_pieces`: 72 = 64 + 8
padded to 16, so the dots run at 80, not 128); d ≤ 128. Block sizes are padded
to powers of 2 (≥ 16) with masks, so any ``block_q``/``block_kv`` works; 64 (the
default) wastes nothing.

Precision: ``QKᵀ``, ``PV`` and the correction's dots run on the tensor cores
in the input dtype with float32 accumulation, φ(K) rounded to the input dtype
exactly as the state kernel rounds it (so the subtraction removes identically
rounded terms); the readout ``φ(q)S`` keeps S in float32 (TF32 operands for
half inputs). Float32 inputs use IEEE float32 dots throughout (correct but
slow on GPU: ptxas spills heavily -- float32 is for tests, bf16 is the target).

``attnbench.bench.compile_check`` compiles every autotuning config for sm_90/sm_80
without a GPU and reports registers and spills; the autotuner picks among
4/8 warps × 2/3 stages per shape.

Forward only (``grad_devices=()`` in the registry): training uses the
pure-torch ``gather`` path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import as_bhnd, cdiv, interpret_requested, next_pow2
from ..lit.triton import FEATURES, _phi, _rmax, _rsum, block_states, dot_precision, linear_state
from .constants import CORRECTION, CORRECTIONS

INTERPRETED = interpret_requested()
MAX_HEAD_DIM = 128


def _autotune(configs, key):
    if INTERPRETED:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


def head_pieces(d: int) -> tuple[int, int]:
    """``(DA, DB)``: the head dim as a power-of-2 piece ≤ 64 plus a padded remainder (or 0).

    64 → (64, 0); 72 → (64, 16); 96 → (64, 32); 128 → (64, 64); 40 → (64, 0).
    """
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the SLA kernel supports head_dim <= {MAX_HEAD_DIM}, got {d}")
    da = min(64, max(16, next_pow2(d)))
    db = 0 if d <= da else max(16, next_pow2(d - da))
    return da, db


@triton.jit
def _phi2(xa, xb, va, vb, FEATURE: tl.constexpr, AXIS: tl.constexpr, HAS_B: tl.constexpr):
    """φ of a row split in two pieces (``xb`` ignored unless ``HAS_B``); 0 where invalid."""
    if FEATURE == 1:  # softmax over the whole row: both pieces
        xa = tl.where(va, xa, float("-inf"))
        top = _rmax(xa, AXIS)
        if HAS_B:
            xb = tl.where(vb, xb, float("-inf"))
            top = tl.maximum(top, _rmax(xb, AXIS))
        top = tl.expand_dims(tl.where(top == float("-inf"), 0.0, top), AXIS)
        ea = tl.exp(xa - top)
        total = _rsum(ea, AXIS)
        if HAS_B:
            eb = tl.exp(xb - top)
            total += _rsum(eb, AXIS)
        total = tl.expand_dims(tl.where(total > 0.0, total, 1.0), AXIS)
        ya = tl.where(va, ea / total, 0.0)
        if HAS_B:
            yb = tl.where(vb, eb / total, 0.0)
        else:
            yb = ya
    else:
        ya = _phi(xa, va, FEATURE, AXIS)
        if HAS_B:
            yb = _phi(xb, vb, FEATURE, AXIS)
        else:
            yb = ya
    return ya, yb


_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]


@_autotune(_CONFIGS, key=["D", "KK", "BQ", "BKV", "FEATURE", "LINEAR", "CORR"])
@triton.jit
def _sla_kernel(
    Q, K, V, LUT, S, Z, DS, DZ, OS, OL,
    H, N, D, KK, NQ, block_q, block_kv, DP, DSTRIDE, qk_scale, eps,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    FEATURE: tl.constexpr, LINEAR: tl.constexpr, F32_DOT: tl.constexpr, PREC: tl.constexpr,
    DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr, BQ: tl.constexpr,
    BKV: tl.constexpr, CORR: tl.constexpr,
):  # fmt: skip
    """One query block of one (batch, head): ``O_s`` and ``O_l`` (module docstring).

    ``LINEAR``: 0 none (``O_l`` left to the caller), 1 marginal, 2 all tokens.
    ``qk_scale`` = log2(e)/√d. ``S``/``Z``: the total state, row stride ``DP``.
    ``HAS_B``: the head dim has a second piece of ``DB`` columns (else DB is a
    placeholder size and every ``*_b`` tensor is unused). ``CORR`` (marginal
    only): 0 "output", 1 "state", 2 "gemm" -- ΔS (d×d) and Δz (d) of this query
    block read from ``DS``/``DZ`` + (bh·NQ + block)·``DSTRIDE``.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    # 64-bit scalar bases, 32-bit offsets inside a block (int64 offset tensors cost registers)
    q_ptr = Q + b * sq_b + h * sq_h + (pid_m * block_q).to(tl.int64) * sq_n
    k_ptr = K + b * sk_b + h * sk_h
    v_ptr = V + b * sv_b + h * sv_h

    offs_r = tl.arange(0, BQ)
    offs_m = pid_m * block_q + offs_r
    m_ok = (offs_r < block_q) & (offs_m < N)
    rows_q = offs_r[:, None] * sq_n
    offs_a = tl.arange(0, DA)
    a_ok = offs_a < D
    qa = tl.load(q_ptr + rows_q + offs_a[None, :], mask=m_ok[:, None] & a_ok[None, :],
                 other=0.0)
    qb = qa
    offs_b = offs_a
    b_ok = a_ok
    if HAS_B:
        offs_b = DA + tl.arange(0, DB)
        b_ok = offs_b < D
        qb = tl.load(q_ptr + rows_q + offs_b[None, :], mask=m_ok[:, None] & b_ok[None, :],
                     other=0.0)

    m_i = tl.full([BQ], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BQ], 0.0, dtype=tl.float32)
    acc_a = tl.full([BQ, DA], 0.0, dtype=tl.float32)
    acc_b = tl.full([BQ, DB], 0.0, dtype=tl.float32)
    if LINEAR == 1:
        if CORR == 1:  # ΔS = Σ_sel φ(K_j)ᵀV_j, Δz = Σ_sel φ(K_j)
            ds_aa = tl.full([DA, DA], 0.0, dtype=tl.float32)
            ds_ab = tl.full([DA, DB], 0.0, dtype=tl.float32)
            ds_ba = tl.full([DB, DA], 0.0, dtype=tl.float32)
            ds_bb = tl.full([DB, DB], 0.0, dtype=tl.float32)
            dz_a = tl.full([DA], 0.0, dtype=tl.float32)
            dz_b = tl.full([DB], 0.0, dtype=tl.float32)
        elif CORR == 0:  # Σ_sel (φ(q)φ(K_j)ᵀ) V_j and its row sums, in output space
            fqa, fqb = _phi2(qa.to(tl.float32), qb.to(tl.float32), m_ok[:, None] & a_ok[None, :],
                             m_ok[:, None] & b_ok[None, :], FEATURE, 1, HAS_B)
            if not F32_DOT:
                fqa = fqa.to(qa.dtype)
                fqb = fqb.to(qa.dtype)
            corr_a = tl.full([BQ, DA], 0.0, dtype=tl.float32)
            corr_b = tl.full([BQ, DB], 0.0, dtype=tl.float32)
            corr_den = tl.full([BQ], 0.0, dtype=tl.float32)

    lut_ptr = LUT + (bh.to(tl.int64) * NQ + pid_m) * KK
    offs_c = tl.arange(0, BKV)
    for j in range(0, KK):
        blk = tl.load(lut_ptr + j)
        offs_n = blk * block_kv + offs_c
        n_ok = (offs_c < block_kv) & (offs_n < N)
        cols = offs_n.to(tl.int64)
        kt_ok_a = a_ok[:, None] & n_ok[None, :]
        v_ok_a = n_ok[:, None] & a_ok[None, :]
        kta = tl.load(k_ptr + cols[None, :] * sk_n + offs_a[:, None], mask=kt_ok_a, other=0.0)
        va = tl.load(v_ptr + cols[:, None] * sv_n + offs_a[None, :], mask=v_ok_a, other=0.0)
        s = tl.dot(qa, kta, input_precision=PREC)
        ktb = kta
        vb = va
        kt_ok_b = kt_ok_a
        if HAS_B:
            kt_ok_b = b_ok[:, None] & n_ok[None, :]
            ktb = tl.load(k_ptr + cols[None, :] * sk_n + offs_b[:, None], mask=kt_ok_b, other=0.0)
            vb = tl.load(v_ptr + cols[:, None] * sv_n + offs_b[None, :],
                         mask=n_ok[:, None] & b_ok[None, :], other=0.0)
            s = tl.dot(qb, ktb, s, input_precision=PREC)
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, _rmax(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + _rsum(p, 1)
        acc_a = tl.dot(p.to(va.dtype), va, acc_a * alpha[:, None], input_precision=PREC)
        if HAS_B:
            acc_b = tl.dot(p.to(vb.dtype), vb, acc_b * alpha[:, None], input_precision=PREC)
        m_i = m_new
        if LINEAR == 1 and CORR < 2:  # the critical block's share of the linear branch
            fka, fkb = _phi2(kta.to(tl.float32), ktb.to(tl.float32), kt_ok_a, kt_ok_b,
                             FEATURE, 0, HAS_B)  # φ over the head dim: axis 0 of Kᵀ
            if not F32_DOT:  # rounded as the state kernel rounds φ(K)
                fka = fka.to(va.dtype)
                fkb = fkb.to(va.dtype)
            if CORR == 1:
                dz_a += _rsum(fka.to(tl.float32), 1)
                ds_aa = tl.dot(fka, va.to(fka.dtype), ds_aa, input_precision=PREC)
                if HAS_B:
                    dz_b += _rsum(fkb.to(tl.float32), 1)
                    ds_ab = tl.dot(fka, vb.to(fka.dtype), ds_ab, input_precision=PREC)
                    ds_ba = tl.dot(fkb, va.to(fka.dtype), ds_ba, input_precision=PREC)
                    ds_bb = tl.dot(fkb, vb.to(fka.dtype), ds_bb, input_precision=PREC)
            else:
                w = tl.dot(fqa, fka, input_precision=PREC)  # [BQ, BKV] = φ(q)φ(K_j)ᵀ
                if HAS_B:
                    w = tl.dot(fqb, fkb, w, input_precision=PREC)
                corr_den += _rsum(w, 1)
                corr_a = tl.dot(w.to(va.dtype), va, corr_a, input_precision=PREC)
                if HAS_B:
                    corr_b = tl.dot(w.to(vb.dtype), vb, corr_b, input_precision=PREC)

    o_ptr = b * so_b + h * so_h + (pid_m * block_q).to(tl.int64) * so_n + offs_r[:, None] * so_n
    out_a = m_ok[:, None] & a_ok[None, :]
    out_b = m_ok[:, None] & b_ok[None, :]
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    tl.store(OS + o_ptr + offs_a[None, :], (acc_a / l_i[:, None]).to(OS.dtype.element_ty),
             mask=out_a)
    if HAS_B:
        tl.store(OS + o_ptr + offs_b[None, :], (acc_b / l_i[:, None]).to(OS.dtype.element_ty),
                 mask=out_b)

    if LINEAR > 0:  # O_l = φ(q)(S − ΔS) / (φ(q)(z − Δz) + eps), one output piece at a time
        s_ptr = S + bh.to(tl.int64) * DP * DP
        z_ptr = Z + bh.to(tl.int64) * DP
        fqa, fqb = _phi2(qa.to(tl.float32), qb.to(tl.float32), m_ok[:, None] & a_ok[None, :],
                         m_ok[:, None] & b_ok[None, :], FEATURE, 1, HAS_B)
        z_a = tl.load(z_ptr + offs_a, mask=a_ok, other=0.0)
        if LINEAR == 1:
            if CORR == 1:
                z_a -= dz_a
            if CORR == 2:
                ds_ptr = DS + (bh.to(tl.int64) * NQ + pid_m) * DSTRIDE
                dz_ptr = DZ + (bh.to(tl.int64) * NQ + pid_m) * DSTRIDE
                z_a -= tl.load(dz_ptr + offs_a, mask=a_ok, other=0.0).to(tl.float32)
        den = _rsum(fqa * z_a[None, :], 1)
        if HAS_B:
            z_b = tl.load(z_ptr + offs_b, mask=b_ok, other=0.0)
            if LINEAR == 1:
                if CORR == 1:
                    z_b -= dz_b
                if CORR == 2:
                    z_b -= tl.load(dz_ptr + offs_b, mask=b_ok, other=0.0).to(tl.float32)
            den += _rsum(fqb * z_b[None, :], 1)
        if LINEAR == 1:
            if CORR == 0:
                den -= corr_den
        den = den + eps

        s_aa = tl.load(s_ptr + offs_a[:, None] * DP + offs_a[None, :],
                       mask=a_ok[:, None] & a_ok[None, :], other=0.0)
        if LINEAR == 1:
            if CORR == 1:
                s_aa -= ds_aa
            if CORR == 2:
                s_aa -= tl.load(ds_ptr + offs_a[:, None] * D + offs_a[None, :],
                                mask=a_ok[:, None] & a_ok[None, :], other=0.0).to(tl.float32)
        num_a = tl.dot(fqa, s_aa, input_precision=PREC)
        if HAS_B:
            s_ba = tl.load(s_ptr + offs_b[:, None] * DP + offs_a[None, :],
                           mask=b_ok[:, None] & a_ok[None, :], other=0.0)
            if LINEAR == 1:
                if CORR == 1:
                    s_ba -= ds_ba
                if CORR == 2:
                    s_ba -= tl.load(ds_ptr + offs_b[:, None] * D + offs_a[None, :],
                                    mask=b_ok[:, None] & a_ok[None, :], other=0.0).to(tl.float32)
            num_a = tl.dot(fqb, s_ba, num_a, input_precision=PREC)
        if LINEAR == 1:
            if CORR == 0:
                num_a -= corr_a
        tl.store(OL + o_ptr + offs_a[None, :], (num_a / den[:, None]).to(OL.dtype.element_ty),
                 mask=out_a)
        if HAS_B:
            s_ab = tl.load(s_ptr + offs_a[:, None] * DP + offs_b[None, :],
                           mask=a_ok[:, None] & b_ok[None, :], other=0.0)
            s_bb = tl.load(s_ptr + offs_b[:, None] * DP + offs_b[None, :],
                           mask=b_ok[:, None] & b_ok[None, :], other=0.0)
            if LINEAR == 1:
                if CORR == 1:
                    s_ab -= ds_ab
                    s_bb -= ds_bb
                if CORR == 2:
                    s_ab -= tl.load(ds_ptr + offs_a[:, None] * D + offs_b[None, :],
                                    mask=a_ok[:, None] & b_ok[None, :], other=0.0).to(tl.float32)
                    s_bb -= tl.load(ds_ptr + offs_b[:, None] * D + offs_b[None, :],
                                    mask=b_ok[:, None] & b_ok[None, :], other=0.0).to(tl.float32)
            num_b = tl.dot(fqa, s_ab, input_precision=PREC)
            num_b = tl.dot(fqb, s_bb, num_b, input_precision=PREC)
            if LINEAR == 1:
                if CORR == 0:
                    num_b -= corr_b
            tl.store(OL + o_ptr + offs_b[None, :],
                     (num_b / den[:, None]).to(OL.dtype.element_ty), mask=out_b)

def gemm_corrections(k, v, lut, kv_blocks: int, feature_map: str, block_kv: int) -> torch.Tensor:
    """``[ΔS_i | Δz_i]`` per query block: ``[B·H, nq, d·d + d]``, the critical blocks' share.

    Per-block states ``[h_j | z_j]`` (:func:`attnbench.attention.lit.triton.block_states`, one pass
    over K and V) summed over each query block's critical blocks by one batched
    matmul with the 0/1 selection map: ``2·nq·nk·(d² + d)`` FLOPs per (batch,
    head) on the tensor cores -- at 95% sparsity about 16% of the sparse
    attention's, against 100% for "output". bfloat16 operands for half inputs
    (the map is exact; h_j rounds to 2⁻⁹ of a share that is a few % of the
    state), float32 for float32 inputs.
    """
    bsz, heads = k.shape[:2]
    dtype = torch.float32 if k.dtype == torch.float32 else torch.bfloat16
    states = block_states(k, v, feature=feature_map, block=block_kv, dtype=dtype)
    bh, nq, kk = bsz * heads, lut.shape[-2], lut.shape[-1]
    selected = torch.zeros(bh, nq, kv_blocks, dtype=dtype, device=k.device)
    selected.scatter_(2, lut.view(bh, nq, kk).long(), 1.0)
    return torch.bmm(selected, states)


def sla_triton_parts(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    feature_map: str,
    linear_over: str,
    eps: float,
    correction: str | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O_s, O_l)`` of SLA by the Triton kernel; ``indices`` as :func:`sla.block_indices`.

    Same signature and semantics as ``sla_gather_parts``. ``correction`` picks
    how the critical blocks are taken out of the total linear state
    (:data:`CORRECTIONS`, default :data:`CORRECTION`); ``splits`` forces the state
    kernel's token splits (tests).
    """
    correction = correction or CORRECTION
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    bsz, heads, n, d = q.shape
    nq, nk, kk = cdiv(n, block_q), cdiv(n, block_kv), indices.shape[-1]
    if tuple(indices.shape) != (bsz, heads, nq, kk):
        raise ValueError(f"indices must be [B, H, {nq}, kk], got {tuple(indices.shape)}")
    da, db = head_pieces(d)
    q, k, v = as_bhnd(q), as_bhnd(k), as_bhnd(v)
    lut = indices.to(device=q.device, dtype=torch.int32).contiguous()
    if linear_over == "marginal":
        linear = 1 if kk < nk else 0  # every block critical: the marginal set is empty
    else:
        linear = 2
    o_s = torch.empty(bsz, heads, n, d, dtype=q.dtype, device=q.device)
    o_l = torch.empty_like(o_s) if linear else torch.zeros_like(o_s)
    if linear:
        state, normaliser, _ = linear_state(k, v, feature=feature_map, splits=splits)
        dp = state.shape[-1]
    else:
        state = normaliser = o_s  # unused
        dp = 1
    corrections = o_s  # unused unless "gemm"
    if linear == 1 and correction == "gemm":
        corrections = gemm_corrections(k, v, lut, nk, feature_map, block_kv)
    bq, bkv = max(16, next_pow2(block_q)), max(16, next_pow2(block_kv))
    f32_dot = q.dtype == torch.float32
    qk_scale = 1.4426950408889634 / d**0.5
    _sla_kernel[(nq, bsz * heads)](
        q, k, v, lut, state, normaliser, corrections, corrections[..., d * d :], o_s, o_l,
        heads, n, d, kk, nq, block_q, block_kv, dp, d * d + d, qk_scale, float(eps),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o_s.stride(0), o_s.stride(1), o_s.stride(2),
        FEATURE=FEATURES[feature_map], LINEAR=linear, F32_DOT=f32_dot,
        PREC=dot_precision(q.dtype), DA=da, DB=db or 16, HAS_B=db > 0, BQ=bq, BKV=bkv,
        CORR=CORRECTIONS.index(correction),
    )  # fmt: skip
    return o_s, o_l
