"""Other libraries' models with attnbench's attention methods inside.

``integrations.diffusers`` -- grid-aware attention processors for diffusers'
FLUX, SD3, PixArt, SANA, Wan and DiT transformers, the builders of those models
at their published configurations, and loading of a local diffusers folder.
Importing this package imports no third-party library; ``diffusers`` is an
optional extra (``pip install attnbench[diffusers]``).
"""
