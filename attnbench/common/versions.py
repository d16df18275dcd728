"""The package version and the versions every saved artefact records."""

from __future__ import annotations

import platform

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """attnbench, torch and Python versions: what every saved artefact records."""
    import torch  # lazy: ``import attnbench`` reads __version__ here and stays free of torch

    return {"attnbench": __version__, "torch": torch.__version__,
            "python": platform.python_version()}
