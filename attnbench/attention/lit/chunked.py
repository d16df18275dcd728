"""LiT's CPU path: the state and the readout in token chunks, nothing N-sized but the output.

The reference (``reference.py``) forms φ(q) and φ(k) whole: two ``[B, H, N, d]``
float temporaries beside q, k, v and the output (3-4× softmax's peak memory on
a CPU). Here the sums ``S = Σ_j φ(k_j)ᵀ v_j`` and ``z = Σ_j φ(k_j)`` are
accumulated over chunks of keys, and the readout ``φ(q_i) S̄ / (φ(q_i) z̄ + eps)``
is one matmul per chunk of queries against ``[S̄ | z̄]``, so the workspace is a chunk
of features and the ``d×d`` state whatever N is.

The chunk is sized from a workspace budget (:func:`chunk_tokens`): when the readout
of every query fits it, the path runs as one chunk -- a dozen torch calls, the fewest
the formula allows, since at the sizes where LiT is a few milliseconds a call's fixed
cost (dispatch, allocation, waking the other threads) is a large share of it; the
φ(q) of that chunk is freed before the output is formed, so its peak is the output and
one readout. Above the budget the chunks keep a fixed number of chunk-sized
temporaries. The formula, the feature map and the accumulation dtype are the
reference's (:func:`attnbench.attention.lit.reference.linear_attention`); autograd runs
through the chunks (pure torch ops), so the path also trains.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from ..paths import FastPath
from ..softmax.reference import accumulation_dtype
from .reference import EPS, PHI_SHIFT

#: a chunk's temporaries as a fraction of q's bytes (the path's peak is then the
#: output plus this) ...
WORKSPACE_FRACTION = 0.25
#: ... but at least this many bytes: below it a step is too small for the calls' fixed
#: cost not to dominate it
WORKSPACE_MIN_BYTES = 4 << 20
#: chunk-sized temporaries of a readout step when there are several: the features, the
#: numerator (divided in place) and, with autograd, the quotient before it is written into
#: the output
CHUNK_COPIES = 3
#: ... and of the one step when there is one: relu(q) beside the numerator, which becomes
#: the output (in the accumulation dtype: the output itself for float32 inputs)
SINGLE_COPIES = 2


def chunk_tokens(batch_heads: int, tokens: int, head_dim: int, element_size: int) -> int:
    """Tokens per chunk: all of them when the readout of every query (``N·(d+1)``
    floats per batch·head) fits the budget -- :data:`WORKSPACE_FRACTION` of q's bytes, at
    least :data:`WORKSPACE_MIN_BYTES` --, else as many as keep :data:`CHUNK_COPIES`
    chunk-sized temporaries within it."""
    row = max(1, batch_heads) * (head_dim + 1) * max(element_size, 4)
    budget = max(WORKSPACE_FRACTION * batch_heads * tokens * head_dim * element_size,
                 WORKSPACE_MIN_BYTES)
    if tokens * row <= budget:
        return max(1, tokens)
    return max(1, int(budget // (CHUNK_COPIES * row)))


def _chunks(n: int, step: int):
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _relu(x: torch.Tensor, acc: torch.dtype, spare: torch.Tensor | None) -> torch.Tensor:
    """``relu(x)`` in ``acc`` (NaN kept): a fresh chunk, or without autograd written into
    the storage of ``spare`` (one flat buffer every chunk of keys and queries reuses, so
    the allocator never has to find room for a second one)."""
    if spare is None:
        return torch.relu(x.to(acc))
    return torch.clamp_min(x.to(acc), 0, out=spare[: x.numel()].view(x.shape))


def _state(k: torch.Tensor, v: torch.Tensor, step: int, acc: torch.dtype, shift: float,
           spare: torch.Tensor | None) -> torch.Tensor:
    """``[Σ φ(k_j)ᵀ v_j | Σ φ(k_j)]`` (``[B, H, d, e + 1]``), summed over key chunks of
    ``step`` tokens (one matmul and one sum per chunk, as the FLOP model counts them).

    ``φ(k) = relu(k) + shift`` is never formed: ``Σ φ(k_j)ᵀ v_j = Σ relu(k_j)ᵀ v_j +
    shift·(1 ⊗ Σ v_j)`` and ``Σ φ(k_j) = Σ relu(k_j) + N·shift``, so the shift costs a sum
    of v instead of a pass over every chunk of features."""
    b, h, n, d = k.shape
    total = k.new_zeros(b, h, d, v.shape[-1] + 1, dtype=acc)
    for rows in _chunks(n, step):
        rk = _relu(k[:, :, rows], acc, spare)
        total += torch.cat((torch.matmul(rk.transpose(-1, -2), v[:, :, rows].to(acc)),
                            rk.sum(dim=-2).unsqueeze(-1)), dim=-1)
    if shift:
        total[..., :-1] += shift * v.sum(dim=-2, dtype=acc).unsqueeze(-2)
        total[..., -1] += n * shift
    return total


def _readout(queries: torch.Tensor, both: torch.Tensor, acc: torch.dtype, shift: float,
             eps: float, spare: torch.Tensor | None) -> torch.Tensor:
    """``φ(Q) S̄ / (φ(Q) z̄ + eps)`` for ``both = [S̄ | z̄]``, in the accumulation dtype.

    The numerator and the denominator are each a ``baddbmm`` of ``relu(Q)`` whose added
    row carries the shift (``φ(q)·x = relu(q)·x + shift·Σ x``) and eps; without autograd
    the numerator is divided in place and is the result, so nothing the size of the
    queries is allocated after ``relu(Q)``'s numerator."""
    e = both.shape[-1] - 1
    bias = shift * both.sum(dim=-2, keepdim=True)  # [B, H, 1, e + 1]
    bias[..., e] += eps
    features, both, bias = _relu(queries, acc, spare).flatten(0, 1), both.flatten(0, 1), \
        bias.flatten(0, 1)
    numerator = torch.baddbmm(bias[..., :e], features, both[..., :e])
    denominator = torch.baddbmm(bias[..., e:], features, both[..., e:])
    del features
    out = numerator / denominator if numerator.requires_grad else numerator.div_(denominator)
    return out.view(*queries.shape[:3], e)


def chunked_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = EPS,
    phi_shift: float = PHI_SHIFT, **_geometry,
) -> torch.Tensor:
    """LiT linear attention (``reference.py``'s formula) in chunks of :func:`chunk_tokens`
    tokens; one chunk (no loop, no copy into the output) when they all fit."""
    acc = accumulation_dtype(q.dtype)
    b, h, n, d = k.shape
    step = chunk_tokens(b * h, n, d, q.element_size())
    spare = None  # with autograd every chunk's features are its own (the backward keeps them)
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
        spare = q.new_empty(b * h * min(step, max(n, q.shape[2])) * d, dtype=acc)
    with record_function("lit.state"):
        both = _state(k, v, step, acc, phi_shift, spare) / max(1, n)  # [B, H, d, e + 1]
    with record_function("lit.readout"):
        if q.shape[2] <= step:
            return _readout(q, both, acc, phi_shift, eps, spare).to(q.dtype)
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        for rows in _chunks(q.shape[2], step):
            out[:, :, rows] = _readout(q[:, :, rows], both, acc, phi_shift, eps, spare)
    return out


def _workspace(batch, heads, tokens, head_dim, layout, *, element_size, **_opts) -> float:
    """A readout step's chunk-sized temporaries (:data:`SINGLE_COPIES` when the tokens are
    one chunk, else :data:`CHUNK_COPIES`; a state step's φ(k) is no larger), and the
    ``d × (d+1)`` state and its running sum."""
    acc = max(element_size, 4)
    chunk = chunk_tokens(batch * heads, tokens, head_dim, element_size)
    copies = SINGLE_COPIES if chunk >= tokens else CHUNK_COPIES
    return float(batch * heads * (copies * min(tokens, chunk) * (head_dim + 1) * acc
                                  + 2 * head_dim * (head_dim + 1) * acc))


CHUNKED = FastPath(
    "chunked",
    chunked_linear_attention,
    workspace=_workspace,
    doc="pure torch: φ(K)ᵀV and the normaliser, then the readout, over token chunks sized "
    f"from a workspace budget ({WORKSPACE_FRACTION:g} of q's bytes, at least "
    f"{WORKSPACE_MIN_BYTES >> 20} MiB; one chunk when the readout fits it), no N-sized "
    "temporary beside the output; differentiable",
)
