"""What distilling a diffusers transformer holds in device memory, from parameter counts.

``distill --model-path/--model`` (:mod:`.diffusers_distill`) keeps, for the whole run:

* the teacher -- every parameter in the run's dtype (bf16 on a GPU), frozen, run
  under ``no_grad``;
* the student -- its trainable parameters in float32; its frozen ones *are* the
  teacher's tensors (:func:`~.diffusers_distill.student_of`);
* gradients -- float32, one per trainable parameter;
* the optimiser's state -- float32 tensors the size of each trainable parameter:
  AdamW 2 (``exp_avg``, ``exp_avg_sq``), Prodigy 4 (``s`` and ``p0`` besides);
* the EMA -- a float32 copy of the trainable parameters.

At the end the export copies the student once (trainable float32, frozen in the run's
dtype). Activations come on top: with ``--gradient-checkpointing`` the blocks' inputs
and one block's intermediate tensors at a time.

:func:`zoo_training_memory` counts a zoo entry's parameters on the ``meta`` device
(no memory, no weights), so the estimate of a 12B model takes seconds anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: float32 tensors of a trainable parameter's size each optimiser keeps
OPTIMIZER_STATES = {"adamw": 2, "prodigy": 4}
FLOAT32 = 4


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes held by a distillation run of ``parameters`` (of which ``trainable`` train)."""

    parameters: int
    trainable: int
    teacher_element: int
    optimizer: str

    @property
    def parts(self) -> dict[str, int]:
        """Bytes held for the whole run, by part (module docstring)."""
        t = self.trainable * FLOAT32
        return {"teacher": self.parameters * self.teacher_element, "student": t,
                "gradients": t, "optimizer": OPTIMIZER_STATES[self.optimizer] * t, "ema": t}

    @property
    def training(self) -> int:
        return sum(self.parts.values())

    @property
    def export(self) -> int:
        """The export's copy of the student (on top of everything else, at the end)."""
        frozen = self.parameters - self.trainable
        return self.trainable * FLOAT32 + frozen * self.teacher_element

    @property
    def peak(self) -> int:
        """Training + the export's copy, held together at the end (when the activations,
        not counted here, are gone)."""
        return self.training + self.export

    def describe(self) -> dict[str, Any]:
        gb = {k: round(v / 1e9, 2) for k, v in self.parts.items()}
        return {"parameters": self.parameters, "trainable": self.trainable,
                "optimizer": self.optimizer, "teacher_bytes_per_parameter": self.teacher_element,
                "gb": gb, "training_gb": round(self.training / 1e9, 2),
                "export_copy_gb": round(self.export / 1e9, 2),
                "peak_gb": round(self.peak / 1e9, 2),
                "activations": "not included (see attnbench/distill/memory.py)"}


def training_memory(teacher: nn.Module, trainable: Iterable[str], *,
                    dtype: torch.dtype = torch.bfloat16, optimizer: str = "prodigy",
                    student: nn.Module | None = None) -> TrainingMemory:
    """The estimate for ``teacher`` with the parameters named in ``trainable`` training.

    ``trainable`` names parameters of ``student`` (a swapped copy, whose method may add
    parameters) or, without it, of ``teacher``.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer {optimizer!r}: one of {', '.join(OPTIMIZER_STATES)}")
    names = set(trainable)
    params = dict((student or teacher).named_parameters())
    unknown = sorted(names - set(params))
    if unknown:
        raise ValueError(f"trainable parameter {unknown[0]!r} is not in the model")
    return TrainingMemory(
        parameters=sum(p.numel() for p in teacher.parameters()),
        trainable=sum(params[n].numel() for n in names),
        teacher_element=torch.empty(0, dtype=dtype).element_size(), optimizer=optimizer)


def zoo_training_memory(name: str, trainable: str = "attention", *,
                        dtype: torch.dtype = torch.bfloat16,
                        optimizer: str = "prodigy") -> TrainingMemory:
    """:func:`training_memory` of zoo entry ``name``, its parameters counted on ``meta``."""
    from ..integrations.diffusers.build import build_transformer
    from ..integrations.diffusers.families import get_family
    from ..models.diffusers_configs import get_diffusers_config
    from .diffusers_objective import trainable_names

    entry = get_diffusers_config(name)
    model = build_transformer(entry, device="meta", dtype=dtype)
    names = trainable_names(model, get_family(entry.family), trainable)
    return training_memory(model, names, dtype=dtype, optimizer=optimizer)
