"""Import the real torchvision where its compiled ops cannot load (the CPU-torch workaround).

torch-fidelity and clean-fid import torchvision at import time (transforms, models,
datasets: all pure Python for what they use); diffusers does too. The torchvision
wheel that matches this project's CPU torch (``torchvision==0.28.*`` for
``torch==2.13.0+cpu``) is a CUDA build: its ``_C.so`` links CUDA libraries that a
CPU torch does not ship, so loading it fails. torchvision is written to survive
that -- ``torchvision.extension._has_ops()`` becomes ``False`` and every op that
needs the compiled code (``nms``, ``roi_align``, image decoding, ...) raises
torchvision's own "Couldn't load custom C++ ops" error when called -- except for
one spot: ``torchvision/_meta_registrations.py`` registers fake (meta) kernels for
``torchvision::nms`` and ``torchvision::qnms`` *unconditionally*, and
``torch.library.register_fake`` refuses an operator that was never defined::

    RuntimeError: operator torchvision::nms does not exist

so ``import torchvision`` dies before any of it can be used (upstream: the
unguarded registrations; pytorch/vision PR #9086 proposed guarding them).

The workaround, and why it is the narrowest one
-----------------------------------------------
:func:`import_torchvision` first imports torchvision as it is. Only when that
fails with exactly this error (so never on a machine where the compiled ops load,
e.g. a CUDA torch with its matching torchvision), it

1. reads the names of the operators that ``_meta_registrations.py`` registers
   unguarded (``nms``, ``qnms`` in 0.2x) from the installed file itself,
2. *defines* those operator schemas -- ``torchvision::nms(Tensor dets, Tensor
   scores, float iou_threshold) -> Tensor``, the schema torchvision's C++ declares
   -- in a ``torch.library`` fragment kept alive by this module, with **no
   kernel**, so the fake registration has something to attach to, and
3. drops the half-imported ``torchvision`` modules and imports it again.

Nothing of torchvision is replaced or patched: its files, its Python code paths and
its own degraded mode are used as shipped. Calling ``torchvision.ops.nms`` still
raises torchvision's error, because the placeholder has no kernel. The
alternatives were wider: a fake ``torchvision`` package re-implementing what
torch-fidelity and clean-fid use (transforms, models, datasets) would test a copy
instead of the libraries; the latest torchvision wheel needs torch>=2.14 and pip
would replace the CPU torch with several GB of CUDA torch; no CPU torchvision
wheel is reachable from this machine (PyPI only).

Installing: ``./dev`` installs ``torchvision==0.<torch minor + 15>.*`` next to
the CPU torch (the matching release, so pip keeps torch as it is). Nothing here
downloads anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

#: the error of an unguarded fake registration of an op whose C++ library did not load
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")
#: ``@torch.library.register_fake("torchvision::NAME")`` in torchvision's source
_FAKE_REGISTRATION = re.compile(r"""register_fake\(\s*["']torchvision::(\w+)["']""")
#: the C++ schema of the NMS-like ops torchvision registers fake kernels for unguarded
_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"

_placeholder_library: torch.library.Library | None = None
_placeholder_ops: list[str] = []
_import_error: str | None = None


def _purge() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def _unguarded_fake_ops(package_dir: Path) -> list[str]:
    """Names of the ops whose fake kernels torchvision registers without checking its _C."""
    source = package_dir / "_meta_registrations.py"
    try:
        names = _FAKE_REGISTRATION.findall(source.read_text())
    except OSError:
        names = []
    return list(dict.fromkeys(names)) or ["nms", "qnms"]


def _define_placeholders(names: list[str]) -> None:
    global _placeholder_library
    if _placeholder_library is None:
        # a FRAGMENT may add definitions to a namespace another library also uses
        _placeholder_library = torch.library.Library("torchvision", "FRAGMENT")
    for name in names:
        if name in _placeholder_ops:
            continue
        _placeholder_library.define(name + _NMS_SCHEMA)
        _placeholder_ops.append(name)


def import_torchvision() -> ModuleType:
    """``torchvision``, imported as shipped, with the workaround of the module docstring.

    Raises ``ImportError`` with the install command when torchvision is not
    installed, and re-raises any other import failure unchanged.
    """
    global _import_error
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "__version__"):
        return sys.modules["torchvision"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "torchvision is not installed (torch-fidelity and clean-fid need it): install the "
            "release matching your torch without replacing torch, e.g. for torch 2.13 "
            "`pip install 'torchvision==0.28.*'` (./dev does this)"
        )
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        match = _MISSING_OP.search(str(err))
        if match is None:
            raise
        _import_error = str(err)
    _purge()
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    names = _unguarded_fake_ops(package_dir)
    if match.group(1) not in names:
        names.append(match.group(1))
    _define_placeholders(names)
    module = importlib.import_module("torchvision")
    if module.extension._has_ops():  # pragma: no cover - the ops cannot have loaded now
        raise RuntimeError("torchvision's compiled ops loaded after placeholders were defined")
    return module


def torchvision_status() -> dict[str, Any]:
    """How torchvision was imported: version, compiled ops, the workaround if it was needed."""
    tv = import_torchvision()
    return {
        "torchvision": getattr(tv, "__version__", "?"),
        "compiled_ops": bool(tv.extension._has_ops()),
        "placeholder_ops": [f"torchvision::{n}" for n in _placeholder_ops],
        "reason": _import_error,
    }


def import_torch_fidelity() -> ModuleType:
    """``torch_fidelity`` (after :func:`import_torchvision`), or an ImportError saying how."""
    import_torchvision()
    try:
        import torch_fidelity
    except ImportError as err:
        raise ImportError(f"torch-fidelity is not installed ({err}): pip install "
                          "torch-fidelity (a dependency of attnbench)") from None
    return torch_fidelity


def import_cleanfid() -> ModuleType:
    """``cleanfid`` with its ``fid`` module (after :func:`import_torchvision`)."""
    import_torchvision()
    try:
        import cleanfid
        import cleanfid.fid
    except ImportError as err:
        raise ImportError(f"clean-fid is not installed ({err}): pip install clean-fid "
                          "(a dependency of attnbench)") from None
    return cleanfid
