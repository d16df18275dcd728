"""attnbench: benchmark and evaluate efficient attention inside Diffusion Transformers."""

from .common.versions import __version__, versions

__all__ = ["__version__", "convert", "versions"]


def __getattr__(name: str):
    # ``attnbench.convert`` without importing torch at ``import attnbench``
    if name == "convert":
        from .models.convert import convert

        return convert
    raise AttributeError(f"module 'attnbench' has no attribute {name!r}")
