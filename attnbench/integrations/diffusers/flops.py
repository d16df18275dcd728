"""Analytic FLOPs of one denoising step of a diffusers transformer, text tokens included.

attnbench's convention (2 FLOPs per multiply-add, matrix contractions only):

* every ``nn.Linear`` and ``nn.Conv*`` costs ``2 · weight.numel() · positions ·
  batch``, where ``positions`` is what the module runs over: image (or video)
  tokens, text tokens, the joint sequence (FLUX's single-stream blocks), or one
  conditioning vector (timestep, pooled text, the AdaLN modulations). Convs'
  ``positions`` are their output positions: image tokens for patch embeddings
  and SANA's stride-1 Mix-FFN convs.
* self-attention: the method's ``flops`` on the layout's joint token count per
  layer (``backend.flops``; methods whose FLOP model does not take text tokens or
  video yet give ``None``, never a guess), plus its learned parts'
  ``mixer_flops`` where its ``AttentionCore`` holds them (a method whose core has
  no learned parts runs none); SD3.5's image-only ``attn2`` on the image tokens.
* cross-attention (PixArt, SANA, Wan: not swapped): ``4 · B · H · N · T · d``.

The model can be on the meta device: only parameter shapes are read.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ... import attention
from ...attention import Layout
from .build import ModelShapes

#: modules run on one conditioning vector per sample (timestep/pooled embeddings, AdaLN)
_COND = re.compile(r"(^|\.)(time_text_embed|adaln_single|time_embed|norm\w*|proj_out_1)(\.|$)"
                   r"|condition_embedder\.time_")
#: modules run on the text tokens
_TEXT = re.compile(r"context_embedder|caption_projection|condition_embedder\.text_embedder"
                   r"|add_[qkv]_proj|to_add_out|ff_context")
#: FLUX's single-stream blocks run on [text; image]
_JOINT = re.compile(r"^single_transformer_blocks\.")
#: keys and values of a cross-attention come from the text
_CROSS_KV = re.compile(r"\.(to_k|to_v)$")
#: modules a family's forward runs twice: diffusers' DiT embeds the timestep and class
#: again with block 0's embedder for the output modulation
_RERUN = {"dit": re.compile(r"^transformer_blocks\.0\.norm1\.emb\.")}


@dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs of one denoising step (one transformer call) at ``batch``.

    ``linear`` -- every Linear/Conv; ``attention`` -- the method's self-attention
    (``None`` when its FLOP model does not cover this layout); ``attention_dense``
    -- softmax on the same shapes; ``mixer`` -- the method's learned parts;
    ``cross_attention`` -- the stock cross-attention.
    """

    linear: float
    attention: float | None
    attention_dense: float
    mixer: float
    cross_attention: float

    @property
    def total(self) -> float | None:
        if self.attention is None:
            return None
        return self.linear + self.attention + self.mixer + self.cross_attention

    @property
    def total_dense(self) -> float:
        return self.linear + self.attention_dense + self.cross_attention

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "total_dense": self.total_dense}


def _domain(name: str, parents: dict[str, nn.Module]) -> str:
    if _COND.search(name):
        return "cond"
    if _TEXT.search(name):
        return "text"
    if _JOINT.search(name):
        return "joint"
    parent = parents.get(name.rsplit(".", 1)[0]) if "." in name else None
    if _CROSS_KV.search(name) and getattr(parent, "is_cross_attention", False):
        return "text"
    return "image"


def linear_flops(model: nn.Module, shapes: ModelShapes, batch: int = 1) -> float:
    """``2 · weight.numel() · positions`` summed over the model's Linear and Conv layers."""
    positions = {"cond": 1, "text": shapes.text_tokens, "image": shapes.image_tokens,
                 "joint": shapes.image_tokens + shapes.text_tokens}
    modules = dict(model.named_modules())
    rerun = _RERUN.get(shapes.family)
    total = 0.0
    for name, module in modules.items():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            runs = 2 if rerun is not None and rerun.search(name) else 1
            total += 2.0 * module.weight.numel() * positions[_domain(name, modules)] * runs
    return total * batch


def attention_flops(
    backend: attention.AttentionBackend, batch: int, heads: int, head_dim: int, layout: Layout,
    options: dict[str, Any],
) -> float | None:
    """The method's FLOPs of one self-attention call over ``layout`` (``None`` if the
    method does not define that layout)."""
    opts = backend.resolve(backend.attend_options(options))
    try:
        backend.check_layout(layout, opts)
    except ValueError:
        return None
    return backend.flops(batch, heads, layout.tokens, head_dim, layout=layout, **opts).actual


def step_flops(
    model: nn.Module, shapes: ModelShapes, method: str | attention.AttentionBackend = "softmax",
    options: dict[str, Any] | None = None, batch: int = 1,
) -> StepFlops:
    """Analytic FLOPs of one transformer call at ``shapes`` with ``method`` in self-attention."""
    backend = method if isinstance(method, attention.AttentionBackend) else attention.get(method)
    options = dict(options or {})
    softmax = attention.get("softmax")
    b, h, d = batch, shapes.heads, shapes.head_dim
    calls = [(shapes.layout, shapes.attention_layers)]
    if shapes.image_only_layers:
        calls.append((Layout(shapes.grid), shapes.image_only_layers))
    method_total: float | None = 0.0
    dense = mixer = 0.0
    for layout, count in calls:
        dense += count * attention_flops(softmax, b, h, d, layout, {})
        one = attention_flops(backend, b, h, d, layout, options)
        method_total = None if one is None or method_total is None else method_total + count * one
        if backend.core_class is not None:  # learned parts live in the core
            mixer += count * backend.mixer_flops(b, h, layout.tokens, d,
                                                 **backend.resolve(options, mixer=True))
    cross = (4.0 * b * shapes.cross_heads * shapes.image_tokens * shapes.text_tokens
             * shapes.cross_head_dim * shapes.cross_layers)
    return StepFlops(linear=linear_flops(model, shapes, batch), attention=method_total,
                     attention_dense=dense, mixer=mixer, cross_attention=cross)
