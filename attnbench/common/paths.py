"""Where attnbench's own checkout lies (its ``reports/``, ``baselines/``): no torch needed."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
