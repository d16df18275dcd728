"""Command-line values checked before any work starts.

Each helper names the flag, what is wrong and what it accepts, and raises
:class:`FlagError` (a ``ValueError``: one line on stderr, exit code 2). Lists
given twice are merged, with a note: measuring a point twice is never what was
meant. A leaf: it imports nothing of attnbench.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence


class FlagError(ValueError):
    """A flag's value that cannot be used: one line, exit code 2."""


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def unique(flag: str, items: Sequence, *, key: Callable | None = None,
           note: Callable[[str], None] | None = None) -> list:
    """``items`` without repeats (first occurrence kept, compared by ``key``), with a note."""
    key = key or (lambda item: item)
    seen: dict = {}
    for item in items:
        seen.setdefault(key(item), []).append(item)
    if any(len(group) > 1 for group in seen.values()):
        twice = [str(k) for k, group in seen.items() if len(group) > 1]
        (note or _note)(f"note: {flag} names {', '.join(twice)} more than once: measured once")
    return [group[0] for group in seen.values()]


def items(flag: str, text: str | None, *, accepted: Iterable[str] | str) -> list[str]:
    """The comma-separated names of ``text``; an empty list is refused."""
    names = [s.strip() for s in (text or "").split(",") if s.strip()]
    if not names:
        shown = accepted if isinstance(accepted, str) else ", ".join(accepted)
        raise FlagError(f"{flag} is empty: give one or more of {shown} (comma-separated)")
    return names


def choices(flag: str, text: str | None, accepted: Sequence[str]) -> list[str]:
    """Comma-separated names, each one of ``accepted``; repeats merged with a note."""
    names = items(flag, text, accepted=accepted)
    bad = [n for n in names if n not in accepted]
    if bad:
        raise FlagError(f"{flag} {bad[0]!r} is not one of {', '.join(accepted)}")
    return unique(flag, names)


def positive_ints(flag: str, text: str, *, example: str = "256,512,1024") -> list[int]:
    """Comma-separated integers > 0; repeats merged with a note."""
    parts = items(flag, text, accepted=f"integers > 0, e.g. {example}")
    values = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise FlagError(f"{flag} takes comma-separated integers > 0 (e.g. {example}), "
                            f"got {part!r}") from None
        if value <= 0:
            raise FlagError(f"{flag} {value}: must be > 0 (e.g. {example})")
        values.append(value)
    return unique(flag, values)


def positive_int(flag: str, value: int, *, example: str = "1") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FlagError(f"{flag} {value!r}: must be an integer > 0 (e.g. {example})")
    return value


def positive_float(flag: str, value: float, *, unit: str = "", example: str = "30") -> float:
    """A finite number > 0 (``nan``, ``inf``, 0 and negatives refused)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FlagError(f"{flag} {value!r}: must be a finite number > 0{' ' + unit if unit else ''}"
                        f" (e.g. {example})")
    return float(value)
