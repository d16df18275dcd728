"""The attention contract every method implements: :class:`AttentionBackend`.

One method = one :class:`AttentionBackend` subclass, registered once (see
``registry.py``). What a method defines is listed first in the class's docstring
(its data, then every hook it may override, with the defaults below in one
section); everything else -- option resolution, geometry, path selection,
dispatch, the modules, the cost models (``costs.py``) and the labels
(``labels.py``) -- is shared and lives here once. The public calls:

* ``attend(q, k, v, *, layout, impl="auto", **options)`` -- the stateless core,
  ``[B, H, N, d]`` in and out; the :class:`~attnbench.attention.layout.Layout` says
  where the tokens sit (an image or video grid, text tokens before or after it),
  ``grid=(Hgrid, Wgrid)`` is the plain image case. Text after the grid is moved
  to the front and back in one place (:meth:`AttentionBackend.dispatch`), so methods
  define "text prefix + grid" only; which kinds of layout a method defines is
  data (``layout_kinds``), and so is which ones a fast path computes
  (``layouts``). The pure-PyTorch ``reference`` runs anywhere in any dtype
  (float64 included); fast paths (:class:`~attnbench.attention.paths.FastPath`)
  are picked by capability and every one of them is tested against that reference.
* ``mixer(dim, num_heads, **options)`` / ``core(num_heads, head_dim, **options)`` --
  the ``nn.Module`` that replaces a DiT block's attention, and the method on
  projected heads with its learned parts (``module.py``).
* ``flops(...)`` / ``memory(...)`` -- analytic models, actual and dense-equivalent
  (the FLOP convention: ``costs.py``).
* ``available(device, dtype, shape)`` -- ``None`` or the reason it cannot run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from ..common.names import closest
from .costs import CostModels, Flops
from .inputs import (
    ExactRows,
    ExtraInput,
    Grid,
    check_extra,
    check_qkv,
    split_extra,
    square_grid,
)
from .labels import Labels
from .layout import Layout
from .module import AttentionCore, AttentionMixer
from .options import Option, resolve_options
from .paths import FastPath, Selection, as_device, first_runnable, unavailable
from .recipes import ConversionRecipe, DistillRecipe


class AttentionBackend(CostModels, Labels):
    """Base class of every attention method.

    **What a method defines** -- data, read by the registry, the CLI, conversion,
    distillation and the reports:

    * ``name``, ``summary``, ``paper``; ``options`` (:class:`Option`, each with its
      default's source) and ``retired_options``; ``notes`` (where it differs from its
      official code);
    * ``layout_kinds`` -- the layout kinds it defines (default: plain image grids);
    * ``fast_paths`` -- its :class:`FastPath` s in the order ``impl="auto"`` tries
      them, each with its capabilities and memory model;
    * ``core_class`` -- the :class:`AttentionCore` subclass holding its learned parts,
      and ``extra_inputs`` -- the tensors (:class:`ExtraInput`) it hands to ``attend``;
    * ``conversion_recipe``, ``distill_recipe``, ``distill_alternatives``;
    * ``sparse_pairs`` -- True when its exact pairs are a strict subset of all pairs.

    **Hooks a method may override** (their defaults: the section of that name below):

    * ``reference`` and ``flop_model`` -- required: the definition in pure PyTorch
      (any dtype, float64 included) and its forward FLOPs;
    * ``reference_workspace``, ``workspace_model`` -- bytes beside q, k, v and the output;
    * ``mixer_flops`` -- FLOPs of the core's learned parts;
    * ``overhead_steps`` -- work besides the attention proper, timed apart;
    * ``density_model``, ``exact_rows_model``, ``rounded_options``, ``rounding_checks``
      -- its honest labels;
    * ``check_layout`` -- refuses, before any work, a layout it does not define;
    * ``kernel_only`` -- True for a method that exists only as a kernel (flash);
    * ``mixer`` -- to refuse options a DiT mixer cannot take (CLEAR's ``ntk_factor``).

    Everything else -- option resolution and validation, dispatch, availability, the
    public ``flops``/``memory``/``density`` -- is shared: not overridden.
    """

    # ----- what a method defines ------------------------------------------------------
    name: str = ""
    summary: str = ""
    paper: str = ""
    options: tuple[Option, ...] = ()
    #: options the method no longer takes, each with what replaced it: passing one is a
    #: ValueError that says so (CLEAR's ``global_tokens``, now the layout's text count)
    retired_options: Mapping[str, str] = MappingProxyType({})
    #: the layout kinds (:data:`attnbench.attention.layout.KINDS`) the method defines;
    #: the default, plain image grids, suits a method that reads ``grid=(H, W)`` only
    layout_kinds: tuple[str, ...] = ("image",)
    fast_paths: tuple[FastPath, ...] = ()
    #: the ``nn.Module`` class of the method on already-projected heads (``core()``):
    #: where the method's learned parts live
    core_class: type[AttentionCore] | None = None
    #: tensors ``attend`` and every path take beside q, k, v (the learned parts the core
    #: passes, e.g. CLEAR's ``pool_weight``): see :class:`ExtraInput`
    extra_inputs: tuple[ExtraInput, ...] = ()
    #: how a softmax DiT becomes a student of this method (``models/convert.py`` reads it)
    conversion_recipe: ConversionRecipe | None = None
    #: how such a student is distilled (``distill/recipes.py`` reads it)
    distill_recipe: DistillRecipe | None = None
    #: other distillation recipes of the method, selectable by name (e.g. a variant of
    #: the official one kept for comparison)
    distill_alternatives: tuple[DistillRecipe, ...] = ()
    #: where the method differs from its official code or paper, and what it is checked
    #: against: one sentence each, with its source (``attnbench list`` prints them)
    notes: tuple[str, ...] = ()
    #: True for methods whose exact pairs are a strict subset of all pairs in general
    #: (CLEAR's window, SLA's blocks): ``exact_pairs`` asks ``exact_rows_model`` then
    sparse_pairs: bool = False

    # ----- hooks a method may override -----------------------------------------------
    def reference(self, q, k, v, *, grid: Grid, **options) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def flop_model(self, batch, heads, tokens, head_dim, layout: Layout, **options) -> Flops:
        raise NotImplementedError  # pragma: no cover - every method defines it

    def workspace_model(
        self, batch, heads, tokens, head_dim, layout: Layout, *, element_size: int, impl: str,
        **opts
    ) -> float:
        """Bytes kept alive beside q, k, v and the output by ``impl``: the reference's
        model (``reference_workspace``) or the one the fast path carries (both called with
        the text-first layout in the grid's place)."""
        if impl == "reference":
            return self.reference_workspace(batch, heads, tokens, head_dim, layout,
                                            element_size=element_size, **opts)
        return self.fast_path(impl).workspace_bytes(batch, heads, tokens, head_dim, layout,
                                                    element_size=element_size, **opts)

    def reference_workspace(
        self, batch, heads, tokens, head_dim, layout: Layout, *, element_size: int, **opts
    ) -> float:
        """Bytes the reference keeps alive beside q, k, v and the output."""
        return 0.0

    def mixer_flops(
        self, batch: int, heads: int, tokens: int, head_dim: int, *,
        layout: Layout | None = None, **options: Any
    ) -> float:
        """FLOPs of the core's own learned parts, beyond ``attend`` and the projections.

        LiT's depth-wise conv, SLA's ``proj_l``: part of a block's cost, not of
        the attention kernel's. ``options`` are the mixer's (mixer-only ones included);
        ``layout`` (default: every token an image token) says which tokens they act on.
        """
        return 0.0

    def density_model(self, layout: Layout, **options: Any) -> float:
        return 1.0

    def exact_rows_model(self, q, k, layout: Layout, **options: Any) -> ExactRows:
        """``exact_pairs`` on text-first ``q, k`` over the text-first ``layout``."""
        raise NotImplementedError  # pragma: no cover - methods with sparse_pairs define it

    def rounded_options(self, layout: Layout, **options: Any) -> dict[str, Any]:
        """What the method's rounding makes of ``options`` at this layout (``{}``: none)."""
        return {}

    def rounding_checks(self, layout: Layout, **options: Any) -> list[tuple[float, float, str]]:
        """``(requested, effective, sentence)`` for each option that rounds (``[]``: none)."""
        return []

    def overhead_steps(
        self, q, k, v, *, grid: Grid | None = None, layout: Layout | None = None, impl: str,
        **options: Any
    ) -> dict[str, Callable[[], Any]]:
        """Work an ``attend`` call does besides the attention proper, as callables.

        Benchmarks time them apart from the kernel (NATTEN's profiler does the
        same): building CLEAR's block mask, SLA's block map, re-ordering
        tokens. Each callable must do the work from scratch (no cache hit).
        ``{}`` for methods with no such step.
        """
        return {}

    def kernel_only(self) -> bool:
        """True for methods that only exist as a fast path (flash, xformers)."""
        return False

    def check_layout(self, layout: Layout, options: dict[str, Any]) -> None:
        """Raise ValueError, before any work, for a layout the method does not define
        (or not with these options)."""
        if layout.kind not in self.layout_kinds:
            raise ValueError(
                f"{self.name} takes {', '.join(self.layout_kinds)} layouts; layout "
                f"{layout.describe()} ({layout.kind}) is not supported by this method"
            )

    # ----- shared: options and geometry ------------------------------------------------
    @property
    def inherits_projections(self) -> bool:
        """Whether a converted student inherits the softmax q/k/v/out projections."""
        recipe = self.conversion_recipe
        return True if recipe is None else recipe.inherit_projections

    def resolve(
        self, options: dict[str, Any] | None = None, *, mixer: bool = False
    ) -> dict[str, Any]:
        """Merge ``options`` with the defaults; unknown or invalid ones raise ValueError.

        ``mixer=False`` resolves the options of ``attend`` (mixer-only options
        are refused); ``mixer=True`` those of ``mixer`` (all of them).
        """
        return resolve_options(self.name, self.options, options, mixer=mixer,
                               retired=self.retired_options)

    def attend_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The part of a mixer's ``options`` that ``attend`` takes (drops mixer-only ones)."""
        mixer_only = {o.name for o in self.options if o.mixer_only}
        return {k: v for k, v in options.items() if k not in mixer_only}

    def geometry(
        self, layout: Layout | None, grid: Any, options: dict[str, Any], tokens: int | None = None,
        *, square: bool = False,
    ) -> tuple[Layout, dict[str, Any]]:
        """The checked ``(layout, options)`` of a call or a cost model (``tokens``:
        the input's; with ``square``, a shape-only caller without a geometry gets the
        square image grid of ``tokens``)."""
        if layout is None and grid is None and square and tokens is not None:
            layout = Layout(square_grid(tokens))
        if isinstance(grid, Layout):
            layout, grid = grid, None
        layout = Layout.coerce(layout, grid)
        if tokens is not None:
            layout.check(tokens)
        self.check_layout(layout, options)
        return layout, options

    # ----- shared: choosing and running a path ----------------------------------------
    def paths(self) -> list[str]:
        """The implementations ``attend(impl=...)`` accepts, reference first.

        Kernel-only methods (flash, xformers) keep a ``reference`` as the oracle
        of their tests but never run it in place of the kernel they stand for.
        """
        fast = [p.name for p in self.fast_paths]
        return fast if self.kernel_only() else ["reference", *fast]

    def fast_path(self, name: str) -> FastPath:
        """The fast path called ``name`` (ValueError with suggestions otherwise)."""
        for p in self.fast_paths:
            if p.name == name:
                return p
        raise ValueError(f"{self.name}: unknown implementation {name!r}"
                         + closest(name, self.paths()))

    def path_reasons(
        self, device: torch.device | str, dtype: torch.dtype, shape: tuple[int, ...] | None = None,
        layout: Layout | None = None,
    ) -> dict[str, str | None]:
        """``{path: None or why not}`` for every implementation of this method."""
        device = as_device(device)
        reasons: dict[str, str | None] = {} if self.kernel_only() else {"reference": None}
        for p in self.fast_paths:
            reasons[p.name] = p.available(device, dtype, shape, layout)
        return reasons

    def selection(self, device: torch.device | str, dtype: torch.dtype,
                  shape: tuple[int, ...] | None = None, *, needs_grad: bool = False,
                  impl: str = "auto", layout: Layout | None = None) -> Selection:
        """The implementation ``attend`` runs here and why each path ahead of it did not.

        ``impl="auto"`` takes the first fast path that can run (and supports
        autograd on ``device`` when ``needs_grad``) among those auto may choose on
        ``device`` (:attr:`FastPath.auto_devices`), else the reference; a
        forced ``impl`` is checked and returned with nothing passed over. A
        kernel-only method with no runnable path raises ValueError.
        """
        device = as_device(device)
        if impl != "auto":
            if impl != "reference" or self.kernel_only():
                reasons = self.fast_path(impl).not_supported_reasons(device, dtype, shape, layout)
                if reasons:
                    raise ValueError(f"{self.name}[{impl}] cannot run here: {'; '.join(reasons)}")
            return Selection(impl)
        chosen = first_runnable(self.fast_paths, device, dtype, shape, layout, needs_grad)
        if chosen.path == "reference" and self.kernel_only():
            raise ValueError(f"{self.name} cannot run here: {self.available(device, dtype, shape)}")
        return chosen

    def select(self, device: torch.device | str, dtype: torch.dtype,
               shape: tuple[int, ...] | None = None, *, impl: str = "auto",
               needs_grad: bool = False, layout: Layout | None = None) -> str:
        """The implementation ``attend`` will run (``selection(...).path``)."""
        return self.selection(device, dtype, shape, needs_grad=needs_grad, impl=impl,
                              layout=layout).path

    def flop_countable(self, impl: str) -> bool:
        """Whether ``FlopCounterMode`` can count the implementation ``impl``."""
        return all(p.flop_countable for p in self.fast_paths if p.name == impl)

    @staticmethod
    def needs_grad(*tensors: torch.Tensor | None) -> bool:
        """Whether autograd will run back through any of ``tensors``."""
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors
        )

    def prepare(
        self, q, k, v, *, grid: Grid | None = None, impl: str, options: dict[str, Any],
        layout: Layout | None = None, extra: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[str, Layout, dict[str, Any]]:
        """Checks shared by every entry point, before any work:
        ``(implementation, layout, resolved options)``. ``extra``: the call's extra inputs,
        checked against the options and counted for autograd."""
        check_qkv(q, k, v, self.name)
        layout, opts = self.geometry(layout, grid, self.resolve(options), tokens=k.shape[2])
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"{self.name}: q has {q.shape[2]} tokens but k has {k.shape[2]}; "
                             "a layout describes one token sequence")
        extra = check_extra(self.extra_inputs, extra, opts)
        grad = self.needs_grad(q, k, v, *extra.values())
        chosen = self.select(q.device, q.dtype, tuple(q.shape), impl=impl, needs_grad=grad,
                             layout=layout)
        return chosen, layout, opts

    def dispatch(self, impl: str, q, k, v, layout: Layout, *,
                 fn: Callable[..., Any] | None = None, **kwargs: Any):
        """Run implementation ``impl`` (or ``fn``, a function of it such as SLA's parts) on
        ``layout``: the one place text after the grid is handled. The text tokens move to
        the front (one ``torch.cat`` of q, k, v), the implementation computes on the
        text-first layout and its output (a tensor or a tuple of them) moves back. Plain
        grids go as ``grid=(H, W)``, others as ``layout=``.
        """
        first = layout.text_first_form
        q, k, v = (layout.to_text_first(t) for t in (q, k, v))
        geometry = {"grid": first.grid} if first.is_plain else {"layout": first}
        if fn is None:
            fn = self.reference if impl == "reference" else self.fast_path(impl).fn
        out = fn(q, k, v, **geometry, **kwargs)
        if isinstance(out, tuple):
            return tuple(layout.from_text_first(o) for o in out)
        return layout.from_text_first(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               grid: Grid | None = None, layout: Layout | None = None, impl: str = "auto",
               **options: Any) -> torch.Tensor:
        """Attention of ``q`` over ``k, v``: ``[B, H, N, d]`` in and out.

        ``grid=(H, W)`` is the plain image case of ``layout=Layout(...)`` (see
        ``layout.py``: video grids and text tokens). ``impl="auto"`` takes the
        first fast path that can run on these inputs (and supports autograd when
        they require grad), else the reference; ``impl="reference"`` or a fast
        path's name forces one. A method's :attr:`extra_inputs` (CLEAR's ``pool_weight``)
        are keywords too: checked before any work, a differentiable path chosen when one
        requires grad, handed to the path beside the options.
        """
        options, extra = split_extra(self.extra_inputs, options)
        chosen, layout, opts = self.prepare(q, k, v, grid=grid, layout=layout, impl=impl,
                                            options=options, extra=extra)
        return self.dispatch(chosen, q, k, v, layout, **extra, **opts)

    def available(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  shape: tuple[int, ...] | None = None) -> str | None:
        """``None`` when ``attend`` can run here, else the reason.

        Methods with a reference are always available; methods that are only a
        kernel (flash, xformers) override ``kernel_only``.
        """
        device = as_device(device)
        return unavailable(self.fast_paths, device, dtype, shape) if self.kernel_only() else None

    # ----- shared: the modules -------------------------------------------------------
    def mixer(self, dim: int, num_heads: int, **options: Any) -> AttentionMixer:
        """The ``nn.Module`` replacing a DiT block's attention (``x [B,N,C] → [B,N,C]``)."""
        qkv_bias = options.pop("qkv_bias", True)
        impl = options.pop("impl", "auto")
        opts = self.resolve(options, mixer=True)
        return AttentionMixer(self, dim, num_heads, qkv_bias=qkv_bias, impl=impl, **opts)

    def core(self, num_heads: int, head_dim: int, **options: Any) -> AttentionCore:
        """The method on projected heads, learned parts included: ``q, k, v [B,H,N,d] → [B,H,N,d]``.

        What a model that owns its projections (a diffusers transformer's
        ``to_q``/``to_k``/``to_v``/``to_out``) plugs in, and what every mixer
        holds as ``core``: everything of the method except the projections.
        ``impl`` forces a path as in ``attend``.
        """
        impl = options.pop("impl", "auto")
        opts = self.resolve(options, mixer=True)
        cls = self.core_class or AttentionCore
        return cls(self, num_heads, head_dim, impl=impl, **opts)

    def __repr__(self) -> str:
        return f"<attention backend {self.name!r}>"
