"""attnbench's attention methods inside diffusers transformers (an optional extra).

>>> from attnbench.integrations.diffusers import build_transformer, model_shapes, make_inputs
>>> model = build_transformer("flux-tiny")                        # random weights
>>> shapes = model_shapes("flux-tiny", (48, 80))                  # 7 text + 3x5 tokens
>>> handle = swap_attention(model, "clear", radius=8)             # doctest: +SKIP
>>> out = model(**make_inputs("flux-tiny", shapes))[0]            # doctest: +SKIP
>>> handle.restore()                                              # doctest: +SKIP

``swap.py`` swap_attention and its handle, ``processors.py`` the processors
that reproduce each stock one around an ``AttentionCore``, ``geometry.py`` the
token geometry read from the model's inputs, ``build.py`` zoo entries as
models, true shapes and inputs, ``flops.py`` the analytic FLOPs of a step,
``loading.py`` a local diffusers folder (``--model-path``), ``workload.py``
the one call the benchmarks make. Importing it imports diffusers (with the
torchvision workaround of ``compat.py``).
"""

from .build import ModelShapes, build_transformer, make_inputs, model_shapes
from .compat import SUPPORTED, import_diffusers
from .families import FAMILIES, Family, family_of, flux_ids, get_family
from .flops import StepFlops, step_flops
from .geometry import Geometry
from .loading import load_transformer, read_transformer_config, transformer_folder
from .processors import AttnbenchProcessor
from .swap import SwapHandle, swap_attention
from .workload import DiffusersWorkload, diffusers_workload

__all__ = [
    "FAMILIES",
    "SUPPORTED",
    "AttnbenchProcessor",
    "DiffusersWorkload",
    "Family",
    "Geometry",
    "ModelShapes",
    "StepFlops",
    "SwapHandle",
    "build_transformer",
    "diffusers_workload",
    "family_of",
    "flux_ids",
    "get_family",
    "import_diffusers",
    "load_transformer",
    "make_inputs",
    "model_shapes",
    "read_transformer_config",
    "step_flops",
    "swap_attention",
    "transformer_folder",
]
