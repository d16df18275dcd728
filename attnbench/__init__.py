"""attnbench: benchmark and evaluate efficient attention inside Diffusion Transformers."""

__all__ = ["__version__", "convert", "versions"]


def __getattr__(name: str):
    # lazily: ``import attnbench`` loads no submodule (``attnbench.results`` stays a leaf)
    # and no torch (``attnbench.convert``)
    if name in ("__version__", "versions"):
        from .common import versions

        return getattr(versions, name)
    if name == "convert":
        from .models.convert import convert

        return convert
    raise AttributeError(f"module 'attnbench' has no attribute {name!r}")
