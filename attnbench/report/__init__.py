"""Reports people read: markdown + self-contained HTML with plots, published baselines
beside measured numbers, and run-to-run comparison (``report`` and ``compare`` stages).

``write_report(["reports/runs/x"])`` writes ``report.md``, ``report.html`` and
``plots/*.png`` into the run directory; :mod:`.compare` diffs two runs. How quality
rows are recognised is documented in :mod:`.tables`.
"""

from __future__ import annotations


def write_report(*args, **kwargs):
    """See :func:`attnbench.report.build.write_report` (imported lazily: matplotlib)."""
    from .build import write_report as _write_report

    return _write_report(*args, **kwargs)


__all__ = ["write_report"]
