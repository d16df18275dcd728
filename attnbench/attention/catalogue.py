"""Writes the built-in methods' catalogue, what ``attnbench list`` reads without torch.

``python -m attnbench.attention.catalogue`` regenerates
:data:`attnbench.common.catalogue.CATALOGUE` from the live registry: run it after
changing a built-in method's description (summary, options, recipes, notes) or a fast
path's capabilities, and commit the file; a test fails until it matches.
"""

from __future__ import annotations

import json
from typing import Any

from ..common.catalogue import CATALOGUE
from . import BUILTINS
from .registry import get


def build() -> dict[str, Any]:
    """The catalogue of :data:`BUILTINS`, in their order, as :func:`text` writes it."""
    methods = []
    for name in BUILTINS:
        backend = get(name)
        methods.append({
            "describe": backend.describe(),
            "kernel_only": backend.kernel_only(),
            "paths": [{"name": p.name, "facts": p.facts.to_dict()} for p in backend.fast_paths],
        })
    return {"methods": methods}


def text() -> str:
    """The catalogue file's content (``describe()``'s JSON, as ``list --json`` writes it)."""
    return json.dumps(build(), indent=1, ensure_ascii=False, default=str) + "\n"


def main() -> None:
    CATALOGUE.write_text(text(), encoding="utf-8")
    print(f"wrote {CATALOGUE}")


if __name__ == "__main__":  # pragma: no cover
    main()
