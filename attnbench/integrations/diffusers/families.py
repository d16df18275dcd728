"""One record per diffusers family: everything attnbench knows about it, in one place.

A :class:`Family` says which transformer and pipeline classes make the family,
what its pipeline folder must hold, how the pipeline samples by default, which
attention modules ``swap_attention`` replaces (blocks, modules, the processor
that reproduces the stock one, where the token geometry comes from), how the
pipeline encodes a prompt into the transformer's text inputs, how one
denoising step's inputs are assembled from latents, text and a noise level,
and the training objective with its noise/timestep convention.

A record also holds what fixes the family's true shapes without weights (the
pipeline's text length, VAE factor and packing, the joint or cross text, the layer
counts, where the model cannot run, random inputs): :mod:`.build` reads them for every
zoo entry and ``--model-path`` folder. A new family is one record here plus a zoo entry
in :mod:`attnbench.models.diffusers_configs`.

Noise conventions (what the objective and the step inputs agree on):

* ``flow`` (FLUX, SD3, SANA, Wan) -- rectified flow: ``x_σ = (1 − σ)·x0 + σ·ε``,
  the model predicts the velocity ``ε − x0`` (the sign diffusers' flow
  schedulers integrate), the transformer receives ``σ·timestep_scale``
  (FLUX: ``σ``; the others: ``1000·σ``). σ is drawn as ``timestep_density``
  says and shifted as the pipeline's scheduler shifts it (``shift`` /
  ``flow_shift`` in ``scheduler/scheduler_config.json``; FLUX's resolution-
  dependent shift when ``use_dynamic_shifting``).
* ``eps_vb`` (PixArt) -- DDPM ε-prediction with learned variance (DiT's
  objective: MSE(ε) + VB) on the linear-β 1000-step schedule PixArt trains on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import geometry as geo
from .processors import (
    AttnbenchProcessor,
    FluxProcessor,
    JointProcessor,
    SanaProcessor,
    SelfProcessor,
    WanProcessor,
)

#: the training objectives (module docstring)
OBJECTIVES = ("flow", "eps_vb")


@dataclass(frozen=True)
class Sampling:
    """A pipeline's usual sampling settings (its ``__call__`` defaults / model card)."""

    steps: int
    guidance: float
    max_sequence_length: int
    frames: int | None = None


@dataclass(frozen=True)
class Family:
    """Everything family-specific (module docstring).

    ``encode(pipe, prompts, device, max_len) -> {name: tensor}`` -- the text inputs
    of the transformer, from the pipeline's own ``encode_prompt`` (no guidance
    branch; the same tensors for teacher and student). ``inputs(config, x, text, t,
    grid, guidance) -> kwargs`` -- one forward's keyword inputs (``t``: the
    timestep in the transformer's unit; ``grid``: the token grid, needed by FLUX's
    position ids). ``call_kwargs`` -- what attnbench always passes the pipeline
    (PixArt, SANA: no resolution binning, so the requested size is the size sampled).
    """

    name: str
    transformer: str
    pipeline: str
    components: tuple[str, ...]
    blocks: tuple[str, ...]
    modules: tuple[str, ...]
    processor: type[AttnbenchProcessor]
    geometry: Callable[[nn.Module, dict[str, Any]], tuple[tuple[int, ...], int]]
    sampling: Sampling | None = None
    objective: str = "flow"
    timestep_scale: float = 1000.0
    timestep_density: str = "uniform"
    encode: Callable | None = None
    inputs: Callable | None = None
    #: the kind of each of ``blocks`` ("double"/"joint": text and image streams with their
    #: own projections; "single": one sequence), what a recipe's ``attn_kind`` selects
    kinds: tuple[str, ...] = ("single",)
    #: the parts of its attention defined per head, which fix the head split of the
    #: checkpoint: "norm_q" (per-head QK norms, where the module has them) and "rope"
    #: (rotary embedding over the head dim); elsewhere the method's heads rule applies
    #: (LiT: few heads; :func:`~.swap.head_split`)
    per_head: tuple[str, ...] = ()
    video: bool = False
    #: what the pipeline fixes when only the transformer's config is known (a folder loaded
    #: by --model-path): prompt length, VAE factor, latent positions packed per token side
    #: (FLUX: 2), VAE frames per latent frame, the published size (and frames)
    text_tokens: int = 0
    vae_factor: int = 8
    pack: int = 1
    vae_temporal: int = 1
    default_res: tuple[int, int] = (1024, 1024)
    default_frames: int | None = None
    #: the text joined to the image tokens in the self-attention: "first" (FLUX), "last"
    #: (SD3) or "" (image tokens only; text by cross-attention)
    joint_text: str = ""
    #: config keys whose sum is the self-attention calls per step (FLUX: double + single)
    layer_keys: tuple[str, ...] = ("num_layers",)
    #: config key listing the layers with an extra image-only self-attention (SD3.5's attn2)
    image_only_key: str | None = None
    #: ``(config, heads, head_dim) -> (cross-attention layers, heads, head_dim)``
    cross: Callable[[dict, int, int], tuple[int, int, int]] | None = None
    #: ``(config, gh, gw, height, width, name)``: ``ValueError`` where the model cannot run
    size_check: Callable[..., None] | None = None
    #: ``(config, batch, text_tokens, randn, generator) -> {name: tensor}``: random text (or
    #: class) inputs at the model's shapes (speed needs no real prompts)
    random_text: Callable[..., dict[str, torch.Tensor]] | None = None
    #: the transformer takes integer timesteps (PixArt, SANA, Wan, DiT)
    integer_timestep: bool = False
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    #: the σ-shift keys of the published pipeline's ``scheduler/scheduler_config.json``:
    #: what a zoo entry (no pipeline folder) trains with
    scheduler: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"{self.name}: objective must be one of {OBJECTIVES}")

    def pipeline_defaults(self) -> dict[str, Any]:
        """What the pipeline fixes, as a zoo entry's fields (a ``--model-path`` folder)."""
        return dict(text_tokens=self.text_tokens, vae_factor=self.vae_factor, pack=self.pack,
                    vae_temporal=self.vae_temporal, default_res=self.default_res,
                    default_frames=self.default_frames)


# --------------------------------------------------------------------------- text encoders


def _flux_encode(pipe, prompts: list[str], device, max_len: int) -> dict[str, torch.Tensor]:
    embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=device,
                                           num_images_per_prompt=1, max_sequence_length=max_len)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _sd3_encode(pipe, prompts: list[str], device, max_len: int) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None,
                                              device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_len)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _masked_encode(pipe, prompts: list[str], device, max_len: int) -> dict[str, torch.Tensor]:
    """PixArt and SANA: T5 / Gemma embeddings with their attention mask."""
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                            device=device, max_sequence_length=max_len)
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


def _wan_encode(pipe, prompts: list[str], device, max_len: int) -> dict[str, torch.Tensor]:
    embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                   max_sequence_length=max_len)
    return {"encoder_hidden_states": embeds}


# --------------------------------------------------------------------------- step inputs


def flux_ids(grid: tuple[int, int], text: int, device=None, dtype=torch.float32):
    """FLUX's ``(img_ids [H·W, 3], txt_ids [T, 3])`` as its pipeline makes them."""
    h, w = grid
    img = torch.zeros(h, w, 3, device=device, dtype=dtype)
    img[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    img[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return img.reshape(h * w, 3), torch.zeros(text, 3, device=device, dtype=dtype)


def _flux_inputs(config, x, text, t, grid, guidance):
    img_ids, txt_ids = flux_ids(tuple(grid), text["encoder_hidden_states"].shape[1],
                                device=x.device, dtype=x.dtype)
    kw = dict(hidden_states=x, timestep=t, img_ids=img_ids, txt_ids=txt_ids, **text)
    if config.get("guidance_embeds"):
        kw["guidance"] = torch.full((x.shape[0],), float(guidance), device=x.device,
                                    dtype=x.dtype)
    return kw


def _plain_inputs(config, x, text, t, grid, guidance):
    return dict(hidden_states=x, timestep=t, **text)


def _pixart_inputs(config, x, text, t, grid, guidance):
    return dict(hidden_states=x, timestep=t, **text,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _dit_inputs(config, x, text, t, grid, guidance):
    return dict(hidden_states=x, timestep=t, **text)


# --------------------------------------------------------------------------- shapes


def _pooled_text(config, b, t, randn, generator):
    return {"encoder_hidden_states": randn(b, t, config["joint_attention_dim"]),
            "pooled_projections": randn(b, config["pooled_projection_dim"])}


def _caption_text(key: str):
    def text(config, b, t, randn, generator):
        return {"encoder_hidden_states": randn(b, t, config[key])}
    return text


def _class_labels(config, b, t, randn, generator):
    classes = int(config.get("num_embeds_ada_norm", 1000))
    return {"class_labels": torch.randint(0, classes, (b,), generator=generator)}


def _all_layers_cross(config, heads, head_dim):
    return int(config["num_layers"]), heads, head_dim


def _sana_cross(config, heads, head_dim):
    if config.get("cross_attention_dim") is None:
        return 0, 0, 0
    return (int(config["num_layers"]), int(config.get("num_cross_attention_heads", heads)),
            int(config.get("cross_attention_head_dim", head_dim)))


def _sd3_size(config, gh, gw, height, width, name):
    side = int(config["pos_embed_max_size"])
    if max(gh, gw) > side:
        raise ValueError(f"{name}: its position embedding covers at most {side}×{side} "
                         f"patches ({side * height // gh} px); {height}x{width} px needs "
                         f"{gh}×{gw}")


def _square_only(config, gh, gw, height, width, name):
    if gh != gw:
        raise ValueError(f"{name}: diffusers' DiT takes square inputs only, got "
                         f"{height}x{width}")


# --------------------------------------------------------------------------- the registry

_FLUX = Family(
    "flux", "FluxTransformer2DModel", "FluxPipeline",
    ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
     "transformer"),
    ("transformer_blocks", "single_transformer_blocks"), ("attn",), FluxProcessor,
    geo.flux_geometry, Sampling(steps=28, guidance=3.5, max_sequence_length=512),
    objective="flow", timestep_scale=1.0, timestep_density="uniform",
    encode=_flux_encode, inputs=_flux_inputs, kinds=("double", "single"),
    per_head=("norm_q", "rope"), text_tokens=512, pack=2, joint_text="first",
    layer_keys=("num_layers", "num_single_layers"), random_text=_pooled_text,
    scheduler={"use_dynamic_shifting": True, "base_image_seq_len": 256,
               "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15},
    source="diffusers FluxPipeline (FLUX.1-dev: 28 steps, guidance 3.5 distilled into the "
           "transformer's guidance embedding)",
    notes={"timesteps": "uniform σ shifted by the scheduler's resolution-dependent shift "
                        "(attnbench's choice: diffusers' FLUX training scripts' default "
                        "weighting 'none')"},
)
_SD3 = Family(
    "sd3", "SD3Transformer2DModel", "StableDiffusion3Pipeline",
    ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
     "transformer"),
    ("transformer_blocks",), ("attn", "attn2"), JointProcessor,
    geo.image_geometry("SD3", "joint_attention_kwargs"),
    Sampling(steps=28, guidance=7.0, max_sequence_length=256),
    objective="flow", timestep_density="logit_normal", encode=_sd3_encode,
    inputs=_plain_inputs, kinds=("joint",), per_head=("norm_q",), scheduler={"shift": 3.0},
    text_tokens=333, joint_text="last", image_only_key="dual_attention_layers",
    size_check=_sd3_size, random_text=_pooled_text,
    source="diffusers StableDiffusion3Pipeline; SD3 paper: logit-normal(0, 1) σ, shift 3.0",
)
_PIXART = Family(
    "pixart", "PixArtTransformer2DModel", "PixArtSigmaPipeline",
    ("scheduler", "vae", "text_encoder", "tokenizer", "transformer"),
    ("transformer_blocks",), ("attn1",), SelfProcessor,
    geo.image_geometry("PixArt", "cross_attention_kwargs"),
    Sampling(steps=20, guidance=4.5, max_sequence_length=300),
    objective="eps_vb", timestep_density="uniform", encode=_masked_encode,
    inputs=_pixart_inputs, call_kwargs={"use_resolution_binning": False},
    text_tokens=300, cross=_all_layers_cross, random_text=_caption_text("caption_channels"),
    integer_timestep=True,
    source="diffusers PixArtSigmaPipeline; PixArt-Σ: DDPM ε + learned variance, linear β, "
           "1000 steps",
)
_SANA = Family(
    "sana", "SanaTransformer2DModel", "SanaPipeline",
    ("scheduler", "vae", "text_encoder", "tokenizer", "transformer"),
    ("transformer_blocks",), ("attn1",), SanaProcessor,
    geo.image_geometry("SANA", "attention_kwargs"),
    Sampling(steps=20, guidance=4.5, max_sequence_length=300),
    objective="flow", timestep_density="logit_normal", encode=_masked_encode,
    inputs=_plain_inputs, call_kwargs={"use_resolution_binning": False},
    scheduler={"flow_shift": 3.0}, text_tokens=300, vae_factor=32, cross=_sana_cross,
    random_text=_caption_text("caption_channels"), integer_timestep=True,
    source="diffusers SanaPipeline; SANA: flow matching, logit-normal σ, flow_shift 3.0",
)
_WAN = Family(
    "wan", "WanTransformer3DModel", "WanPipeline",
    ("scheduler", "vae", "text_encoder", "tokenizer", "transformer"),
    ("blocks",), ("attn1",), WanProcessor, geo.wan_geometry,
    Sampling(steps=50, guidance=5.0, max_sequence_length=512, frames=81),
    objective="flow", timestep_density="uniform", encode=_wan_encode, inputs=_plain_inputs,
    video=True, per_head=("rope",), scheduler={"flow_shift": 3.0}, text_tokens=512,
    vae_temporal=4, default_res=(480, 832), default_frames=81, cross=_all_layers_cross,
    random_text=_caption_text("text_dim"), integer_timestep=True,
    source="diffusers WanPipeline; Wan2.1: flow matching, uniform σ shifted by flow_shift",
)
_DIT = Family(
    "dit", "DiTTransformer2DModel", "DiTPipeline", (), ("transformer_blocks",), ("attn1",),
    SelfProcessor, geo.image_geometry("DiT"), objective="eps_vb", inputs=_dit_inputs,
    default_res=(256, 256), size_check=_square_only, random_text=_class_labels,
    integer_timestep=True,
    source="diffusers DiTTransformer2DModel (class-conditional: no text pipeline here)",
)

#: every family by name
FAMILIES: dict[str, Family] = {f.name: f for f in (_FLUX, _SD3, _PIXART, _SANA, _WAN, _DIT)}
#: the same records by transformer class name
BY_CLASS: dict[str, Family] = {f.transformer: f for f in FAMILIES.values()}
#: the families attnbench samples and distils through their stock pipeline
PIPELINE_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.encode is not None)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown diffusers family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(transformer: nn.Module) -> Family:
    """The :class:`Family` of ``transformer``, or ``ValueError`` naming the supported classes."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in BY_CLASS:
            return BY_CLASS[cls.__name__]
    raise ValueError(f"swap_attention: {type(transformer).__name__} is not supported; "
                     f"supported: {', '.join(BY_CLASS)}")


def family_of_pipeline(class_name: str) -> Family:
    for family in FAMILIES.values():
        if family.pipeline == class_name and family.encode is not None:
            return family
    raise ValueError(f"pipeline class {class_name!r} is not supported; supported: "
                     + ", ".join(FAMILIES[n].pipeline for n in PIPELINE_FAMILIES))


# --------------------------------------------------------------------------- noise levels


def flow_shift(scheduler_config: dict[str, Any], image_tokens: int) -> float:
    """The σ shift the pipeline's scheduler applies at ``image_tokens`` (its ``exp(mu)``
    under dynamic shifting: FLUX's linear rule between base and max sequence lengths)."""
    c = scheduler_config
    if c.get("use_dynamic_shifting"):
        base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base, top = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        slope = (top - base) / (max_len - base_len)
        return math.exp(image_tokens * slope + base - slope * base_len)
    return float(c.get("shift", c.get("flow_shift", 1.0)) or 1.0)


def draw_sigmas(family: Family, u: torch.Tensor, shift: float) -> torch.Tensor:
    """σ from uniform ``u`` in (0, 1): the family's density, then the scheduler's shift."""
    if family.timestep_density == "logit_normal":
        z = math.sqrt(2.0) * torch.erfinv(2 * u.clamp(1e-6, 1 - 1e-6) - 1)
        u = torch.sigmoid(z)
    return shift * u / (1 + (shift - 1) * u)
