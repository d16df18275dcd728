"""A method's options: what each one is, its default and source, and how a value is checked.

An :class:`Option` turns a value (possibly a CLI string) into the option's type,
refuses what is not finite or beyond any token count (:data:`MAX_OPTION`) and runs
the option's own check (:func:`positive`, :func:`non_negative`,
:func:`unit_fraction`, or the method's); :func:`resolve_options` merges a call's
options with the defaults, one clear ``ValueError`` for an unknown or invalid one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..common.names import closest

#: the largest option value: a radius, block, kernel or shift beyond any token count
#: (larger ones overflow: a radius of 1e300 squared is inf)
MAX_OPTION = 2**31 - 1


@dataclass(frozen=True)
class Option:
    """One tunable of a method: name, default, type and a validity check.

    ``check`` returns ``None`` for a valid value or a sentence saying what is
    wrong with it; ``choices`` restricts string options.
    """

    name: str
    default: Any
    help: str
    type: type = float
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    #: a parameter of the mixer (e.g. LiT's conv kernel), not of ``attend``
    mixer_only: bool = False
    #: where the default comes from (the official code's file, the paper's setting, or
    #: "attnbench's choice" with the reason); ``attnbench list`` shows it
    source: str = ""
    #: earlier spellings of a choice, accepted as the choice they became
    aliases: dict[str, Any] = field(default_factory=dict)

    def coerce(self, value: Any) -> Any:
        """Convert ``value`` (possibly a CLI string) to the option's type: finite, and of a
        magnitude (<= :data:`MAX_OPTION`) no radius, block or shift meaningfully exceeds."""
        if value is None:
            if self.default is not None:
                raise ValueError(f"option {self.name!r} is None: give a {self.type.__name__}, "
                                 f"or leave it out for the default {self.default!r}")
            return None
        if isinstance(value, str) and value in self.aliases:
            return self.aliases[value]
        if self.type is bool and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(f"option {self.name!r} takes true/false, got {value!r}")
        if self.type in (int, float) and isinstance(value, bool):
            raise ValueError(f"option {self.name!r} takes a number, got {value!r}")
        if self.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"option {self.name!r} takes an integer, got {value!r}")
        try:
            coerced = self.type(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(
                f"option {self.name!r} takes a {self.type.__name__}, got {value!r}"
            ) from None
        return coerced

    def validate(self, value: Any) -> Any:
        value = self.coerce(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(
                f"option {self.name!r} must be one of {list(self.choices)}, got {value!r}"
            )
        if self.check is not None and value is not None:
            reason = self.check(value)
            if reason:
                raise ValueError(f"option {self.name!r}={value!r}: {reason}")
        # after the option's own check, which words its range best
        if self.type is float and value is not None and not math.isfinite(value):
            raise ValueError(f"option {self.name!r}={value!r}: must be a finite number")
        if self.type in (int, float) and value is not None and abs(value) > MAX_OPTION:
            raise ValueError(f"option {self.name!r}={value!r}: out of range (|value| <= "
                             f"{MAX_OPTION}, more than any token count)")
        return value


def positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def unit_fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must lie in (0, 1] (a fraction, e.g. 0.05 for 5%)"


def resolve_options(method: str, declared: tuple[Option, ...],
                    options: Mapping[str, Any] | None, *, mixer: bool = False,
                    retired: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``options`` merged with the defaults of ``declared``, each validated.

    ``mixer=False`` resolves the options of ``attend`` (mixer-only options are
    refused with a pointer to the mixer); ``mixer=True`` those of ``mixer`` (all).
    An option of ``retired`` (``{name: what replaced it}``) is refused with its
    replacement named.
    """
    given = dict(options or {})
    for key in given:
        if retired and key in retired:
            raise ValueError(f"{method}: option {key!r} is no longer taken: {retired[key]}")
    known = {o.name: o for o in declared if mixer or not o.mixer_only}
    unknown = [k for k in given if k not in known]
    if unknown:
        key = unknown[0]
        if any(o.name == key for o in declared):
            raise ValueError(
                f"{method}: option {key!r} belongs to the mixer (the nn.Module), "
                "not to attend(); pass it to backend.mixer(...)"
            )
        raise ValueError(f"{method}: unknown option {key!r}" + closest(key, list(known)))
    resolved = {name: o.default for name, o in known.items()}
    for key, value in given.items():
        resolved[key] = known[key].validate(value)
    return resolved
