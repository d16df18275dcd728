"""Grid-aware attention processors: any registered method inside a diffusers transformer.

Each processor reproduces one stock diffusers 0.42 processor step for step --
the same projections, QK norms, concatenation order and RoPE -- and hands the
heads ``[B, H, N, d]`` to an :class:`~attnbench.attention.AttentionCore` with
the :class:`~attnbench.attention.Layout` of the tokens (from the model's
:class:`~.geometry.Geometry`) where the stock processor calls SDPA. With the
``softmax`` core every model gives its stock output (tests/integrations).

The processors are ``nn.Module``s holding their core, so a method's learned
parts are in the transformer's ``state_dict`` (``...attn.processor.core.*``)
and train with it. What a stock processor can do and these do not -- attention
masks, IP-Adapter, context parallelism -- raises ``ValueError`` rather than
computing something else.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ...attention import AttentionCore, Layout
from .compat import import_diffusers
from .geometry import Geometry

import_diffusers()
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402


class AttnbenchProcessor(nn.Module):
    """Base of the processors: the core, the geometry and the shared checks.

    diffusers passes keyword arguments to a processor only if its ``__call__``
    names them; an ``nn.Module``'s ``__call__`` names none, so every subclass's
    ``__call__`` carries the signature of its ``forward`` (and still runs
    through ``nn.Module.__call__``, hooks included).
    """

    #: the stock diffusers processor class this one reproduces
    stock: str = ""

    def __init__(self, core: AttentionCore, geometry: Geometry, where: str = "") -> None:
        super().__init__()
        self.core = core
        self.geometry = geometry
        self.where = where

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)

        @functools.wraps(cls.forward)
        def __call__(self, *args, **kw):
            return nn.Module.__call__(self, *args, **kw)

        cls.__call__ = __call__

    def refuse(self, attention_mask=None, **unsupported) -> None:
        """``ValueError`` for inputs these processors do not handle (never ignored silently)."""
        if attention_mask is not None:
            raise ValueError(f"{self.where or type(self).__name__}: attention masks are not "
                             f"handled by attnbench's {self.core.backend.name} processor")
        for name, value in unsupported.items():
            if value is not None:
                raise ValueError(f"{self.where or type(self).__name__}: {name} (IP-Adapter) is "
                                 "not handled by attnbench's processors")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               layout: Layout) -> torch.Tensor:
        """The core on ``[B, N, H, d]`` heads (diffusers' order) → ``[B, N, H·d]``."""
        try:
            layout.check(q.shape[1])
        except ValueError as err:
            raise ValueError(f"{self.where}: {err}") from None
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout=layout)
        return out.transpose(1, 2).flatten(2, 3).to(q.dtype)

    def extra_repr(self) -> str:
        return f"replaces {self.stock}"


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))


def _project(attn, hidden_states: torch.Tensor):
    """q, k, v ``[B, N, H, d]`` of a stock ``Attention``: its projections and QK norms."""
    d = attn.inner_dim // attn.heads
    q, k, v = (_heads(p(hidden_states), d) for p in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


class FluxProcessor(AttnbenchProcessor):
    """``FluxAttnProcessor``: double-stream ([text; image] joined here) and single-stream
    blocks ([text; image] joined by the block), RMS QK norms, RoPE on the joint sequence.
    Text length and grid come from ``txt_ids`` / ``img_ids`` (the geometry)."""

    stock = "FluxAttnProcessor"

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                image_rotary_emb=None, ip_hidden_states=None, ip_adapter_masks=None):
        self.refuse(attention_mask, ip_hidden_states=ip_hidden_states,
                    ip_adapter_masks=ip_adapter_masks)
        d = attn.head_dim
        q = attn.norm_q(_heads(attn.to_q(hidden_states), d))
        k = attn.norm_k(_heads(attn.to_k(hidden_states), d))
        v = _heads(attn.to_v(hidden_states), d)
        text = self.geometry.text
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            if encoder_hidden_states.shape[1] != text:
                raise ValueError(f"{self.where}: {encoder_hidden_states.shape[1]} text tokens "
                                 f"but txt_ids has {text}")
            eq = attn.norm_added_q(_heads(attn.add_q_proj(encoder_hidden_states), d))
            ek = attn.norm_added_k(_heads(attn.add_k_proj(encoder_hidden_states), d))
            ev = _heads(attn.add_v_proj(encoder_hidden_states), d)
            q, k, v = (torch.cat(pair, dim=1) for pair in ((eq, q), (ek, k), (ev, v)))
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.attend(q, k, v, self.geometry.layout(text=text, text_first=True))
        if encoder_hidden_states is None:
            return out
        context, image = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(context.contiguous())


class JointProcessor(AttnbenchProcessor):
    """``JointAttnProcessor2_0`` (SD3): [image; text] -- image first -- in the joint blocks;
    image tokens alone in SD3.5's dual-attention ``attn2`` (``encoder_hidden_states=None``)."""

    stock = "JointAttnProcessor2_0"

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        self.refuse(attention_mask)
        q, k, v = _project(attn, hidden_states)
        text = 0
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            eq, ek, ev = (_heads(p(encoder_hidden_states), attn.inner_dim // attn.heads)
                          for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            q, k, v = (torch.cat(pair, dim=1) for pair in ((q, eq), (k, ek), (v, ev)))
        geometry = self.geometry
        layout = geometry.layout(text=text, text_first=False) if text else geometry.layout()
        out = self.attend(q, k, v, layout)
        image = out[:, : hidden_states.shape[1]]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        context = out[:, hidden_states.shape[1]:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return image, context


class SelfProcessor(AttnbenchProcessor):
    """``AttnProcessor2_0`` on a self-attention module (PixArt's and DiT's ``attn1``):
    image tokens only, optional per-head QK norms."""

    stock = "AttnProcessor2_0"

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                temb=None):
        self.refuse(attention_mask)
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            raise ValueError(f"{self.where}: attnbench's processor takes self-attention on "
                             "[B, N, C] tokens only")
        q, k, v = _project(attn, hidden_states)
        out = attn.to_out[1](attn.to_out[0](self.attend(q, k, v, self.geometry.layout())))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class SanaProcessor(AttnbenchProcessor):
    """``SanaLinearAttnProcessor2_0``'s projections (QK norms on the flat projections, before
    the head split) with the method in place of SANA's ReLU linear attention; the output is
    clipped to the float16 range in float16, as SANA does."""

    stock = "SanaLinearAttnProcessor2_0"

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        self.refuse(attention_mask)
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.where}: attnbench's processor takes self-attention only")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        d = q.shape[-1] // attn.heads
        out = self.attend(_heads(q, d), _heads(k, d), _heads(v, d), self.geometry.layout())
        out = attn.to_out[1](attn.to_out[0](out))
        if hidden_states.dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


def wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on ``[B, N, H, d]``: channel pairs (2i, 2i+1) turned by the angle whose
    cosine sits at 2i of ``cos`` and sine at 2i+1 of ``sin`` (interleaved layout)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


class WanProcessor(AttnbenchProcessor):
    """``WanAttnProcessor`` on the self-attention ``attn1``: RMS QK norms across heads, 3-D
    RoPE, frame-major (F, H, W) video tokens; no text (Wan's text is in ``attn2``)."""

    stock = "WanAttnProcessor"

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                rotary_emb=None):
        self.refuse(attention_mask)
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.where}: attnbench's processor takes self-attention only")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = wan_rotary(q, *rotary_emb), wan_rotary(k, *rotary_emb)
        out = self.attend(q, k, v, self.geometry.layout())
        return attn.to_out[1](attn.to_out[0](out))
