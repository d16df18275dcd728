"""Fast paths: an implementation of a method beside its reference, and where it can run.

A :class:`FastPath` carries its capabilities as data (devices, dtypes, head-dim
limits, required packages, layouts, autograd devices, where ``impl="auto"`` may
pick it) and its memory model; :meth:`FastPath.not_supported_reasons` turns that
data into every reason it cannot run here. A :class:`Selection` is what
``attend`` picked and why the paths ahead of it were passed over.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .layout import Layout

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

    def not_supported_reasons(self, device: torch.device | str, dtype: torch.dtype,
                              shape: tuple[int, ...] | None = None,
                              layout: Layout | None = None) -> list[str]:
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


def unavailable(paths: tuple[FastPath, ...], device: torch.device, dtype: torch.dtype,
                shape: tuple[int, ...] | None = None) -> str | None:
    """``None`` when one of ``paths`` can run here, else why none can in one sentence (the
    same first obstacle of every path said once)."""
    fast = {p.name: p.not_supported_reasons(device, dtype, shape) for p in paths}
    if any(not r for r in fast.values()):
        return None
    if len(fast) == 1:
        return "; ".join(next(iter(fast.values())))
    firsts = {r[0] for r in fast.values()}
    if len(firsts) == 1:
        return next(iter(firsts))
    return "; ".join(f"{name}: {'; '.join(r)}" for name, r in fast.items())


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
