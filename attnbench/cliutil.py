"""What every subcommand parses the same way: options, integers, devices, dtypes.

A leaf module (it imports nothing of attnbench), so every stage's ``cli`` module and
the library functions that take a device by name share one parser of each.
Bad input raises :class:`UsageError` (a ``ValueError``) naming the flag, or
``argparse.ArgumentTypeError`` inside argparse ``type=`` converters.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

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


def int_list(text: str, flag: str) -> list[int]:
    """``"256,512"`` → ``[256, 512]``; ``flag`` names the option in the error."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got {text!r}") from None


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
