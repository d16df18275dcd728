"""The attention contract every method implements.

One method = one :class:`AttentionBackend` subclass, registered once (see
``registry.py``). The contract:

* ``attend(q, k, v, *, layout, impl="auto", **options)`` -- the stateless core,
  ``[B, H, N, d]`` in and out; the :class:`~attnbench.attention.layout.Layout` says
  where the tokens sit (an image or video grid, text tokens before or after it),
  ``grid=(Hgrid, Wgrid)`` is the plain image case. Text after the grid is moved
  to the front and back in one place (:meth:`AttentionBackend.run`), so methods
  define "text prefix + grid" only; which kinds of layout a method defines is
  data (``layout_kinds``), and so is which ones a fast path computes
  (``layouts``). The pure-PyTorch ``reference`` runs anywhere in any dtype
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

import functools
import importlib.util
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._names import closest
from .layout import Layout
from .recipes import ConversionRecipe, DistillRecipe

Grid = tuple[int, int]
#: rows ``(r0, r1)`` → bool mask ``[B|1, H|1, r1 - r0, N]`` of the pairs computed exactly
ExactRows = Callable[[int, int], torch.Tensor]


def rows_in_order(rows: ExactRows, positions: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of a text-first mask ``rows``, both axes in the caller's order
    (``positions[i]`` = token i's text-first index)."""
    wanted = positions[r0:r1]
    lo, hi = int(wanted.min()), int(wanted.max()) + 1
    block = rows(lo, hi)
    return block.index_select(-2, wanted - lo).index_select(-1, positions)


# --------------------------------------------------------------------------- options


#: the largest option value: a radius, block, kernel or shift beyond any token count
#: (larger ones overflow: a radius of 1e300 squared is inf)
MAX_OPTION = 2**31 - 1


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
    #: where the default comes from (the official code's file, the paper's setting, or
    #: "attnbench's choice" with the reason); ``attnbench list`` shows it
    source: str = ""
    #: earlier spellings of a choice, accepted as the choice they became
    aliases: dict[str, Any] = field(default_factory=dict)

    def coerce(self, value: Any) -> Any:
        """Convert ``value`` (possibly a CLI string) to the option's type: finite, and of a
        magnitude (<= :data:`MAX_OPTION`) no radius, block or shift meaningfully exceeds."""
        if value is None:
            if self.default is not None:
                raise ValueError(f"option {self.name!r} is None: give a {self.type.__name__}, "
                                 f"or leave it out for the default {self.default!r}")
            return None
        if isinstance(value, str) and value in self.aliases:
            return self.aliases[value]
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
            coerced = self.type(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(
                f"option {self.name!r} takes a {self.type.__name__}, got {value!r}"
            ) from None
        return coerced

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
        # after the option's own check, which words its range best
        if self.type is float and value is not None and not math.isfinite(value):
            raise ValueError(f"option {self.name!r}={value!r}: must be a finite number")
        if self.type in (int, float) and value is not None and abs(value) > MAX_OPTION:
            raise ValueError(f"option {self.name!r}={value!r}: out of range (|value| <= "
                             f"{MAX_OPTION}, more than any token count)")
        return value


def positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def unit_fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must lie in (0, 1] (a fraction, e.g. 0.05 for 5%)"


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

#: the floating dtypes attnbench's contract accepts
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DTypes = tuple[torch.dtype, ...]


def as_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``; a name torch does not know is a ValueError naming it."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: unknown (use cpu or cuda[:N])") from None


def _dtype_names(dtypes: DTypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


@dataclass(frozen=True)
class FastPath:
    """An implementation of a method's ``attend`` other than its reference, and what it needs.

    ``fn(q, k, v, grid=(H, W), **options)`` (plain grids) or ``fn(q, k, v,
    layout=layout, **options)`` (text first, or video) must match the reference to
    the precision of its dtype. Where it can run is data: ``devices`` (device types,
    ``None`` = any), ``dtypes`` (a tuple, or a ``{device type: tuple}`` mapping;
    missing or ``None`` = any floating dtype), head-dim limits, ``requires``
    (importable module names, any one suffices; ``install`` says how to get
    one) and ``grad_devices`` (where autograd runs through it; ``None`` = wherever
    it runs). :meth:`not_supported_reasons` turns that data into every reason
    it cannot run, the way xformers' ``not_supported_reasons`` does; ``probe``
    adds what data cannot say (no C++ compiler, Triton's interpreter, a package
    that is installed but does not load). ``workspace`` is the path's memory
    model: bytes it keeps alive beside q, k, v and the output, called as
    ``workspace(batch, heads, tokens, head_dim, layout, element_size=..., **options)``
    with the text-first :class:`Layout`.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    devices: tuple[str, ...] | None = None
    dtypes: DTypes | Mapping[str, DTypes] | None = None
    head_dim_max: int | None = None
    head_dim_multiple: int | None = None
    grad_devices: tuple[str, ...] | None = None
    requires: tuple[str, ...] = ()
    install: str = ""
    probe: Callable[[torch.device, torch.dtype, tuple[int, ...] | None], str | None] | None = None
    workspace: Callable[..., float] | None = None
    #: False for compiled paths that ``FlopCounterMode`` (a dispatch mode) cannot trace:
    #: counting them would fail and leave dynamo refusing the function afterwards
    flop_countable: bool = True
    doc: str = ""
    #: what the path's kernels are called in messages ("FlashAttention kernels")
    label: str = ""
    #: the layout kinds (:data:`attnbench.attention.layout.KINDS`) the path computes
    #: correctly; ``None`` = every kind its method accepts. A layout outside them is a
    #: reason in :meth:`not_supported_reasons`, so ``attend`` never runs it silently wrong
    layouts: tuple[str, ...] | None = None
    #: the device types where ``impl="auto"`` may choose the path (``None``: wherever it
    #: runs); elsewhere it runs when named but a path listed after it is the faster one
    #: there (a pure-torch CPU path beside a GPU kernel)
    auto_devices: tuple[str, ...] | None = None

    def accepted_dtypes(self, device_type: str) -> DTypes:
        """The dtypes this path takes on a device type."""
        dtypes = self.dtypes
        if isinstance(dtypes, Mapping):
            dtypes = dtypes.get(device_type, dtypes.get("*"))
        return FLOAT_DTYPES if dtypes is None else tuple(dtypes)

    def not_supported_reasons(
        self,
        device: torch.device | str,
        dtype: torch.dtype,
        shape: tuple[int, ...] | None = None,
        layout: Layout | None = None,
    ) -> list[str]:
        """Every reason this path cannot run on ``device``/``dtype``/``shape``/``layout``
        (``[]``: it can)."""
        device = as_device(device)
        reasons: list[str] = []
        if layout is not None and self.layouts is not None and layout.kind not in self.layouts:
            reasons.append(f"takes {', '.join(self.layouts)} layouts, not {layout.kind} "
                           f"({layout.describe()})")
        if self.devices is not None and device.type not in self.devices:
            where = "/".join(_DEVICE_NAMES.get(d, d) for d in self.devices)
            subject = f"{self.label} are" if self.label else "this path runs"
            here = _DEVICE_NAMES.get(device.type, device.type)
            reasons.append(f"{subject} {where}-only (no {here} kernel)")
        accepted = self.accepted_dtypes(device.type)
        if dtype not in accepted:
            where = f" on {device.type}" if isinstance(self.dtypes, Mapping) else ""
            reasons.append(f"takes {_dtype_names(accepted)}{where}, not "
                           f"{str(dtype).removeprefix('torch.')}")
        if shape is not None and len(shape) == 4:
            d = shape[-1]
            if self.head_dim_max is not None and d > self.head_dim_max:
                reasons.append(f"needs head_dim <= {self.head_dim_max}, got {d}")
            if self.head_dim_multiple is not None and d % self.head_dim_multiple:
                reasons.append(f"needs head_dim a multiple of {self.head_dim_multiple}, got {d}")
        if self.requires and not any(_importable(m) for m in self.requires):
            names = " or ".join(self.requires)
            reasons.append(f"{names} is not installed"
                           + (f" ({self.install})" if self.install else ""))
        if self.probe is not None and not reasons:  # probes may import: only when data allows
            try:
                extra = self.probe(device, dtype, shape)
            except Exception as err:  # an availability probe must never crash a sweep
                extra = f"availability check failed: {type(err).__name__}: {err}"
            if extra:
                reasons.append(extra)
        return reasons

    def available(
        self,
        device: torch.device | str,
        dtype: torch.dtype,
        shape: tuple[int, ...] | None = None,
        layout: Layout | None = None,
    ) -> str | None:
        """``None`` when this path can run here, else its reasons in one sentence."""
        reasons = self.not_supported_reasons(device, dtype, shape, layout)
        return "; ".join(reasons) if reasons else None

    def supports_grad(self, device: torch.device | str) -> bool:
        """Whether autograd runs through this path on ``device``."""
        grad = self.grad_devices
        return True if grad is None else as_device(device).type in grad

    def workspace_bytes(self, *args: Any, **kwargs: Any) -> float:
        """The path's memory model (0: a flash-style kernel that keeps only O(N·d))."""
        return 0.0 if self.workspace is None else float(self.workspace(*args, **kwargs))

    def capabilities(self) -> dict[str, Any]:
        """The path's requirements as JSON-able data (``attnbench list``)."""
        dtypes = self.dtypes
        if isinstance(dtypes, Mapping):
            shown: Any = {k: _dtype_names(v) for k, v in dtypes.items()}
        else:
            shown = _dtype_names(dtypes) if dtypes else "any float"
        return {
            "devices": list(self.devices) if self.devices else "any",
            "dtypes": shown,
            "head_dim_max": self.head_dim_max,
            "head_dim_multiple": self.head_dim_multiple,
            "autograd": list(self.grad_devices) if self.grad_devices is not None else "yes",
            "requires": list(self.requires),
            "layouts": list(self.layouts) if self.layouts is not None else "all of the method's",
            "auto": list(self.auto_devices) if self.auto_devices is not None else "anywhere",
            "doc": self.doc,
        }


_DEVICE_NAMES = {"cuda": "CUDA", "cpu": "CPU", "mps": "MPS", "xpu": "XPU"}


@functools.cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Selection:
    """The implementation ``attend`` runs on some inputs, and why faster ones did not.

    ``passed_over`` maps every fast path listed ahead of ``path`` to the reasons
    it could not run (a results row records both: a GPU without Triton then
    says so instead of silently measuring a slower path).
    """

    path: str
    passed_over: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.passed_over:
            return self.path
        why = "; ".join(f"{name}: {', '.join(r)}" for name, r in self.passed_over.items())
        return f"{self.path} (passed over {why})"


# --------------------------------------------------------------------------- checks


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str = "") -> None:
    """Raise ``ValueError`` unless q, k, v are floating ``[B, H, N, d]`` tensors that agree.

    Integer, bool and complex inputs are refused here, before any work, with
    one message for every method (attention is defined on real numbers; an
    integer input would otherwise give an integer result or a torch error).
    """
    where = f"{method}: " if method else ""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{where}{name} has dtype {str(t.dtype).removeprefix('torch.')}; attention takes "
                f"floating-point tensors ({_dtype_names(FLOAT_DTYPES)}): convert with .float()"
            )
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
    ``reference`` and ``flop_model`` (and ``reference_workspace``,
    ``mixer_flops``, ``overhead_steps``, ``density_model``, ``rounded_options``
    where they have them), list their ``fast_paths`` (each carrying its
    capabilities and memory model), give ``core_class`` (the learned parts) and
    their recipes. Everything else -- option resolution and validation,
    dispatch, availability, the public ``flops``/``memory``/``density`` --
    lives here once.
    """

    name: str = ""
    summary: str = ""
    paper: str = ""
    options: tuple[Option, ...] = ()
    #: the mixer ``nn.Module`` class; ``mixer()`` instantiates it (qkv + core + proj).
    mixer_class: type[AttentionMixer] | None = None
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

    @property
    def inherits_projections(self) -> bool:
        """Whether a converted student inherits the softmax q/k/v/out projections."""
        recipe = self.conversion_recipe
        return True if recipe is None else recipe.inherit_projections

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

    #: the layout kinds (:data:`attnbench.attention.layout.KINDS`) the method defines;
    #: the default, plain image grids, suits a method that reads ``grid=(H, W)`` only
    layout_kinds: tuple[str, ...] = ("image",)

    def fold_layout(
        self, layout: Layout, options: dict[str, Any]
    ) -> tuple[Layout, dict[str, Any]]:
        """``(layout, options)`` after options that also describe geometry (CLEAR's
        deprecated ``global_tokens``) are folded into the layout and reset in the options;
        both unchanged for most methods."""
        return layout, options

    def check_layout(self, layout: Layout, options: dict[str, Any]) -> None:
        """Raise ValueError, before any work, for a layout the method does not define
        (or not with these options)."""
        if layout.kind not in self.layout_kinds:
            raise ValueError(
                f"{self.name} takes {', '.join(self.layout_kinds)} layouts; layout "
                f"{layout.describe()} ({layout.kind}) is not supported by this method"
            )

    def geometry(
        self, layout: Layout | None, grid: Any, options: dict[str, Any], tokens: int | None = None,
        *, square: bool = False,
    ) -> tuple[Layout, dict[str, Any]]:
        """The checked, folded ``(layout, options)`` of a call or a cost model (``tokens``:
        the input's; with ``square``, a shape-only caller without a geometry gets the
        square image grid of ``tokens``)."""
        if layout is None and grid is None and square and tokens is not None:
            extra = self.fold_layout(Layout((1, 1)), options)[0].text
            layout = Layout(square_grid(tokens - extra))
        if isinstance(grid, Layout):
            layout, grid = grid, None
        layout, options = self.fold_layout(Layout.coerce(layout, grid), options)
        if tokens is not None:
            layout.check(tokens)
        self.check_layout(layout, options)
        return layout, options

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

    def selection(
        self,
        device: torch.device | str,
        dtype: torch.dtype,
        shape: tuple[int, ...] | None = None,
        *,
        needs_grad: bool = False,
        impl: str = "auto",
        layout: Layout | None = None,
    ) -> Selection:
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
        passed: dict[str, list[str]] = {}
        for p in self.fast_paths:
            if p.auto_devices is not None and device.type not in p.auto_devices:
                continue  # not the fast one here; it runs when named
            reasons = p.not_supported_reasons(device, dtype, shape, layout)
            if not reasons and needs_grad and not p.supports_grad(device):
                reasons = [f"no autograd on {device.type} (gradients are needed)"]
            if not reasons:
                return Selection(p.name, passed)
            passed[p.name] = reasons
        if self.kernel_only():
            raise ValueError(f"{self.name} cannot run here: {self.available(device, dtype, shape)}")
        return Selection("reference", passed)

    def select(
        self,
        device: torch.device | str,
        dtype: torch.dtype,
        shape: tuple[int, ...] | None = None,
        *,
        impl: str = "auto",
        needs_grad: bool = False,
        layout: Layout | None = None,
    ) -> str:
        """The implementation ``attend`` will run (``selection(...).path``)."""
        return self.selection(device, dtype, shape, needs_grad=needs_grad, impl=impl,
                              layout=layout).path

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

    def flop_countable(self, impl: str) -> bool:
        """Whether ``FlopCounterMode`` can count the implementation ``impl``."""
        return all(p.flop_countable for p in self.fast_paths if p.name == impl)

    def kernel_only(self) -> bool:
        """True for methods that only exist as a fast path (flash, xformers)."""
        return False

    @staticmethod
    def needs_grad(*tensors: torch.Tensor | None) -> bool:
        """Whether autograd will run back through any of ``tensors``."""
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors
        )

    def prepare(
        self, q, k, v, *, grid: Grid | None = None, impl: str, options: dict[str, Any],
        needs_grad: bool | None = None, layout: Layout | None = None,
    ) -> tuple[str, Layout, dict[str, Any]]:
        """Checks shared by every entry point, before any work:
        ``(implementation, layout, resolved options)``."""
        check_qkv(q, k, v, self.name)
        layout, opts = self.geometry(layout, grid, self.resolve(options), tokens=k.shape[2])
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"{self.name}: q has {q.shape[2]} tokens but k has {k.shape[2]}; "
                             "a layout describes one token sequence")
        grad = self.needs_grad(q, k, v) if needs_grad is None else needs_grad
        chosen = self.select(q.device, q.dtype, tuple(q.shape), impl=impl, needs_grad=grad,
                             layout=layout)
        return chosen, layout, opts

    def run(self, impl: str, q, k, v, layout: Layout, *, fn: Callable[..., Any] | None = None,
            **kwargs: Any):
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
        chosen, layout, opts = self.prepare(q, k, v, grid=grid, layout=layout, impl=impl,
                                            options=options)
        return self.run(chosen, q, k, v, layout, **opts)

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
        device = as_device(device)
        if not self.kernel_only():
            return None
        fast = {p.name: p.not_supported_reasons(device, dtype, shape) for p in self.fast_paths}
        if any(not r for r in fast.values()):
            return None
        if len(fast) == 1:
            return "; ".join(next(iter(fast.values())))
        firsts = {r[0] for r in fast.values()}
        if len(firsts) == 1:  # the same first obstacle for every path: say it once
            return next(iter(firsts))
        return "; ".join(f"{name}: {'; '.join(r)}" for name, r in fast.items())

    # ----- the module ---------------------------------------------------------------
    def mixer(self, dim: int, num_heads: int, **options: Any) -> AttentionMixer:
        """The ``nn.Module`` replacing a DiT block's attention (``x [B,N,C] → [B,N,C]``)."""
        qkv_bias = options.pop("qkv_bias", True)
        impl = options.pop("impl", "auto")
        opts = self.resolve(options, mixer=True)
        cls = self.mixer_class or AttentionMixer
        return cls(self, dim, num_heads, qkv_bias=qkv_bias, impl=impl, **opts)

    #: the ``nn.Module`` class of the method on already-projected heads (``core()``):
    #: where the method's learned parts live
    core_class: type[AttentionCore] | None = None

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

    # ----- cost models --------------------------------------------------------------
    def _cost_args(self, dims: tuple[int, int, int, int], grid: Grid | Layout | None,
                   layout: Layout | None, options: dict[str, Any]
                   ) -> tuple[Layout, dict[str, Any]]:
        """Layout and options of a cost model, after checking the shapes are counts."""
        for name, value in zip(("batch", "heads", "tokens", "head_dim"), dims, strict=True):
            try:
                ok = not isinstance(value, bool) and operator.index(value) >= 0
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"{self.name}: {name} must be an integer >= 0, got {value!r}")
        tokens = dims[2]
        return self.geometry(layout, grid, self.resolve(options), tokens=tokens, square=True)

    def flops(
        self,
        batch: int,
        heads: int,
        tokens: int,
        head_dim: int,
        grid: Grid | Layout | None = None,
        *,
        layout: Layout | None = None,
        **options: Any,
    ) -> Flops:
        """Analytic forward FLOPs of ``attend`` on these shapes (module docstring).

        ``grid`` (or ``layout``) as for ``attend``; a :class:`Layout` counts text tokens
        and video frames; neither: the square image grid of ``tokens``.
        """
        layout, opts = self._cost_args((batch, heads, tokens, head_dim), grid, layout, options)
        return self.flop_model(batch, heads, tokens, head_dim, layout.text_first_form, **opts)

    def memory(
        self,
        batch: int,
        heads: int,
        tokens: int,
        head_dim: int,
        grid: Grid | Layout | None = None,
        *,
        layout: Layout | None = None,
        element_size: int = 2,
        impl: str = "fast",
        **options: Any,
    ) -> Memory:
        """Analytic bytes of one forward call of ``impl``: a path's name, ``"reference"``,
        or ``"fast"`` (the first fast path: what runs where every kernel is available).
        ``grid``/``layout`` as for :meth:`flops`; a text-last layout adds the text-first
        copies of q, k, v and the output that ``attend`` makes."""
        if impl == "fast":
            impl = self.fast_paths[0].name if self.fast_paths else "reference"
        elif impl not in ("reference", *self.paths()):
            raise ValueError(f"{self.name}: unknown implementation {impl!r}; valid: fast, "
                             f"{', '.join(dict.fromkeys(['reference', *self.paths()]))}")
        layout, opts = self._cost_args((batch, heads, tokens, head_dim), grid, layout, options)
        io = 4.0 * batch * heads * tokens * head_dim * element_size
        workspace = self.workspace_model(
            batch, heads, tokens, head_dim, layout.text_first_form, element_size=element_size,
            impl=impl, **opts
        )
        if layout.text and not layout.text_first:
            workspace += io  # the text-first copies of q, k, v and the output
        return Memory(io=io, workspace=float(workspace), dense=io)

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

    def flop_model(self, batch, heads, tokens, head_dim, layout: Layout, **options) -> Flops:
        raise NotImplementedError  # pragma: no cover - every method defines it

    # ----- honest labels ------------------------------------------------------------
    def _label_args(self, geometry: Grid | Layout, options: dict[str, Any]):
        opts = self.resolve(self.attend_options(options))
        if isinstance(geometry, Layout):
            layout, opts = self.geometry(geometry, None, opts)
        else:
            layout, opts = self.geometry(None, tuple(int(s) for s in geometry), opts)
        return layout.text_first_form, opts

    def density(self, geometry: Grid | Layout, **options: Any) -> float:
        """Fraction of the N×N query–key pairs this method computes exactly, in [0, 1].

        Softmax-exact methods 1; a local or sparse method the pairs it attends
        with exact softmax over N²; a linear method 0 (it computes no exact pair).
        ``geometry`` is ``(H, W)`` or a :class:`Layout` (N counts its text tokens and
        every frame); ``options`` as for ``attend`` (mixer-only ones are ignored).
        """
        layout, opts = self._label_args(geometry, options)
        return float(self.density_model(layout, **opts))

    def density_model(self, layout: Layout, **options: Any) -> float:
        return 1.0

    def exact_pairs(self, q: torch.Tensor, k: torch.Tensor, geometry: Grid | Layout,
                    **options: Any) -> ExactRows | None:
        """The query–key pairs this method computes exactly on ``q, k``, row by row.

        Returns ``rows(r0, r1)``: a bool mask broadcastable to ``[B, H, r1 - r0, N]``
        (True = the pair is computed by exact softmax), in the call's token order; or
        ``None`` for a method that computes no pair exactly (linear attention). The
        pairs whose softmax probability mass a method keeps (zero-shot fidelity's
        mass recall); rows keep the memory at O(rows · N). Pooled or extra key tokens
        that are not input tokens are not pairs.
        """
        layout, opts = self._label_args(geometry, options)
        given = geometry if isinstance(geometry, Layout) else layout
        given.check(k.shape[2])
        density = self.density_model(layout, **opts)
        if density == 0.0:
            return None
        if density == 1.0 and not self.sparse_pairs:
            n = k.shape[2]
            return lambda r0, r1: torch.ones(1, 1, r1 - r0, n, dtype=torch.bool, device=k.device)
        rows = self.exact_rows_model(given.to_text_first(q), given.to_text_first(k), layout,
                                     **opts)
        if given.text_first or not given.text:
            return rows
        pos = given.text_first_positions(k.device)
        return lambda r0, r1: rows_in_order(rows, pos, r0, r1)

    #: True for methods whose exact pairs are a strict subset of all pairs in general
    #: (CLEAR's window, SLA's blocks): ``exact_pairs`` asks ``exact_rows_model`` then
    sparse_pairs: bool = False

    def exact_rows_model(self, q, k, layout: Layout, **options: Any) -> ExactRows:
        """``exact_pairs`` on text-first ``q, k`` over the text-first ``layout``."""
        raise NotImplementedError  # pragma: no cover - methods with sparse_pairs define it

    def effective_options(self, geometry: Grid | Layout, **options: Any) -> dict[str, Any]:
        """The options as they act at this geometry: resolved, plus what rounding made of
        them (SLA's kept blocks, CLEAR's integer distance limits and pooled tokens)."""
        layout, opts = self._label_args(geometry, options)
        return {**opts, **self.rounded_options(layout, **opts)}

    def stated_options(self, options: Mapping[str, Any],
                       effective: Mapping[str, Any]) -> dict[str, Any]:
        """The options a result row ran with, said in today's terms: the requested ones
        plus each option its ``effective`` record holds at a value other than today's
        default. A row measured before a default changed (SLA's ``order`` was "tiles",
        its ``linear_over`` "marginal") keeps saying what it ran instead of taking the
        new default's label; a row at today's defaults is unchanged."""
        defaults = {o.name: o.default for o in self.options}
        kept = {k: v for k, v in effective.items()
                if k in defaults and k not in options and v != defaults[k]}
        return {**options, **kept}

    def rounded_options(self, layout: Layout, **options: Any) -> dict[str, Any]:
        """What the method's rounding makes of ``options`` at this layout (``{}``: none)."""
        return {}

    #: relative distance between a requested and an effective value that is worth a warning
    ROUNDING_TOLERANCE = 0.2

    def rounding_warning(self, geometry: Grid | Layout, **options: Any) -> str | None:
        """A sentence when rounding moves an option more than 20% (relative) from the
        request, e.g. ``"sla:topk=0.05 keeps 1 of 4 blocks (25%)"``; else ``None``."""
        layout, opts = self._label_args(geometry, options)
        for requested, effective, sentence in self.rounding_checks(layout, **opts):
            if requested == effective:
                continue
            if requested == 0 or abs(effective - requested) > self.ROUNDING_TOLERANCE * abs(
                requested
            ):
                return sentence
        return None

    def rounding_checks(self, layout: Layout, **options: Any) -> list[tuple[float, float, str]]:
        """``(requested, effective, sentence)`` for each option that rounds (``[]``: none)."""
        return []

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
                    "source": o.source,
                }
                for o in self.options
            ],
            "implementations": self.paths(),
            "layouts": list(self.layout_kinds),
            "capabilities": {p.name: p.capabilities() for p in self.fast_paths},
            "conversion_recipe": self.conversion_recipe.to_dict()
            if self.conversion_recipe else None,
            "distill_recipe": {**self.distill_recipe.to_dict(),
                               "describe": self.distill_recipe.describe()}
            if self.distill_recipe else None,
            "distill_alternatives": [r.describe() for r in self.distill_alternatives],
            "notes": list(self.notes),
        }

    def __repr__(self) -> str:
        return f"<attention backend {self.name!r}>"


# --------------------------------------------------------------------------- core and mixer


class AttentionCore(nn.Module):
    """A method on projected heads: ``q, k, v [B, H, N, d] → [B, H, N, d]`` over a layout.

    Holds the method's learned parts (none for the plain methods) so that they
    are parameters of whatever model it is plugged into -- a DiT block's mixer
    or a diffusers attention processor -- and train with it. Subclasses add
    their parts, override ``forward`` and ``reset_new_parameters``. Every
    parameter of a core is new: a softmax checkpoint has none of them.
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
        backend: AttentionBackend,
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

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [B, N, {self.dim}], got {tuple(x.shape)}")
        q, k, v = self.split_heads(x)
        out = self.core(q, k, v, grid=tuple(grid))
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
