"""The attention registry: every method behind one interface (``backend.py``).

>>> from attnbench import attention
>>> attention.names()[:2]
['softmax', 'flash']
>>> backend = attention.get("lit")
>>> out = backend.attend(q, k, v, grid=(16, 16))          # doctest: +SKIP
>>> layer = backend.mixer(dim=384, num_heads=2)           # doctest: +SKIP
"""

import importlib

from .backend import AttentionBackend
from .costs import Flops, Memory, dense_flops
from .layout import Layout
from .module import AttentionCore, AttentionMixer
from .options import Option
from .paths import FastPath, Selection
from .registry import ENTRY_POINT_GROUP, available, get, names, plugin_errors, register

#: the built-in methods, registered in this order (the order of every listing)
BUILTINS = ("softmax", "flash", "xformers", "lit", "clear", "sla")
for _module in BUILTINS:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "AttentionBackend",
    "AttentionCore",
    "AttentionMixer",
    "FastPath",
    "Flops",
    "Layout",
    "Memory",
    "Option",
    "Selection",
    "available",
    "dense_flops",
    "get",
    "names",
    "plugin_errors",
    "register",
]
