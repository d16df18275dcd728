"""Fast paths: an implementation of a method beside its reference, and where it can run.

A :class:`FastPath` carries its capabilities as data (devices, dtypes, head-dim
limits, required packages, layouts, autograd devices, where ``impl="auto"`` may
pick it) and its memory model; :meth:`FastPath.not_supported_reasons` turns that
data into every reason it cannot run here (the data's part by
:class:`~attnbench.common.capabilities.PathFacts`, which ``attnbench list`` reads
without torch). A :class:`Selection` is what ``attend`` picked and why the paths ahead
of it were passed over.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..common.capabilities import (
    FLOAT_DTYPE_NAMES,
    LIVE,
    PathFacts,
    dtype_names,
    first_obstacle,
)
from .layout import Layout

#: the floating dtypes attnbench's contract accepts
FLOAT_DTYPES = tuple(getattr(torch, name) for name in FLOAT_DTYPE_NAMES)
DTypes = tuple[torch.dtype, ...]


def as_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``; a name torch does not know is a ValueError naming it."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: unknown (use cpu or cuda[:N])") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_name_tuple(dtypes: DTypes) -> tuple[str, ...]:
    return tuple(_dtype_name(d) for d in dtypes)


def _dtype_names(dtypes: DTypes) -> str:
    return dtype_names(_dtype_name_tuple(dtypes))


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

    def not_supported_reasons(self, device: torch.device | str, dtype: torch.dtype,
                              shape: tuple[int, ...] | None = None,
                              layout: Layout | None = None) -> list[str]:
        """Every reason this path cannot run on ``device``/``dtype``/``shape``/``layout``
        (``[]``: it can): the layout, then the data (:meth:`PathFacts.reasons`), then the
        probe."""
        device = as_device(device)
        reasons: list[str] = []
        if layout is not None and self.layouts is not None and layout.kind not in self.layouts:
            reasons.append(f"takes {', '.join(self.layouts)} layouts, not {layout.kind} "
                           f"({layout.describe()})")
        head_dim = shape[-1] if shape is not None and len(shape) == 4 else None
        reasons += self.facts.reasons(device.type, _dtype_name(dtype), head_dim)
        if self.probe is not None and not reasons:  # probes may import: only when data allows
            try:
                extra = self.probe(device, dtype, shape)
            except Exception as err:  # an availability probe must never crash a sweep
                extra = f"availability check failed: {type(err).__name__}: {err}"
            if extra:
                reasons.append(extra)
        return reasons

    def available(self, device: torch.device | str, dtype: torch.dtype,
                  shape: tuple[int, ...] | None = None, layout: Layout | None = None
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

    @functools.cached_property
    def facts(self) -> PathFacts:
        """The capability data with dtypes by name: what ``attnbench list`` reads without
        torch (a probe marked ``answered_by`` a torch-free twin names it)."""
        dtypes = self.dtypes
        if isinstance(dtypes, Mapping):
            named: Any = {k: None if v is None else _dtype_name_tuple(v)
                          for k, v in dtypes.items()}
        else:
            named = None if dtypes is None else _dtype_name_tuple(dtypes)
        probe = None if self.probe is None else getattr(self.probe, "torch_free", LIVE)
        return PathFacts(devices=self.devices, dtypes=named, head_dim_max=self.head_dim_max,
                         head_dim_multiple=self.head_dim_multiple, requires=self.requires,
                         install=self.install, label=self.label, probe=probe)

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


def unavailable(paths: tuple[FastPath, ...], device: torch.device, dtype: torch.dtype,
                shape: tuple[int, ...] | None = None) -> str | None:
    """``None`` when one of ``paths`` can run here, else why none can in one sentence (the
    same first obstacle of every path said once)."""
    return first_obstacle({p.name: p.not_supported_reasons(device, dtype, shape) for p in paths})


def first_runnable(paths: tuple[FastPath, ...], device: torch.device, dtype: torch.dtype,
                   shape: tuple[int, ...] | None, layout: Layout | None,
                   needs_grad: bool) -> Selection:
    """``impl="auto"``: the first of ``paths`` that auto may choose on ``device``
    (:attr:`FastPath.auto_devices`) and that can run here (with autograd when
    ``needs_grad``), each one ahead of it passed over with its reasons; ``"reference"``
    when none can."""
    passed: dict[str, list[str]] = {}
    for p in paths:
        if p.auto_devices is not None and device.type not in p.auto_devices:
            continue  # not the fast one here; it runs when named
        reasons = p.not_supported_reasons(device, dtype, shape, layout)
        if not reasons and needs_grad and not p.supports_grad(device):
            reasons = [f"no autograd on {device.type} (gradients are needed)"]
        if not reasons:
            return Selection(p.name, passed)
        passed[p.name] = reasons
    return Selection("reference", passed)
