"""Zero-shot of a diffusers transformer (``fidelity --model NAME / --model-path DIR``).

The measurement of :mod:`.zero_shot` on a diffusers model. The model runs with
attnbench's softmax processors (they give the stock output: tests/integrations),
whose cores receive the heads after the model's QK norms and RoPE together with
the :class:`~attnbench.attention.Layout` of the tokens (FLUX's text first, SD3's
text last, Wan's frames); a forward pre-hook on each core hands q, k, v and the
layout to :func:`.zero_shot.analyse_layer` -- the same rows as for attnbench's
DiT, text tokens included (locality over image pairs, ``text_mass`` beside it).

Students: each variant swapped into a copy of the model with its conversion recipe
(:func:`~attnbench.integrations.diffusers.swap_attention`: CLEAR and SLA inherit the
projections and are measured per layer as the student's core; LiT re-initialises
them, so its operator runs on the model's q, k, v). End to end: the relative error
of each student's prediction against the model's on the same inputs.

Inputs: the step inputs of :func:`~attnbench.integrations.diffusers.make_inputs` at
the model's shapes (random latents and text embeddings, seeded), any of which a
file overrides by name (``hidden_states``: the clean latents). Each timestep
``t ∈ [0, 999]`` noises the latents as the family was trained: flow matching
(FLUX, SD3, Wan: ``x_t = (1 − σ)·x0 + σ·ε``, ``σ = t/1000``, the timestep
passed in the pipeline's unit) or DDPM (PixArt, DiT: attnbench's linear-β
schedule). attnbench has no sampler for these models: ``psnr_trajectory`` is NaN.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from .. import attention
from ..diffusion import Diffusion
from .zero_shot import (
    FidelityConfig,
    FidelityResult,
    Variant,
    _progress,
    analyse_layer,
    check_timesteps,
    end_to_end_row,
    summarise,
    with_softmax,
)

#: families whose own attention is not softmax (SANA: ReLU linear attention)
NOT_SOFTMAX = {"sana": "ReLU linear attention"}
NO_TRAJECTORY = "not measured: attnbench has no sampler for diffusers models"


def check_softmax_model(entry, name: str) -> None:
    """``ValueError`` for a model whose own attention is not softmax: there is no softmax
    teacher to measure the methods against."""
    if entry.family in NOT_SOFTMAX:
        raise ValueError(f"{name}: its attention is {NOT_SOFTMAX[entry.family]}, not softmax; "
                         "zero-shot measures methods against a softmax model")


@dataclass
class DiffusersInputs:
    """Clean step inputs of a diffusers model and where they came from."""

    inputs: dict[str, Any]
    source: str

    def to(self, device, dtype: torch.dtype) -> DiffusersInputs:
        """The inputs on ``device``, floating-point tensors in ``dtype`` (the model's)."""
        moved = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                 if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return DiffusersInputs(moved, self.source)


def step_inputs(entry, shapes, *, num: int, seed: int, device, dtype,
                given: dict[str, torch.Tensor] | None = None,
                source: str = "") -> DiffusersInputs:
    """The step inputs of ``num`` samples: :func:`make_inputs` (seeded), with the tensors
    of ``given`` in place of those of the same name (checked: the same shape)."""
    from ..integrations.diffusers import make_inputs  # lazy: diffusers is an optional extra

    generator = torch.Generator().manual_seed(seed)
    inputs = make_inputs(entry, shapes, batch=num, device=device, dtype=dtype,
                         generator=generator)
    for name, tensor in (given or {}).items():
        if name == "timestep":
            raise ValueError("--inputs: timestep is set by --timesteps; leave it out of the file")
        if name not in inputs or not isinstance(inputs[name], torch.Tensor):
            known = sorted(k for k, v in inputs.items() if isinstance(v, torch.Tensor))
            raise ValueError(f"--inputs: {name!r} is not an input of {entry.name}'s forward "
                             f"here; its tensors: {', '.join(known)}")
        want = tuple(inputs[name].shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"--inputs: {name} has shape {tuple(tensor.shape)}; {entry.name} "
                             f"at this size and --num takes {want}")
        inputs[name] = tensor.to(device=device, dtype=inputs[name].dtype)
    what = f"random latents and text embeddings (seed {seed})"
    return DiffusersInputs(inputs, f"{what}; from {source}: {', '.join(given)}" if given
                           else what)


def noised(entry, inputs: dict[str, Any], noise: torch.Tensor, t: int) -> dict[str, Any]:
    """``inputs`` at timestep ``t``: latents noised as the family trains, the timestep set."""
    from ..integrations.diffusers.families import get_family  # lazy: diffusers is an optional extra

    family = get_family(entry.family)
    x0 = inputs["hidden_states"]
    b = x0.shape[0]
    out = dict(inputs)
    step = inputs["timestep"]
    if family.objective == "flow":
        sigma = t / 1000
        out["hidden_states"] = (1 - sigma) * x0 + sigma * noise
        value = sigma * family.timestep_scale  # FLUX takes σ, the others t
    else:
        tt = torch.full((b,), t, dtype=torch.long, device=x0.device)
        out["hidden_states"] = Diffusion(num_steps=1000).q_sample(x0, tt, noise)
        value = t
    out["timestep"] = torch.full_like(step, value)
    return out


def prediction(entry, output: torch.Tensor) -> torch.Tensor:
    """The model's prediction (ε or velocity) from its output; a learned variance dropped."""
    channels = entry.config.get("in_channels")
    if output.ndim == 4 and channels and output.shape[1] == 2 * channels:
        return output[:, :channels]
    return output


@torch.no_grad()
def zero_shot_fidelity_diffusers(model, entry, shapes, config: FidelityConfig, *,
                                 clean: DiffusersInputs | None = None,
                                 progress: bool = True) -> FidelityResult:
    """The measurement of ``config.variants`` on a diffusers ``model`` at ``shapes``, on
    ``clean`` step inputs (default: :func:`step_inputs` of ``config.num`` random ones)."""
    # lazy: diffusers is an optional extra
    from ..integrations.diffusers import swap_attention
    from ..integrations.diffusers.student import load_student

    check_softmax_model(entry, entry.name)
    started = time.perf_counter()
    device = torch.device(config.device)
    model = model.to(device).eval()
    dtype = next(model.parameters()).dtype
    timesteps = check_timesteps(config.timesteps, 1000)
    if clean is None:
        clean = step_inputs(entry, shapes, num=config.num, seed=config.seed, device=device,
                            dtype=dtype)
    clean = clean.to(device, dtype)
    x0 = clean.inputs["hidden_states"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(config.seed + 1))
    noise = noise.to(device=device, dtype=x0.dtype)
    steps = {t: noised(entry, clean.inputs, noise, t) for t in timesteps}
    variants = with_softmax(list(config.variants))
    bar = _progress(len(variants) * len(timesteps) + len(timesteps), progress)

    reference = {t: prediction(entry, model(**steps[t])[0]).detach() for t in timesteps}
    info: dict[str, dict[str, Any]] = {}
    cores: dict[str, list[Any]] = {}
    e2e = []
    for variant in variants:  # one student at a time: big models are copied once at most
        backend = attention.get(variant.method)
        if variant.heads is not None and variant.heads != shapes.heads:
            raise ValueError(f"{variant.label}: a diffusers model keeps its {shapes.heads} "
                             "heads (its QK norms are per head)")
        options = backend.resolve(variant.options, mixer=True)
        student = copy.deepcopy(model)
        handle = (load_student(student, variant.student) if variant.student is not None
                  else swap_attention(student, backend, **options))
        inherits = bool(handle.inherited)
        info[variant.label] = {
            "method": variant.method, "heads": shapes.heads, "options": options,
            **({"student": variant.student} if variant.student is not None else {}),
            "computed": "converted layer" if inherits else
                        "operator (attend) on the model's q, k, v: projections re-initialised "
                        "at conversion, learned parts left out",
        }
        by_name = dict(student.named_modules())
        cores[variant.label] = [copy.deepcopy(by_name[name].processor.core).double()
                                if inherits else None for name in handle.modules]
        for t in timesteps:
            out = prediction(entry, student(**steps[t])[0])
            e2e.append(end_to_end_row(variant, t, out, reference[t]))
            bar.update(1)
            bar.set_postfix_str(f"{variant.label} t={t}")
        del student, by_name, handle

    handle = swap_attention(model, "softmax")  # the stock output, through attnbench's cores
    by_name = dict(model.named_modules())
    layers, locality = [], []
    try:
        for t in timesteps:
            hooks = []
            for index, name in enumerate(handle.modules):
                def hook(module, args, kwargs, index=index, name=name, t=t):
                    q, k, v = (x.detach().double() for x in args[:3])
                    rows, curve = analyse_layer(
                        q, k, v, kwargs["layout"], variants, info,
                        {label: cores[label][index] for label in cores},
                        layer=index, timestep=t, config=config)
                    layers.extend({**row, "module": name} for row in rows)
                    locality.extend(curve)
                hooks.append(by_name[name].processor.core.register_forward_pre_hook(
                    hook, with_kwargs=True))
            try:
                model(**steps[t])
            finally:
                for h in hooks:
                    h.remove()
            bar.update(1)
            bar.set_postfix_str(f"layers t={t}")
    finally:
        handle.restore()
    bar.close()
    psnrs = {v.label: float("nan") for v in variants}
    summaries = summarise(variants, info, layers, e2e, psnrs)
    for summary in summaries:
        summary["psnr_note"] = NO_TRAJECTORY
    return FidelityResult(layers, e2e, locality, summaries, info,
                          elapsed_s=time.perf_counter() - started)


__all__ = ["DiffusersInputs", "Variant", "noised", "prediction", "step_inputs",
           "zero_shot_fidelity_diffusers"]
