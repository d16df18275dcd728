"""What every subcommand parses the same way: options, numbers, names, lists, devices, dtypes.

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def parse_options(pairs: Sequence[str] | None, *, flag: str = "--option",
                  example: str = "radius=8") -> dict[str, str]:
    """``["radius=8", "topk=0.05"]`` → ``{"radius": "8", "topk": "0.05"}`` (coerced later).

    A key given twice is refused (which one was meant is not knowable).
    """
    options: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UsageError(f"{flag} {pair!r} is not KEY=VALUE (e.g. {flag} {example})")
        if key in options:
            raise UsageError(f"{flag} gives {key} twice ({key}={options[key]}, {key}={value}): "
                             "give it once")
        options[key] = value
    return options


def check_number(flag: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False, example: str | None = None
                 ) -> float | int:
    """``value`` is a finite number (an integer if ``integer``) within the bounds.

    ``low``/``high`` are inclusive (``low_open``: ``low`` itself refused); ``nan``
    and ``inf`` are always refused: a threshold or a scale that silently turns
    every comparison false is worse than an error.
    """
    what = "an integer" if integer else "a finite number"
    if low is not None:
        what += f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        what += f"{' and' if low is not None else ''} <= {high:g}"
    hint = f" (e.g. {example})" if example is not None else ""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and (not integer or float(value).is_integer()))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise UsageError(f"{flag} {value!r}: must be {what}{hint}")
    return int(value) if integer else float(value)


def _argparse_type(flag: str, convert: Callable[[str], float], name: str,
                   **bounds) -> Callable[[str], float]:
    """An argparse ``type=`` converting with ``convert``, then :func:`check_number`."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = text
        try:
            return check_number(flag, value, **bounds)
        except UsageError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{flag} ")) from None
    parse.__name__ = name  # argparse names the type in its messages
    return parse


def number(flag: str, **bounds) -> Callable[[str], float]:
    """An argparse ``type=``: a finite float within ``bounds`` (those of :func:`check_number`)."""
    return _argparse_type(flag, float, "number", **bounds)


def integer(flag: str, **bounds) -> Callable[[str], int]:
    """An argparse ``type=``: an integer within ``bounds`` (those of :func:`check_number`)."""
    return _argparse_type(flag, int, "integer", integer=True, **bounds)


def non_empty(flag: str, what: str) -> Callable[[str], str]:
    """An argparse ``type=``: a string that is not empty (an empty one is not "not given")."""
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"is empty: give {what}, or leave the flag out")
        return text
    parse.__name__ = "non_empty"
    return parse


def requires(needed: str, present: bool, given: dict[str, object]) -> None:
    """Refuse the flags of ``given`` (flag → value, None = not given) without ``needed``:
    a flag that would be silently ignored is an error, not a no-op."""
    named = [flag for flag, value in given.items() if value is not None and value is not False]
    if named and not present:
        raise UsageError(f"{', '.join(named)} only {'applies' if len(named) == 1 else 'apply'} "
                         f"with {needed}: add {needed}, or leave {' and '.join(named)} out")


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
    parts = [s.strip() for s in (text or "").split(",")]
    names = [s for s in parts if s]
    if not names:
        shown = accepted if isinstance(accepted, str) else ", ".join(accepted)
        raise UsageError(f"{flag} is empty: give one or more of {shown} (comma-separated)")
    if len(names) != len(parts):
        raise UsageError(f"{flag} {text!r} has an empty item: remove the extra comma")
    return names


def choices(flag: str, text: str | None, accepted: Sequence[str]) -> list[str]:
    """Comma-separated names, each one of ``accepted``; repeats merged with a note."""
    names = name_list(flag, text, accepted=accepted)
    bad = [n for n in names if n not in accepted]
    if bad:
        raise UsageError(f"{flag} {bad[0]!r} is not one of {', '.join(accepted)}")
    return unique(flag, names)


def device(name: str | torch.device | None, flag: str = "--device") -> torch.device:
    """``cpu`` / ``cuda[:N]``, checked against this machine; ``None``: cuda when visible."""
    import torch  # lazy: every command's parser imports cliutil, ``--help`` needs no torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"{flag} {name!r}: unknown device (use cpu or cuda[:N])") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {name}: attnbench runs on cpu or cuda")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise UsageError(f"{flag} {name}: the CPU has no index; use --device cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: no CUDA GPU is visible to torch {torch.__version__} "
                         "on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA "
                         f"GPU(s) (cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    return dev


#: the dtypes attnbench measures in (every kernel and reference is tested in these);
#: float8 and float64 are not compute dtypes of any method here
DTYPES = ("float32", "bfloat16", "float16")


def dtype_name(name: str, flag: str = "--dtype") -> str:
    """``name`` checked to be one of :data:`DTYPES` (no torch needed)."""
    if name not in DTYPES:
        raise UsageError(f"{flag} {name!r}: choose one of {', '.join(DTYPES)}")
    return name


def dtype(name: str | torch.dtype, flag: str = "--dtype") -> torch.dtype:
    """One of :data:`DTYPES` by name (``float32``, ``bfloat16``, ``float16``)."""
    import torch  # lazy: every command's parser imports cliutil, ``--help`` needs no torch

    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    return getattr(torch, dtype_name(name, flag))
