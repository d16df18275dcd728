"""attnbench: benchmark and evaluate efficient attention inside Diffusion Transformers."""

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """attnbench, torch and Python versions: what every saved artefact records."""
    import platform

    import torch

    return {"attnbench": __version__, "torch": torch.__version__,
            "python": platform.python_version()}


def __getattr__(name: str):
    # ``attnbench.convert`` without importing torch at ``import attnbench``
    if name == "convert":
        from .models.convert import convert

        return convert
    raise AttributeError(f"module 'attnbench' has no attribute {name!r}")
