"""The one registry of attention methods.

A method is registered once -- built-ins by ``register()`` at import of their
module, third-party ones through the entry-point group ``attnbench.attention``
(an entry point names an :class:`AttentionBackend` subclass or instance) -- and
is then visible to the CLI, the converter, the benchmarks, the tests and the
reports with no other edit. A plugin that fails to load never breaks the
registry: it is listed by ``plugin_errors()`` with the reason.
"""

from __future__ import annotations

from importlib import metadata

import torch

from ..common.catalogue import ENTRY_POINT_GROUP
from ..common.names import closest
from .backend import AttentionBackend

_REGISTRY: dict[str, AttentionBackend] = {}
_PLUGIN_ERRORS: dict[str, str] = {}
_PLUGINS_LOADED = False


def register(backend: AttentionBackend | type[AttentionBackend]) -> AttentionBackend:
    """Add a method (instance or class) to the registry and return the instance.

    Usable as a class decorator. Re-registering a name replaces nothing: it is
    an error, so two plugins cannot silently shadow each other.
    """
    instance = backend() if isinstance(backend, type) else backend
    if not isinstance(instance, AttentionBackend):
        raise TypeError(f"{backend!r} is not an AttentionBackend")
    if not instance.name or not instance.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"attention backend name {instance.name!r} must be a plain identifier")
    existing = _REGISTRY.get(instance.name)
    if existing is not None and type(existing) is not type(instance):
        raise ValueError(f"attention method {instance.name!r} is already registered")
    _REGISTRY[instance.name] = instance
    return backend if isinstance(backend, type) else instance


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            instance = obj() if isinstance(obj, type) else obj
            register(instance)
            if instance.name != ep.name:
                _PLUGIN_ERRORS[ep.name] = (
                    f"entry point {ep.name!r} registered a method named {instance.name!r}"
                )
        except Exception as err:  # a broken plugin must not break attnbench
            _PLUGIN_ERRORS[ep.name] = f"{type(err).__name__}: {err} (entry point {ep.value})"


def names() -> list[str]:
    """Every registered method, built-ins first in registration order."""
    _load_plugins()
    return list(_REGISTRY)


def get(name: str) -> AttentionBackend:
    """The backend called ``name``; an unknown name raises ValueError with suggestions."""
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        hint = closest(str(name), list(_REGISTRY))
        if name in _PLUGIN_ERRORS:
            hint = f" (its plugin failed to load: {_PLUGIN_ERRORS[name]})"
        raise ValueError(f"unknown attention method {name!r}{hint}") from None


def available(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    shape: tuple[int, ...] | None = None,
) -> dict[str, str | None]:
    """``{name: None or the reason it cannot run}`` for every method."""
    return {name: get(name).available(device, dtype, shape) for name in names()}


def plugin_errors() -> dict[str, str]:
    """Entry points of the ``attnbench.attention`` group that failed to load."""
    _load_plugins()
    return dict(_PLUGIN_ERRORS)
