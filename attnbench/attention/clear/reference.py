"""CLEAR in pure PyTorch, any dtype (float64 included): the oracle of the fast paths."""

from __future__ import annotations

import torch

from ..softmax import reference as _softmax
from ..softmax.reference import softmax_reference
from .pooling import extend_kv, extended_bytes
from .window import Window, _args, _band_keys, _image_chunks, _index, _row_block, allowed


def clear_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: Window,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLEAR in pure PyTorch, any dtype; memory O(chunk), never N×N.

    Global queries attend to all N non-pooled keys (plain softmax). Image
    queries go ``rows`` grid rows at a time; their keys are the global ones,
    the grid rows within ``reach`` of the chunk, and the pooled ones, masked by
    :func:`allowed` and handed to :func:`softmax_reference`.
    """
    b, h, n, _ = q.shape
    g = window.global_tokens
    k, v = extend_kv(k, v, window, weight)
    out = torch.empty(b, h, n, v.shape[-1], dtype=q.dtype, device=q.device)
    if g:
        out[:, :, :g] = softmax_reference(q[:, :, :g], k[:, :, :n], v[:, :, :n])
    for q0, q1, keys in _image_chunks(window, b * h, q.device):
        mask = allowed(_index(q0, q1, q.device)[:, None], keys[None, :], _args(window))
        out[:, :, q0:q1] = softmax_reference(
            q[:, :, q0:q1], k.index_select(2, keys), v.index_select(2, keys), key_mask=mask
        )
    return out



def reference_workspace(window: Window, batch: int, heads: int, head_dim: int, *,
                        element_size: int) -> float:
    """Bytes beside q, k, v, out: the largest chunk of scores, its mask and gathered K, V."""
    bh = batch * heads
    acc = max(element_size, 4)
    rows = _row_block(window, bh)
    q_rows, keys = rows * window.wg, _band_keys(window, rows)
    chunk = (
        2.0 * bh * q_rows * keys * acc  # scores and probabilities
        + q_rows * keys * (1 + 3 * 4)  # the bool mask, its int32 index math
        + 2.0 * bh * keys * head_dim * element_size  # gathered K, V
    )
    text = 0.0
    if window.global_tokens:
        budget = _softmax.REFERENCE_CHUNK_ELEMENTS
        text_rows = max(1, min(window.global_tokens, budget // max(1, bh * window.tokens)))
        text = 2.0 * bh * text_rows * window.tokens * acc
    return extended_bytes(window, bh, head_dim, element_size) + max(chunk, text)
