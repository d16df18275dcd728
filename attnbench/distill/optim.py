"""The optimiser a run trains with: its recipe's, with the flags over it.

A recipe's :class:`~attnbench.attention.recipes.Optimisation` says which
optimiser the source trained with and how (CLEAR: Prodigy, lr 1.0, weight
decay 1e-4, no EMA; SLA: AdamW 1e-5, weight decay 0.01). A
:class:`~.trainer.TrainConfig` field left ``None`` takes the recipe's value; a
flag given wins. Prodigy needs the optional ``prodigyopt`` package: where it is
not installed and no ``--optimizer`` was asked for, the run substitutes AdamW
at attnbench's own learning rate (Prodigy's lr 1.0 is a multiplier of its own
step-size estimate, far too large for AdamW) and says so in
``config.substituted`` (written to run.json and summary.json). Asking for
``--optimizer prodigy`` without the package is an error. Under ``--fsdp`` the same
holds (AdamW substituted, an explicit Prodigy refused): Prodigy's step size comes from
sums over every parameter, and each rank holds only its shard.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

import torch

from ..attention.recipes import OPTIMIZERS, OWN_OPTIMISATION, Optimisation

#: a :class:`~.trainer.TrainConfig` (the trainer imports this module, not the reverse)
TrainConfig = Any

PRODIGY_INSTALL = "pip install 'attnbench[prodigy]'"
#: why Prodigy is not used under FSDP
PRODIGY_FSDP = ("Prodigy's step-size estimate sums over every parameter, and under --fsdp "
                "each rank holds a shard (prodigyopt's own FSDP all-reduce is CUDA-only and "
                "made for FSDP1's flat parameters)")
#: the TrainConfig fields an Optimisation supplies when they are left None
FIELDS = ("lr", "weight_decay", "ema_decay", "warmup_steps", "grad_clip")
#: an optimiser's own lr and settings where a run uses another one than its recipe's
#: (Prodigy's lr 1.0 is a multiplier of its own step-size estimate, as its authors advise)
OWN_SETTINGS = {"adamw": {"lr": OWN_OPTIMISATION.lr, "settings": OWN_OPTIMISATION.settings},
                "prodigy": {"lr": 1.0, "settings": {}}}


def prodigy_available() -> bool:
    return importlib.util.find_spec("prodigyopt") is not None


def resolve(config: TrainConfig, optimisation: Optimisation) -> TrainConfig:
    """``config`` with every field left ``None`` taken from ``optimisation``, the
    optimiser substituted (and said) where Prodigy is the recipe's and not installed."""
    if config.optimizer is not None and config.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                         f"{config.optimizer!r}")
    if config.optimizer == "prodigy" and not prodigy_available():
        raise ValueError(f"--optimizer prodigy needs the prodigyopt package: "
                         f"{PRODIGY_INSTALL}")
    if config.optimizer == "prodigy" and config.fsdp:
        raise ValueError(f"--optimizer prodigy does not combine with --fsdp: {PRODIGY_FSDP}; "
                         "use --optimizer adamw, or drop --fsdp")
    substituted = config.substituted
    optimizer = config.optimizer or optimisation.optimizer
    if config.optimizer is None and optimizer == "prodigy":
        why = (f"prodigyopt is not installed ({PRODIGY_INSTALL})" if not prodigy_available()
               else PRODIGY_FSDP if config.fsdp else None)
        if why is not None:
            optimizer = "adamw"
            substituted = (f"the recipe's Prodigy (lr {optimisation.lr:g}) replaced by AdamW "
                           f"lr {OWN_OPTIMISATION.lr:g} with the recipe's other settings: {why}")
    source = optimisation
    if optimizer != optimisation.optimizer:  # another optimiser: its own lr and settings
        source = replace(optimisation, optimizer=optimizer, **OWN_SETTINGS[optimizer])
    values = {name: getattr(source, name) if getattr(config, name) is None
              else getattr(config, name) for name in FIELDS}
    settings = config.optimizer_settings
    if settings is None:
        settings = dict(source.settings)
    return replace(config, optimizer=optimizer, optimizer_settings=settings,
                   substituted=substituted, **values)


def build(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimiser of a resolved ``config`` over ``params``."""
    settings = dict(config.optimizer_settings or {})
    if config.optimizer == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params, lr=config.lr, weight_decay=config.weight_decay,
                                  **settings)
    settings.setdefault("betas", (0.9, 0.999))
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                             **settings)
