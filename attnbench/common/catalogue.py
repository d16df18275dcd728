"""The built-in attention methods as ``attnbench list`` shows them, without importing torch.

``catalogue.json`` beside this file holds, for every built-in method, what its
``describe()`` returns and each fast path's :class:`~.capabilities.PathFacts`; it is
generated from the live registry by ``python -m attnbench.attention.catalogue`` and a
test holds it equal to the registry. :func:`rows` answers ``list`` from it on the CPU:
the data's reasons and the probes' torch-free twins, in a fresh process exactly what the
registry says. It answers ``None`` -- ask the registry, which imports torch and every
method -- wherever only the registry can: another device, a third-party method
installed (entry-point group :data:`ENTRY_POINT_GROUP`), or a probe with no twin here.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from .capabilities import NeedsTorch, PathFacts, first_obstacle

#: the entry-point group third-party attention methods register under
ENTRY_POINT_GROUP = "attnbench.attention"
#: the generated catalogue (``python -m attnbench.attention.catalogue`` writes it)
CATALOGUE = Path(__file__).with_name("catalogue.json")
#: the command that regenerates :data:`CATALOGUE`
REGENERATE = "python -m attnbench.attention.catalogue"


@functools.cache
def load() -> dict[str, Any]:
    """The catalogue as written: ``{"methods": [{"describe", "kernel_only", "paths"}]}``."""
    return json.loads(CATALOGUE.read_text(encoding="utf-8"))


def method_row(info: dict[str, Any], available: str | None,
               implementations: dict[str, str | None]) -> dict[str, Any]:
    """A method's row of ``attnbench list``: its ``describe()`` with whether it can run
    and each implementation's reason (``None``: it can) in place of their names."""
    return {**info, "available": available, "implementations": implementations}


def rows(device: str, dtype: str) -> list[dict[str, Any]] | None:
    """Every built-in method's row of ``list`` on ``device`` in ``dtype`` (a name of
    ``cliutil.DTYPES``), or ``None`` where only the live registry can answer."""
    if device != "cpu" or metadata.entry_points(group=ENTRY_POINT_GROUP):
        return None
    try:
        methods = load()["methods"]
        out = []
        for method in methods:
            fast = {p["name"]: PathFacts.from_dict(p["facts"]).torch_free_reasons(device, dtype)
                    for p in method["paths"]}
            reasons = {} if method["kernel_only"] else {"reference": None}
            reasons.update({name: "; ".join(r) if r else None for name, r in fast.items()})
            available = first_obstacle(fast) if method["kernel_only"] else None
            out.append(method_row(copy.deepcopy(method["describe"]), available, reasons))
    except (NeedsTorch, FileNotFoundError):
        return None
    return out
