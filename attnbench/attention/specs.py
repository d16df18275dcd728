"""Method specs: ``softmax,lit,clear:radius=16`` parsed and checked against the registry.

The one spec language of every command that takes ``--methods`` / ``--method-options``
(``run``, ``fidelity``, the floors tool), and how a results row states the options it
ran with (:func:`stated_options`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..results import canonical_options, label
from .registry import get


@dataclass(frozen=True)
class MethodSpec:
    """A method and the options it is benchmarked with (``clear:radius=16``)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return label(self.name, canonical_options(self.options))


def parse_methods(
    spec: str | Iterable[str], method_options: Iterable[str] = ()
) -> list[MethodSpec]:
    """``"softmax,lit,clear:radius=16"`` and ``["clear.radius=8"]`` → validated specs.

    ``method_options`` (``METHOD.KEY=VALUE``) apply to every spec of that method
    that does not set the key itself. Unknown methods or options raise ValueError.
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    defaults: dict[str, dict[str, str]] = {}
    for pair in method_options:
        key, sep, value = pair.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot or not method or not option:
            raise ValueError(
                f"method option {pair!r} is not METHOD.KEY=VALUE (e.g. clear.radius=8)"
            )
        method, option = method.strip(), option.strip()
        if option in defaults.get(method, {}):
            raise ValueError(f"--method-options gives {method}.{option} twice: give it once")
        defaults.setdefault(method, {})[option] = value.strip()
    for method, options in defaults.items():
        if method not in (i.split(":")[0] for i in items):
            get(method)  # an unknown name raises with suggestions
            raise ValueError(f"--method-options names {method!r}, which is not in --methods")
        get(method).resolve(options, mixer=True)  # checked even where overridden
    specs = []
    for item in items:
        name, *pairs = item.split(":")
        backend = get(name)
        given = dict(defaults.get(name, {}))
        pairs_seen: set[str] = set()
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"{item!r}: {pair!r} is not KEY=VALUE (e.g. clear:radius=16)")
            if key.strip() in pairs_seen:
                raise ValueError(f"{item!r} gives {key.strip()} twice: give it once")
            pairs_seen.add(key.strip())
            given[key.strip()] = value.strip()
        resolved = backend.resolve(given, mixer=True)
        explicit = {k: resolved[k] for k in given}
        specs.append(MethodSpec(name, explicit))
    if not specs:
        raise ValueError("no methods to run: --methods is empty")
    return specs



def stated_options(method: str, options: str, effective: str) -> str:
    """A row's options JSON as :meth:`AttentionBackend.stated_options` says them: a row
    measured before a default changed keeps saying what it ran (its label, and its key
    when a run is resumed). The row's own text where the method or a record is unknown."""
    try:
        backend = get(method)
        given, ran = json.loads(options or "{}"), json.loads(effective or "{}")
    except (ValueError, KeyError, TypeError):
        return options
    if not isinstance(given, dict) or not isinstance(ran, dict):
        return options
    stated = backend.stated_options(given, ran)
    return canonical_options(stated) if stated != given else options
