"""attnbench: benchmark and evaluate efficient attention inside Diffusion Transformers."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``attnbench.convert`` without importing torch at ``import attnbench``
    if name == "convert":
        from .models.convert import convert

        return convert
    raise AttributeError(f"module 'attnbench' has no attribute {name!r}")
