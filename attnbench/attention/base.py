"""The attention contract every method implements.

One method = one :class:`AttentionBackend` subclass, registered once (see
``registry.py``). The contract (DESIGN.md, "The attention interface"):

* ``attend(q, k, v, *, grid, impl="auto", **options)`` -- the stateless core,
  ``[B, H, N, d]`` in and out, ``grid = (Hgrid, Wgrid)`` the row-major layout of
  the image tokens. The pure-PyTorch ``reference`` runs anywhere in any dtype
  (float64 included); fast paths (:class:`FastPath`) are picked by capability
  and every one of them is tested against that reference.
* ``mixer(dim, num_heads, **options)`` -- the ``nn.Module`` that replaces a DiT
  block's attention (:class:`AttentionMixer`).
* ``flops(...)`` / ``memory(...)`` -- analytic models, actual and dense-equivalent.
* ``available(device, dtype, shape)`` -- ``None`` or the reason it cannot run.

FLOP convention, everywhere in attnbench: 2 FLOPs per multiply-add of the
matrix contractions (the convention of FlashAttention's benchmarks and of
``torch.utils.flop_counter``); element-wise work (softmax, feature maps,
divisions) is not counted. Backward is not modelled here.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layout import Layout

Grid = tuple[int, int]


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One tunable of a method: name, default, type and a validity check.

    ``check`` returns ``None`` for a valid value or a sentence saying what is
    wrong with it; ``choices`` restricts string options.
    """

    name: str
    default: Any
    help: str
    type: type = float
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    #: a parameter of the mixer (e.g. LiT's conv kernel), not of ``attend``
    mixer_only: bool = False

    def coerce(self, value: Any) -> Any:
        """Convert ``value`` (possibly a CLI string) to the option's type."""
        if value is None:
            return None
        if self.type is bool and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(f"option {self.name!r} takes true/false, got {value!r}")
        if self.type in (int, float) and isinstance(value, bool):
            raise ValueError(f"option {self.name!r} takes a number, got {value!r}")
        if self.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"option {self.name!r} takes an integer, got {value!r}")
        try:
            return self.type(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"option {self.name!r} takes a {self.type.__name__}, got {value!r}"
            ) from None

    def validate(self, value: Any) -> Any:
        value = self.coerce(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(
                f"option {self.name!r} must be one of {list(self.choices)}, got {value!r}"
            )
        if self.check is not None and value is not None:
            reason = self.check(value)
            if reason:
                raise ValueError(f"option {self.name!r}={value!r}: {reason}")
        return value


def positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def unit_fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must lie in (0, 1] (a fraction, e.g. 0.05 for 5%)"


def closest(name: str, candidates: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` or the list of valid names, for error messages."""
    matches = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    if matches:
        return "; did you mean " + " or ".join(repr(m) for m in matches) + "?"
    return f"; valid: {', '.join(candidates) or '(none)'}"


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs of one ``attend`` call (2 FLOPs per multiply-add).

    ``actual`` is what the method computes; ``dense`` is softmax attention on the
    same shapes (``4·B·H·N²·d``), the number sparse/linear methods are often,
    misleadingly, reported with. ``overhead`` is the part of ``actual`` spent
    outside the attention proper (e.g. SLA's block scoring).
    """

    actual: float
    dense: float
    overhead: float = 0.0

    @property
    def ratio(self) -> float:
        return self.actual / self.dense if self.dense else float("nan")


@dataclass(frozen=True)
class Memory:
    """Bytes of one ``attend`` call: inputs/outputs plus the largest workspace.

    ``io`` = q, k, v and the output; ``workspace`` = what the chosen algorithm
    keeps alive beside them (an N×N score matrix for materialising softmax, a
    d×d state for linear attention, ...). ``dense`` is the workspace-free
    (flash-style) softmax on the same shapes, for ratios.
    """

    io: float
    workspace: float
    dense: float

    @property
    def actual(self) -> float:
        return self.io + self.workspace


def dense_flops(batch: int, heads: int, tokens: int, head_dim: int) -> float:
    """``4·B·H·N²·d``: QKᵀ and PV of exact softmax attention."""
    return 4.0 * batch * heads * tokens * tokens * head_dim


# --------------------------------------------------------------------------- fast paths


@dataclass(frozen=True)
class FastPath:
    """An implementation of a method's ``attend`` other than its reference.

    ``fn(q, k, v, grid=grid, **options)`` must match the reference to the
    precision of its dtype; ``available(device, dtype, shape)`` returns ``None``
    or the reason it cannot run there (not installed, no CPU kernel, ...).
    ``differentiable`` says whether autograd can run through it (a bool, or a
    function of the device: FlexAttention has no CPU backward, for instance).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    available: Callable[[torch.device, torch.dtype, tuple[int, ...] | None], str | None]
    differentiable: bool | Callable[[torch.device], bool] = True
    #: False for compiled paths that ``FlopCounterMode`` (a dispatch mode) cannot trace:
    #: counting them would fail and leave dynamo refusing the function afterwards
    flop_countable: bool = True
    doc: str = ""

    def supports_grad(self, device: torch.device) -> bool:
        """Whether autograd runs through this path on ``device``."""
        d = self.differentiable
        return d(device) if callable(d) else d


# --------------------------------------------------------------------------- checks


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``ValueError`` unless q, k, v are ``[B, H, N, d]`` and agree."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}"
            )
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q, k, v disagree on batch/heads: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head_dim mismatch: q has {q.shape[-1]}, k has {k.shape[-1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k has {k.shape[2]} tokens but v has {v.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def check_grid(grid: Any, tokens: int, *, extra: int = 0) -> Grid:
    """Validate ``grid`` against the token count (``extra`` non-grid tokens first)."""
    if grid is None:
        raise ValueError(
            "grid=(Hgrid, Wgrid) is required: the row-major layout of the image tokens"
        )
    try:
        hg, wg = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (Hgrid, Wgrid), got {grid!r}") from None
    if hg <= 0 or wg <= 0:
        raise ValueError(f"grid sides must be positive, got {grid!r}")
    if hg * wg + extra != tokens:
        more = f" + {extra} global tokens" if extra else ""
        raise ValueError(
            f"grid {hg}x{wg}{more} = {hg * wg + extra} tokens, but the input has {tokens}"
        )
    return hg, wg


def square_grid(tokens: int) -> Grid:
    """The grid of a square image of ``tokens`` tokens (for shape-only callers)."""
    side = round(tokens**0.5)
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens is not a square grid: pass grid=(Hgrid, Wgrid)")
    return side, side


# --------------------------------------------------------------------------- backend


class AttentionBackend:
    """Base class of every attention method (see the module docstring).

    Subclasses set ``name``, ``summary``, ``paper``, ``options``, implement
    ``reference`` and ``flop_model`` (and ``workspace_model``, ``mixer_flops``,
    ``overhead_steps`` where they have them), list their ``fast_paths`` and give
    ``mixer_class``. Everything else -- option resolution and validation,
    dispatch, availability, the public ``flops``/``memory`` -- lives here once.
    """

    name: str = ""
    summary: str = ""
    paper: str = ""
    options: tuple[Option, ...] = ()
    #: the mixer ``nn.Module`` class; ``mixer()`` instantiates it.
    mixer_class: type[AttentionMixer] | None = None
    #: the method's conversion recipe: does a converted student inherit the softmax
    #: q/k/v/out projections (CLEAR, SLA: yes) or re-initialise them (LiT's rule)?
    inherits_projections: bool = True

    # ----- options ------------------------------------------------------------------
    def resolve(
        self, options: dict[str, Any] | None = None, *, mixer: bool = False
    ) -> dict[str, Any]:
        """Merge ``options`` with the defaults; unknown or invalid ones raise ValueError.

        ``mixer=False`` resolves the options of ``attend`` (mixer-only options
        are refused); ``mixer=True`` those of ``mixer`` (all of them).
        """
        given = dict(options or {})
        known = {o.name: o for o in self.options if mixer or not o.mixer_only}
        unknown = [k for k in given if k not in known]
        if unknown:
            key = unknown[0]
            if any(o.name == key for o in self.options):
                raise ValueError(
                    f"{self.name}: option {key!r} belongs to the mixer (the nn.Module), "
                    "not to attend(); pass it to backend.mixer(...)"
                )
            raise ValueError(f"{self.name}: unknown option {key!r}" + closest(key, list(known)))
        resolved = {name: o.default for name, o in known.items()}
        for key, value in given.items():
            resolved[key] = known[key].validate(value)
        self.check_options(resolved)
        return resolved

    def attend_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The part of a mixer's ``options`` that ``attend`` takes (drops mixer-only ones)."""
        mixer_only = {o.name for o in self.options if o.mixer_only}
        return {k: v for k, v in options.items() if k not in mixer_only}

    def check_options(self, options: dict[str, Any]) -> None:
        """Cross-option checks; raise ValueError. Single options check themselves."""

    def grid_extra_tokens(self, options: dict[str, Any]) -> int:
        """How many tokens before the grid are not image tokens (0 for most methods)."""
        return 0

    # ----- the computation ----------------------------------------------------------
    fast_paths: tuple[FastPath, ...] = ()

    def reference(self, q, k, v, *, grid: Grid, **options) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def paths(self) -> list[str]:
        """The implementations ``attend(impl=...)`` accepts, reference first.

        Kernel-only methods (flash, xformers) keep a ``reference`` as the oracle
        of their tests but never run it in place of the kernel they stand for.
        """
        fast = [p.name for p in self.fast_paths]
        return fast if self.kernel_only() else ["reference", *fast]

    def path_reasons(
        self, device: torch.device | str, dtype: torch.dtype, shape: tuple[int, ...] | None = None
    ) -> dict[str, str | None]:
        """``{path: None or why not}`` for every implementation of this method."""
        device = torch.device(device)
        reasons: dict[str, str | None] = {} if self.kernel_only() else {"reference": None}
        for p in self.fast_paths:
            try:
                reasons[p.name] = p.available(device, dtype, shape)
            except Exception as err:  # an availability probe must never crash a sweep
                reasons[p.name] = f"availability check failed: {err}"
        return reasons

    def select(
        self,
        device: torch.device | str,
        dtype: torch.dtype,
        shape: tuple[int, ...] | None = None,
        *,
        impl: str = "auto",
        needs_grad: bool = False,
    ) -> str:
        """The implementation ``attend`` will run: ``impl`` or the first available fast path."""
        device = torch.device(device)
        reasons = self.path_reasons(device, dtype, shape)
        if impl != "auto":
            if impl not in reasons:
                raise ValueError(
                    f"{self.name}: unknown implementation {impl!r}" + closest(impl, list(reasons))
                )
            if reasons[impl]:
                raise ValueError(f"{self.name}[{impl}] cannot run here: {reasons[impl]}")
            return impl
        for p in self.fast_paths:
            if reasons[p.name] is None and (not needs_grad or p.supports_grad(device)):
                return p.name
        if self.kernel_only():
            reason = self.available(device, dtype, shape)
            raise ValueError(f"{self.name} cannot run here: {reason}")
        return "reference"

    def overhead_steps(
        self, q, k, v, *, grid: Grid, impl: str, **options: Any
    ) -> dict[str, Callable[[], Any]]:
        """Work an ``attend`` call does besides the attention proper, as callables.

        Benchmarks time them apart from the kernel (NATTEN's profiler does the
        same): building CLEAR's block mask, SLA's block map, re-ordering
        tokens. Each callable must do the work from scratch (no cache hit).
        ``{}`` for methods with no such step.
        """
        return {}

    def flop_countable(self, impl: str) -> bool:
        """Whether ``FlopCounterMode`` can count the implementation ``impl``."""
        return all(p.flop_countable for p in self.fast_paths if p.name == impl)

    def kernel_only(self) -> bool:
        """True for methods that only exist as a fast path (flash, xformers)."""
        return False

    def prepare(
        self, q, k, v, *, grid: Grid, impl: str, options: dict[str, Any]
    ) -> tuple[str, Grid, dict[str, Any]]:
        """Checks shared by every entry point: ``(implementation, grid, resolved options)``."""
        check_qkv(q, k, v)
        opts = self.resolve(options)
        grid = check_grid(grid, k.shape[2], extra=self.grid_extra_tokens(opts))
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        chosen = self.select(q.device, q.dtype, tuple(q.shape), impl=impl, needs_grad=needs_grad)
        return chosen, grid, opts

    #: True for methods that ignore the token geometry (softmax) and so accept any
    #: :class:`Layout` (text tokens, video grids); they receive ``layout=`` for those and
    #: ``grid=`` for plain image grids
    any_layout: bool = False

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        grid: Grid | None = None,
        layout: Layout | None = None,
        impl: str = "auto",
        **options: Any,
    ) -> torch.Tensor:
        """Attention of ``q`` over ``k, v``: ``[B, H, N, d]`` in and out.

        ``grid=(H, W)`` is the plain image case of ``layout=Layout(...)`` (see
        ``layout.py``: video grids and text tokens). ``impl="auto"`` takes the
        first fast path that can run on these inputs (and supports autograd when
        they require grad), else the reference; ``impl="reference"`` or a fast
        path's name forces one.
        """
        layout = Layout.coerce(layout, grid)
        if self.any_layout and not layout.is_plain:
            check_qkv(q, k, v)
            layout.check(k.shape[2])
            opts = self.resolve(options)
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            chosen = self.select(q.device, q.dtype, tuple(q.shape), impl=impl,
                                 needs_grad=needs_grad)
            geometry = {"layout": layout}
        else:
            if not layout.is_plain:
                raise ValueError(
                    f"{self.name} takes a plain image grid here; layout {layout.describe()} "
                    "(text tokens or a video grid) is not supported by this method"
                )
            chosen, grid, opts = self.prepare(q, k, v, grid=layout.grid, impl=impl,
                                              options=options)
            geometry = {"grid": grid}
        if chosen == "reference":
            return self.reference(q, k, v, **geometry, **opts)
        path = next(p for p in self.fast_paths if p.name == chosen)
        return path.fn(q, k, v, **geometry, **opts)

    def available(
        self,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        shape: tuple[int, ...] | None = None,
    ) -> str | None:
        """``None`` when ``attend`` can run here, else the reason.

        Methods with a reference are always available; methods that are only a
        kernel (flash, xformers) override ``kernel_only``.
        """
        if not self.kernel_only():
            return None
        fast = self.path_reasons(device, dtype, shape)
        if any(r is None for r in fast.values()):
            return None
        if len(set(fast.values())) == 1:  # one reason for every path: say it once
            return next(iter(fast.values()))
        return "; ".join(f"{name}: {r}" for name, r in fast.items())

    # ----- the module ---------------------------------------------------------------
    def mixer(self, dim: int, num_heads: int, **options: Any) -> AttentionMixer:
        """The ``nn.Module`` replacing a DiT block's attention (``x [B,N,C] → [B,N,C]``)."""
        if self.mixer_class is None:  # pragma: no cover - every built-in method has one
            raise ValueError(f"{self.name} has no mixer")
        qkv_bias = options.pop("qkv_bias", True)
        impl = options.pop("impl", "auto")
        opts = self.resolve(options, mixer=True)
        return self.mixer_class(self, dim, num_heads, qkv_bias=qkv_bias, impl=impl, **opts)

    #: the ``nn.Module`` class of the method on already-projected heads (``core()``)
    core_class: type[AttentionCore] | None = None

    def core(self, num_heads: int, head_dim: int, **options: Any) -> AttentionCore:
        """The method on projected heads, learned parts included: ``q, k, v [B,H,N,d] → [B,H,N,d]``.

        What a model that owns its projections (a diffusers transformer's
        ``to_q``/``to_k``/``to_v``/``to_out``) plugs in: everything of the method
        except the projections. ``impl`` forces a path as in ``attend``.
        """
        impl = options.pop("impl", "auto")
        opts = self.resolve(options, mixer=True)
        cls = self.core_class or AttentionCore
        return cls(self, num_heads, head_dim, impl=impl, **opts)

    # ----- cost models --------------------------------------------------------------
    def _cost_args(self, tokens: int, grid: Grid | None, options: dict[str, Any]):
        opts = self.resolve(options)
        extra = self.grid_extra_tokens(opts)
        grid = square_grid(tokens - extra) if grid is None else grid
        return check_grid(grid, tokens, extra=extra), opts

    def flops(
        self,
        batch: int,
        heads: int,
        tokens: int,
        head_dim: int,
        grid: Grid | None = None,
        **options: Any,
    ) -> Flops:
        """Analytic forward FLOPs of ``attend`` on these shapes (module docstring)."""
        grid, opts = self._cost_args(tokens, grid, options)
        return self.flop_model(batch, heads, tokens, head_dim, grid, **opts)

    def memory(
        self,
        batch: int,
        heads: int,
        tokens: int,
        head_dim: int,
        grid: Grid | None = None,
        *,
        element_size: int = 2,
        impl: str = "fast",
        **options: Any,
    ) -> Memory:
        """Analytic bytes of one forward call of ``impl``: a path's name, ``"reference"``,
        or ``"fast"`` (the first fast path: what runs where every kernel is available)."""
        if impl == "fast":
            impl = self.fast_paths[0].name if self.fast_paths else "reference"
        elif impl not in ("reference", *self.paths()):
            raise ValueError(f"{self.name}: unknown implementation {impl!r}; valid: fast, "
                             f"{', '.join(dict.fromkeys(['reference', *self.paths()]))}")
        grid, opts = self._cost_args(tokens, grid, options)
        io = 4.0 * batch * heads * tokens * head_dim * element_size
        workspace = self.workspace_model(
            batch, heads, tokens, head_dim, grid, element_size=element_size, impl=impl, **opts
        )
        return Memory(io=io, workspace=float(workspace), dense=io)

    def mixer_flops(
        self, batch: int, heads: int, tokens: int, head_dim: int, **options: Any
    ) -> float:
        """FLOPs of the mixer's own learned parts, beyond ``attend`` and the projections.

        LiT's depth-wise conv, SLA's ``proj_l``: part of a block's cost, not of
        the attention kernel's. ``options`` are the mixer's (mixer-only ones included).
        """
        return 0.0

    def flop_model(self, batch, heads, tokens, head_dim, grid: Grid, **options) -> Flops:
        raise NotImplementedError  # pragma: no cover - every method defines it

    def workspace_model(
        self, batch, heads, tokens, head_dim, grid: Grid, *, element_size: int, impl: str, **opts
    ) -> float:
        """Bytes kept alive beside q, k, v and the output (0 for flash-style kernels)."""
        return 0.0

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for ``attnbench list``."""
        return {
            "name": self.name,
            "summary": self.summary,
            "paper": self.paper,
            "options": [
                {
                    "name": o.name,
                    "default": o.default,
                    "type": o.type.__name__,
                    "choices": list(o.choices) if o.choices else None,
                    "mixer_only": o.mixer_only,
                    "help": o.help,
                }
                for o in self.options
            ],
            "implementations": self.paths(),
        }

    def __repr__(self) -> str:
        return f"<attention backend {self.name!r}>"


# --------------------------------------------------------------------------- mixer


class AttentionCore(nn.Module):
    """A method on projected heads: ``q, k, v [B, H, N, d] → [B, H, N, d]`` over a layout.

    Holds the method's learned parts (none for the plain methods) so that they
    are parameters of whatever model it is plugged into and train with it.
    Subclasses add their parts, override ``forward`` and declare them in
    ``new_parameters()`` (all of a core's parameters are new: a softmax
    checkpoint has none of them).
    """

    def __init__(
        self, backend: AttentionBackend, num_heads: int, head_dim: int, *,
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
    """A DiT block's attention: ``x [B, N, C] → [B, N, C]`` over a token grid.

    Owns ``qkv`` (Linear C→3C) and ``proj`` (Linear C→C) under the names of
    timm's ``Attention`` that DiT uses, so ``blocks.{i}.attn.qkv.*`` and
    ``blocks.{i}.attn.proj.*`` of a softmax checkpoint map onto every method.
    Subclasses add the method's learned parts and declare them in
    ``new_parameters()`` (parameters a softmax checkpoint has no value for).
    """

    #: parameter-name prefixes that have a softmax counterpart of identical meaning
    #: and shape (the projections); everything else a mixer owns is new.
    inheritable_prefixes: tuple[str, ...] = ("qkv.", "proj.")

    def __init__(
        self,
        backend: AttentionBackend,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        impl: str = "auto",
        **options: Any,
    ) -> None:
        super().__init__()
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
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, N, C]`` → q, k, v each ``[B, H, N, d]`` (timm's layout of qkv)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def core(self, q, k, v, grid: Grid) -> torch.Tensor:
        """The method on one layer's heads; subclasses add their learned parts here."""
        return self.backend.attend(q, k, v, grid=grid, impl=self.impl, **self.attend_options)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [B, N, {self.dim}], got {tuple(x.shape)}")
        q, k, v = self.split_heads(x)
        out = self.core(q, k, v, tuple(grid))
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dim))

    def reset_new_parameters(self) -> None:
        """Initialise the method's new parameters as its paper prescribes.

        Called by the mixer's constructor and again by models after their own
        weight init (DiT's Xavier init of every Linear would otherwise overwrite,
        e.g., SLA's zero-initialised projection). The projections are not touched.
        """

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
