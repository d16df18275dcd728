"""What every subcommand parses the same way: options, integers, lists, devices, dtypes.

A leaf module (it imports nothing of attnbench), so every stage's ``cli`` module and
the library functions that take a device by name share one parser of each.
Bad input raises :class:`UsageError` (a ``ValueError``) naming the flag, what is
wrong and what it accepts, before any work starts, or ``argparse.ArgumentTypeError``
inside argparse ``type=`` converters. Lists given twice are merged, with a note:
measuring a point twice is never what was meant.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Sequence

import torch


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def parse_options(pairs: Sequence[str] | None) -> dict[str, str]:
    """``["radius=8", "topk=0.05"]`` → ``{"radius": "8", "topk": "0.05"}`` (coerced later)."""
    options: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"option {pair!r} is not KEY=VALUE (e.g. --option radius=8)")
        options[key.strip()] = value.strip()
    return options


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type=``: an integer > 0."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse ``type=``: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def require_positive_int(flag: str, value: int, *, example: str = "1") -> int:
    """``value`` (already parsed, e.g. ``type=int``) is an integer > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{flag} {value!r}: must be an integer > 0 (e.g. {example})")
    return value


def require_positive_float(flag: str, value: float, *, unit: str = "",
                           example: str = "30") -> float:
    """A finite number > 0 (``nan``, ``inf``, 0 and negatives refused)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{flag} {value!r}: must be a finite number > 0"
                         f"{' ' + unit if unit else ''} (e.g. {example})")
    return float(value)


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


def name_list(flag: str, text: str | None, *, accepted: Iterable[str] | str) -> list[str]:
    """The comma-separated names of ``text``; an empty list is refused."""
    names = [s.strip() for s in (text or "").split(",") if s.strip()]
    if not names:
        shown = accepted if isinstance(accepted, str) else ", ".join(accepted)
        raise UsageError(f"{flag} is empty: give one or more of {shown} (comma-separated)")
    return names


def choices(flag: str, text: str | None, accepted: Sequence[str]) -> list[str]:
    """Comma-separated names, each one of ``accepted``; repeats merged with a note."""
    names = name_list(flag, text, accepted=accepted)
    bad = [n for n in names if n not in accepted]
    if bad:
        raise UsageError(f"{flag} {bad[0]!r} is not one of {', '.join(accepted)}")
    return unique(flag, names)


def device(name: str | None, flag: str = "--device") -> torch.device:
    """``cpu`` / ``cuda[:N]``, checked against this machine; ``None``: cuda when visible."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag} {name!r}: unknown device (use cpu or cuda[:N])") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {name}: attnbench runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: no CUDA GPU is visible to torch {torch.__version__} "
                         "on this machine; use --device cpu")
    return dev


def dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """A floating torch dtype by name (``float32``, ``bfloat16``, ``float16``)."""
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise UsageError(f"{flag} {name!r} is not a floating dtype (float32, bfloat16, float16)")
    return found
