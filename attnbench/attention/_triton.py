"""Whether attnbench's Triton kernels can run here, and why not (shared by LiT and SLA).

Triton stays optional: nothing here imports it at module import time, and the
availability checks import only ``triton`` itself (never a kernel module), so
``attnbench list`` and every CPU test work without it.

Where the kernels run:

* CUDA: the compiled kernels (half precision needs an Ampere GPU or newer for
  bfloat16, as Triton does).
* CPU: only under Triton's interpreter, ``TRITON_INTERPRET=1`` in the
  environment *when the kernel module is imported* (Triton decides at
  ``@triton.jit`` time). The interpreter runs each program in NumPy: slow, for
  tests at small shapes. Its bfloat16 arithmetic is wrong (NumPy has no
  bfloat16), so bfloat16 is refused there. Without the variable the fast paths
  say why they cannot run and the registry falls back to the pure-torch paths,
  which keeps the generic CPU suite fast.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from types import ModuleType

import torch

from ..common.capabilities import answered_by, triton_cpu_reason

INSTALL_HINT = "triton is not installed (pip install 'attnbench[triton]')"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_import_error() -> str | None:
    """``None`` when ``import triton`` works, else the reason (cached per process)."""
    try:
        import triton.language  # noqa: F401  (imports triton itself)
    except ImportError:
        return INSTALL_HINT
    except Exception as err:  # a broken install (ABI, missing driver library, ...)
        return f"triton is installed but does not import: {type(err).__name__}: {err}"
    return None


def interpret_requested() -> bool:
    """Whether Triton would interpret a kernel decorated now (``TRITON_INTERPRET``)."""
    try:
        from triton import knobs  # triton >= 3.3

        return bool(knobs.runtime.interpret)
    except Exception:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def loaded_mode(module: str) -> bool | None:
    """``True``/``False``: kernel module ``module`` (its full dotted name) was imported
    interpreted / compiled; ``None``: not yet."""
    mod = sys.modules.get(module)
    return None if mod is None else bool(mod.INTERPRETED)


def load(module: str) -> ModuleType:
    """Import the kernel module ``module`` (full name, e.g. ``attnbench.attention.lit.triton``)."""
    return importlib.import_module(module)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def kernel_reason(
    module: str,
    device: torch.device,
    dtype: torch.dtype,
    shape: tuple[int, ...] | None = None,
) -> str | None:
    """``None`` when the kernels of ``module`` can run on ``device``/``dtype``, else why not.

    The probe of the Triton fast paths: what their capability data cannot say
    (triton imports, the GPU's compute capability, the interpreter's mode).
    """
    reason = triton_import_error()
    if reason:
        return reason
    mode = loaded_mode(module)
    if device.type == "cuda":
        if mode:
            return (
                "the Triton kernels were loaded interpreted (TRITON_INTERPRET=1 at import): "
                "unset it to run them compiled on the GPU"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = _capability(index)
        if major < 7:
            return f"Triton needs a GPU of compute capability >= 7.0, this one is {major}.{minor}"
        if dtype == torch.bfloat16 and major < 8:
            return f"bfloat16 Triton kernels need compute capability >= 8.0, got {major}.{minor}"
        return None
    if device.type == "cpu":
        return triton_cpu_reason(interpret_requested(), mode is False,
                                 str(dtype).removeprefix("torch."))
    return f"the Triton kernels do not run on {device.type}"


def kernel_probe(module: str):
    """The probe of the Triton fast path whose kernels are in ``module``: :func:`kernel_reason`
    (on the CPU its answer needs no torch: ``attnbench list`` gives it from the environment)."""
    @answered_by("triton")
    def probe(device: torch.device, dtype: torch.dtype, shape=None) -> str | None:
        return kernel_reason(module, device, dtype, shape)

    return probe


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def as_bhnd(t: torch.Tensor) -> torch.Tensor:
    """``t`` (``[B, H, N, d]``) with unit stride over d, copied only when it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_target(device: torch.device) -> int:
    """Programs a launch should have to fill the device (4 per SM on CUDA)."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: as few as possible
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 4 * sm_count(index)
