"""Suggestions for misspelt names in error messages (imports nothing of attnbench)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence


def closest(name: str, candidates: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` or the list of valid names, for error messages."""
    matches = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    if matches:
        return "; did you mean " + " or ".join(repr(m) for m in matches) + "?"
    return f"; valid: {', '.join(candidates) or '(none)'}"
