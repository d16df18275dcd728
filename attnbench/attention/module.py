"""The ``nn.Module`` side of a method: its core on projected heads and a DiT block's mixer.

:class:`AttentionCore` is the method with its learned parts (``q, k, v → out``),
what a diffusers processor plugs in; :class:`AttentionMixer` wraps it in timm's
``qkv``/``proj`` so a softmax DiT checkpoint's projections load unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .inputs import Grid
from .layout import Layout

#: an :class:`~attnbench.attention.backend.AttentionBackend` (which imports this module,
#: so the modules name it only in words: imports flow backend → module)
Backend = Any


class AttentionCore(nn.Module):
    """A method on projected heads: ``q, k, v [B, H, N, d] → [B, H, N, d]`` over a layout.

    Holds the method's learned parts (none for the plain methods) so that they
    are parameters of whatever model it is plugged into -- a DiT block's mixer
    or a diffusers attention processor -- and train with it. Subclasses add
    their parts, override ``forward`` and ``reset_new_parameters``. Every
    parameter of a core is new: a softmax checkpoint has none of them.
    """

    def __init__(
        self, backend: Backend, num_heads: int, head_dim: int, *,
        impl: str = "auto", **options: Any,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.impl = impl
        self.options = dict(options)
        self.attend_options = backend.attend_options(options)

    def forward(self, q, k, v, *, layout: Layout | None = None, grid: Grid | None = None):
        return self.backend.attend(q, k, v, layout=layout, grid=grid, impl=self.impl,
                                   **self.attend_options)

    def reset_new_parameters(self) -> None:
        """Initialise the method's learned parts as its paper prescribes."""

    def new_parameters(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.backend.name}, heads={self.num_heads}, head_dim={self.head_dim}" + (
            f", {opts}" if opts else ""
        )


class AttentionMixer(nn.Module):
    """A DiT block's attention: ``x [B, N, C] → [B, N, C]`` = ``proj(core(qkv(x)))``.

    Owns ``qkv`` (Linear C→3C) and ``proj`` (Linear C→C) under the names of
    timm's ``Attention`` that DiT uses, so ``blocks.{i}.attn.qkv.*`` and
    ``blocks.{i}.attn.proj.*`` of a softmax checkpoint map onto every method;
    the method itself, learned parts included, is ``core`` (the backend's
    :class:`AttentionCore`): ``blocks.{i}.attn.core.*`` are the parameters a
    softmax checkpoint has no value for. The core's output, before ``proj``, is
    what a forward hook on ``core`` sees (CLEAR's attention distillation term).
    """

    #: parameter-name prefixes that have a softmax counterpart of identical meaning
    #: and shape (the projections); everything else a mixer owns is new.
    inheritable_prefixes: tuple[str, ...] = ("qkv.", "proj.")

    def __init__(
        self,
        backend: Backend,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        impl: str = "auto",
        **options: Any,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim {dim!r}: the model width must be an integer > 0")
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(
                f"dim {dim} is not divisible by num_heads {num_heads}: head_dim must be an integer"
            )
        self.backend = backend
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.impl = impl
        #: every option of the mixer; ``attend_options`` is what ``attend`` takes
        self.options = dict(options)
        self.attend_options = backend.attend_options(options)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.core = backend.core(num_heads, self.head_dim, impl=impl, **options)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, N, C]`` → q, k, v each ``[B, H, N, d]`` (timm's layout of qkv)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, grid: Grid | Layout) -> torch.Tensor:
        """``grid``: the image grid ``(H, W)``, or a :class:`Layout` (text tokens, video)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [B, N, {self.dim}], got {tuple(x.shape)}")
        q, k, v = self.split_heads(x)
        out = self.core(q, k, v, grid=grid if isinstance(grid, Layout) else tuple(grid))
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dim))

    def reset_new_parameters(self) -> None:
        """Initialise the method's new parameters (the core's) as its paper prescribes.

        Called by the constructor (through the core's) and again by models after
        their own weight init (DiT's Xavier init of every Linear would otherwise
        overwrite, e.g., SLA's zero-initialised projection). The projections are
        not touched.
        """
        self.core.reset_new_parameters()

    def new_parameters(self) -> list[str]:
        """Names of parameters a softmax checkpoint cannot provide (init by the method)."""
        return [
            name
            for name, _ in self.named_parameters()
            if not name.startswith(self.inheritable_prefixes)
        ]

    def inheritable_parameters(self) -> list[str]:
        """Names of parameters with a softmax counterpart (the q/k/v/out projections)."""
        new = set(self.new_parameters())
        return [name for name, _ in self.named_parameters() if name not in new]

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.backend.name}, dim={self.dim}, heads={self.num_heads}" + (
            f", {opts}" if opts else ""
        )
