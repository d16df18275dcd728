"""attnbench: benchmark and evaluate efficient attention inside Diffusion Transformers."""

__version__ = "0.1.0"
