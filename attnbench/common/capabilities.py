"""What a fast path needs, as data a process without torch can read.

A :class:`~attnbench.attention.paths.FastPath` declares where it runs (devices, dtypes,
head-dim limits, importable modules); :class:`PathFacts` is that declaration with the
dtypes by name, and :meth:`PathFacts.reasons` the one place it becomes sentences --
for the live registry and for ``attnbench list``, which answers from the generated
catalogue (:mod:`.catalogue`) without importing torch. A path's ``probe`` says what data
cannot; where its answer needs no torch either (Triton's interpreter is an environment
variable, a C++ compiler a file on the ``PATH``), the probe is marked
:func:`answered_by` one of :data:`TORCH_FREE_PROBES`, which give the same sentences
from the same facts, and raise :class:`NeedsTorch` where only torch can tell.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
import sysconfig
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: the floating dtypes attnbench's contract accepts, by name
FLOAT_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")
DEVICE_NAMES = {"cuda": "CUDA", "cpu": "CPU", "mps": "MPS", "xpu": "XPU"}
#: a path's probe that only a live registry (torch) can run
LIVE = "live"


class NeedsTorch(Exception):
    """The answer depends on what only torch can say (a GPU, an unusual environment)."""


@functools.cache
def importable(module: str) -> bool:
    """Whether ``module`` is installed (found, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def dtype_names(names: tuple[str, ...]) -> str:
    return ", ".join(names)


@dataclass(frozen=True)
class PathFacts:
    """A fast path's capability data with its dtypes by name (see ``FastPath``).

    ``dtypes``: a tuple, or ``{device type: tuple}`` (``"*"``: every other type);
    missing or ``None`` = any floating dtype. ``probe``: ``None`` (no probe), the name
    of its torch-free twin in :data:`TORCH_FREE_PROBES`, or :data:`LIVE`.
    """

    devices: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] | Mapping[str, tuple[str, ...] | None] | None = None
    head_dim_max: int | None = None
    head_dim_multiple: int | None = None
    requires: tuple[str, ...] = ()
    install: str = ""
    label: str = ""
    probe: str | None = None

    def accepted_dtypes(self, device_type: str) -> tuple[str, ...]:
        """The dtype names this path takes on a device type."""
        dtypes = self.dtypes
        if isinstance(dtypes, Mapping):
            dtypes = dtypes.get(device_type, dtypes.get("*"))
        return FLOAT_DTYPE_NAMES if dtypes is None else tuple(dtypes)

    def reasons(self, device_type: str, dtype: str, head_dim: int | None = None) -> list[str]:
        """Every reason the data gives why this path cannot run (``[]``: none; the probe,
        which runs only then, may still find one)."""
        reasons: list[str] = []
        if self.devices is not None and device_type not in self.devices:
            where = "/".join(DEVICE_NAMES.get(d, d) for d in self.devices)
            subject = f"{self.label} are" if self.label else "this path runs"
            here = DEVICE_NAMES.get(device_type, device_type)
            reasons.append(f"{subject} {where}-only (no {here} kernel)")
        accepted = self.accepted_dtypes(device_type)
        if dtype not in accepted:
            where = f" on {device_type}" if isinstance(self.dtypes, Mapping) else ""
            reasons.append(f"takes {dtype_names(accepted)}{where}, not {dtype}")
        if head_dim is not None:
            if self.head_dim_max is not None and head_dim > self.head_dim_max:
                reasons.append(f"needs head_dim <= {self.head_dim_max}, got {head_dim}")
            if self.head_dim_multiple is not None and head_dim % self.head_dim_multiple:
                reasons.append(f"needs head_dim a multiple of {self.head_dim_multiple}, "
                               f"got {head_dim}")
        if self.requires and not any(importable(m) for m in self.requires):
            names = " or ".join(self.requires)
            reasons.append(f"{names} is not installed"
                           + (f" ({self.install})" if self.install else ""))
        return reasons

    def torch_free_reasons(self, device_type: str, dtype: str) -> list[str]:
        """:meth:`reasons`, then the probe's by its torch-free twin: what the live path
        says here in a fresh process; :class:`NeedsTorch` where only torch can tell."""
        reasons = self.reasons(device_type, dtype)
        if self.probe is not None and not reasons:
            if self.probe not in TORCH_FREE_PROBES:
                raise NeedsTorch("a probe only the live path can run")
            extra = TORCH_FREE_PROBES[self.probe](device_type, dtype)
            if extra:
                reasons.append(extra)
        return reasons

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PathFacts:
        """The facts :meth:`to_dict` wrote (lists back to tuples)."""
        def tup(x):
            return None if x is None else tuple(x)

        dtypes = data["dtypes"]
        dtypes = ({k: tup(v) for k, v in dtypes.items()} if isinstance(dtypes, Mapping)
                  else tup(dtypes))
        return cls(**{**data, "devices": tup(data["devices"]), "dtypes": dtypes,
                      "requires": tuple(data["requires"])})


def first_obstacle(fast: Mapping[str, list[str]]) -> str | None:
    """``None`` when one of the paths (``{name: its reasons}``) can run, else why none can
    in one sentence: the same first obstacle of every path said once."""
    if any(not r for r in fast.values()):
        return None
    if len(fast) == 1:
        return "; ".join(next(iter(fast.values())))
    firsts = {r[0] for r in fast.values()}
    if len(firsts) == 1:
        return next(iter(firsts))
    return "; ".join(f"{name}: {'; '.join(r)}" for name, r in fast.items())


def answered_by(name: str) -> Callable[[Callable], Callable]:
    """Mark a live probe whose answer :data:`TORCH_FREE_PROBES` ``[name]`` also gives."""
    def mark(probe: Callable) -> Callable:
        probe.torch_free = name
        return probe

    return mark


# --------------------------------------------------------------------------- Triton

TRITON_NOT_INTERPRETED = ("the Triton kernels run on CUDA GPUs; on CPU only under Triton's "
                          "interpreter (TRITON_INTERPRET=1, slow: for tests)")
TRITON_LOADED_COMPILED = ("the Triton kernels were imported compiled (before "
                          "TRITON_INTERPRET=1 was set): the interpreter cannot run them in "
                          "this process")
TRITON_INTERPRETED_BF16 = "Triton's interpreter computes bfloat16 wrongly (NumPy has no bfloat16)"


def triton_cpu_reason(interpret: bool, loaded_compiled: bool, dtype: str) -> str | None:
    """Why attnbench's Triton kernels cannot run on the CPU (``None``: they can), given
    whether Triton interprets and whether the kernel module was already imported compiled."""
    if not interpret:
        return TRITON_NOT_INTERPRETED
    if loaded_compiled:
        return TRITON_LOADED_COMPILED
    if dtype == "bfloat16":
        return TRITON_INTERPRETED_BF16
    return None


def _triton(device_type: str, dtype: str) -> str | None:
    """The Triton kernels' probe in a fresh process (no kernel module imported yet) with
    ``TRITON_INTERPRET`` unset, ``0`` or ``1`` (any other spelling is Triton's to read); an
    installed triton is taken to import (a broken one is the live probe's to find)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0")
    if device_type != "cpu" or interpret not in ("0", "1"):
        raise NeedsTorch("Triton on a GPU, or a TRITON_INTERPRET only Triton reads")
    return triton_cpu_reason(interpret == "1", False, dtype)


# --------------------------------------------------------------------------- FlexAttention

FLEX_NO_COMPILER = "FlexAttention on CPU compiles C++ kernels: no C++ compiler found"


def _flex(device_type: str, dtype: str) -> str | None:
    """FlexAttention's probe on the CPU: its module in the installed torch (>= 2.5, as
    attnbench requires), a Python whose torch.compile every such torch supports (3.9 to
    3.12 with the GIL, not Windows), a C++ compiler (``$CXX``, else g++ or c++ on the
    ``PATH``). Anything else is the live probe's to word."""
    spec = importlib.util.find_spec("torch")
    if device_type != "cpu" or spec is None or not spec.submodule_search_locations:
        raise NeedsTorch("FlexAttention on a GPU, or no torch")
    if not any((Path(p) / "nn/attention/flex_attention.py").is_file()
               for p in spec.submodule_search_locations):
        raise NeedsTorch("a torch without FlexAttention")
    if sys.version_info >= (3, 13) or sysconfig.get_config_var("Py_GIL_DISABLED") \
            or sys.platform == "win32":
        raise NeedsTorch("whether this torch compiles on this Python")
    compiler = shutil.which(os.environ.get("CXX") or "g++") or shutil.which("g++") \
        or shutil.which("c++")
    return None if compiler else FLEX_NO_COMPILER


def _shape_only(device_type: str, dtype: str) -> str | None:
    """A probe that looks at the input's shape alone: without one, no reason."""
    return None


#: the torch-free twin of each probe marked :func:`answered_by` its name: called as
#: ``twin(device type, dtype name)`` with no shape (``attnbench list``)
TORCH_FREE_PROBES: dict[str, Callable[[str, str], str | None]] = {
    "triton": _triton,
    "flex": _flex,
    "shape_only": _shape_only,
}
