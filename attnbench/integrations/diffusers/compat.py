"""Importing diffusers: the supported versions and the CPU-torch torchvision workaround.

diffusers' ``models/transformers/__init__.py`` imports every transformer
eagerly, Cosmos included, and Cosmos imports torchvision when it is installed;
next to a CPU torch that import dies (``operator torchvision::nms does not
exist``). Importing torchvision through attnbench's narrow shim first makes
diffusers import; the six transformers used here never call torchvision.
"""

from __future__ import annotations

from types import ModuleType

from ...torchvision_compat import import_torchvision

#: diffusers releases whose processors this adapter reproduces (tested in CI)
SUPPORTED = ">=0.42.1,<0.43"


def import_diffusers() -> ModuleType:
    """``diffusers`` (after torchvision's workaround), or an ImportError saying how to get it."""
    try:
        import_torchvision()
    except ImportError:
        pass  # no torchvision: diffusers does not import it either
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(
            f"diffusers is not installed ({err}): pip install 'attnbench[diffusers]' "
            f"(diffusers{SUPPORTED})"
        ) from None
    return diffusers
