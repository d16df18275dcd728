"""Prompt files: one prompt a line, UTF-8 text; the default set ships with attnbench.

Blank lines and lines starting with ``#`` are skipped. A file that is missing,
not UTF-8 text (a binary, NUL bytes) or holds no prompt is refused with one
line naming the flag (``--prompts``).
"""

from __future__ import annotations

from pathlib import Path

#: the shipped prompt set (16 everyday scenes: objects, counts, colours, styles)
DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "assets" / "prompts" / "default.txt"


def read_prompts(path: str | Path | None = None, flag: str = "--prompts") -> list[str]:
    """The prompts of ``path`` (``None``: the shipped set)."""
    path = Path(path).expanduser() if path is not None else DEFAULT_PROMPTS
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file (one prompt per line, UTF-8 text)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path}: not UTF-8 text (give a text file, one prompt per "
                         "line)") from None
    if "\x00" in text:
        raise ValueError(f"{flag} {path}: holds NUL bytes, not text (give a text file, one "
                         "prompt per line)")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{flag} {path}: no prompts (one prompt per line; blank lines and "
                         "# comments are skipped)")
    return prompts
