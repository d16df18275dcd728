"""Noise schedules and timestep respacing (the conventions of facebookresearch/DiT).

DiT trains on 1000 steps with linear betas from 1e-4 to 0.02 (the ADM/IDDPM
"linear" schedule at 1000 steps) and samples on a *respaced* subset of those
steps: 250 evenly spaced ones for its published FIDs. A respaced process keeps
the cumulative ``ᾱ`` of the steps it keeps and recomputes its betas from them,
so the marginals ``q(x_t | x_0)`` of the kept steps are unchanged; the model is
still called with the original timestep indices.
"""

from __future__ import annotations

import math

import numpy as np


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
    """DiT's schedule: ``linspace(beta_start, beta_end, num_steps)`` in float64.

    ``beta_start``/``beta_end`` are those of 1000 steps and are rescaled by
    ``1000 / num_steps`` for other lengths (IDDPM's ``get_named_beta_schedule``),
    so a 4000-step schedule is the same process, finer.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(
            f"linear betas need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}"
        )
    scale = 1000 / num_steps
    betas = np.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=np.float64)
    if betas[-1] >= 1:
        raise ValueError(f"{num_steps} steps is too few for a linear schedule (beta reaches 1)")
    return betas


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM's cosine schedule (not DiT's; offered for completeness)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
         for i in range(num_steps)],
        dtype=np.float64,
    )


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def space_timesteps(num_steps: int, spacing: int | str) -> list[int]:
    """The original timesteps a respaced process keeps, ascending.

    ``spacing`` is DiT's ``timestep_respacing``: an integer ``N`` (or ``"N"``)
    keeps ``N`` steps evenly spread over ``[0, num_steps − 1]`` with both ends
    included (rounded, as IDDPM's ``space_timesteps`` does for one section);
    ``"ddimN"`` keeps ``range(0, num_steps, stride)`` with the integer stride that
    gives exactly ``N`` steps (DDIM's striding); comma-separated counts
    (``"10,15,20"``) split the steps into equal sections with that many each.
    """
    if isinstance(spacing, str):
        text = spacing.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {spacing!r}: expected 'ddimN'") from None
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == desired:
                    return list(range(0, num_steps, stride))
            raise ValueError(
                f"cannot take exactly {desired} DDIM steps out of {num_steps} with an "
                "integer stride; use an integer respacing instead"
            )
        try:
            counts = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"bad respacing {spacing!r}: expected N, 'ddimN' or 'N1,N2,...'"
            ) from None
    else:
        counts = [spacing]
    if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0
                         for c in counts):
        raise ValueError(f"respacing counts must be positive integers, got {spacing!r}")
    size_per, extra = divmod(num_steps, len(counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps out of a section of {size} steps "
                             f"({num_steps} steps in all)")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))
