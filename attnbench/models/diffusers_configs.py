"""The diffusers architectures: published configurations and tiny versions for tests.

Each :class:`DiffusersConfig` is one transformer of a text-to-image or
text-to-video model as diffusers builds it: the class, its constructor
arguments exactly as the model's ``transformer/config.json`` on the Hugging
Face Hub gives them (cited in ``source``), and what the pipeline around it
fixes -- the usual text length, the VAE's down-sampling and latent channels,
the patching. With these, true shapes at any resolution follow without
weights (speed needs no weights).

The ``*-tiny`` entries keep a family's structure (double- and single-stream
blocks, dual attention, QK norms, RoPE axes) at a few layers and a small width,
so a forward pass on a CPU takes milliseconds; the tests run them.

This module is data: it imports neither torch nor diffusers. What a family shares
(its classes, how its pipeline fixes the shapes, its inputs) is its ``Family`` record
(:mod:`attnbench.integrations.diffusers.families`); ``family`` names it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DiffusersConfig:
    """One diffusers transformer and the pipeline facts that fix its shapes.

    ``config`` -- the constructor arguments (the hub's ``config.json``).
    ``text_tokens`` -- the usual prompt length the pipeline pads to (0: class-conditional).
    ``vae_factor`` -- pixels per latent position; ``vae_temporal`` -- frames per latent
    frame after the first (video: ``1 + (frames - 1) // vae_temporal`` latent frames).
    ``pack`` -- latent positions per token side packed by the pipeline (FLUX: 2);
    the transformer's own ``patch_size`` is in ``config``.
    ``default_res`` / ``default_frames`` -- the published generation size.
    """

    name: str
    family: str
    config: dict[str, Any]
    source: str
    text_tokens: int
    vae_factor: int
    latent_channels: int
    default_res: tuple[int, int]
    pack: int = 1
    vae_temporal: int = 1
    default_frames: int | None = None
    notes: str = ""
    tiny: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def patch(self) -> tuple[int, ...]:
        """Latent positions per token along (T,) H, W: the transformer's patch × ``pack``."""
        p = self.config.get("patch_size", 1)
        if isinstance(p, (list, tuple)):
            return tuple(int(x) for x in p)
        return (int(p) * self.pack,) * 2

    @property
    def pixels_per_token(self) -> tuple[int, int]:
        """Pixels per token side (H, W): 16 for FLUX (8 × packed 2), 32 for SANA."""
        ph, pw = self.patch[-2:]
        return self.vae_factor * ph, self.vae_factor * pw


def _wan(name: str, dim: int, layers: int, heads: int, ffn: int, source: str, *,
         channels: int = 16, text_dim: int = 4096, freq_dim: int = 256, **kw) -> DiffusersConfig:
    """A Wan2.1 text-to-video transformer (the T2V models differ in width, depth and heads)."""
    fields = dict(text_tokens=512, default_res=(480, 832), default_frames=81,
                  notes="UMT5-XXL text (512 tokens) only through cross-attention; 3-D RoPE; "
                        "81 frames → 21 latent frames")
    fields.update(kw)
    return DiffusersConfig(
        name=name, family="wan",
        config=dict(patch_size=(1, 2, 2), num_attention_heads=heads,
                    attention_head_dim=dim // heads,
                    in_channels=channels, out_channels=channels, text_dim=text_dim,
                    freq_dim=freq_dim, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                    added_kv_proj_dim=None, rope_max_seq_len=1024),
        source=source, vae_factor=8, vae_temporal=4, latent_channels=channels, **fields,
    )


_PUBLISHED = [
    DiffusersConfig(
        name="flux.1-dev", family="flux",
        config=dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19,
                    num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                    axes_dims_rope=(16, 56, 56)),
        source="black-forest-labs/FLUX.1-dev, transformer/config.json (Hugging Face Hub)",
        text_tokens=512, vae_factor=8, latent_channels=16, pack=2, default_res=(1024, 1024),
        notes="T5-XXL text (max_sequence_length 512) before the image tokens; 16-channel latents "
              "packed 2×2 into 64-channel tokens; CLEAR's published timings use this model",
    ),
    DiffusersConfig(
        name="sd3.5-large", family="sd3",
        config=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                    attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                    caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                    pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm"),
        source="stabilityai/stable-diffusion-3.5-large, transformer/config.json (Hugging Face Hub)",
        text_tokens=333, vae_factor=8, latent_channels=16, default_res=(1024, 1024),
        notes="joint attention with the image tokens first; text = 77 CLIP + 256 T5 tokens; "
              "position embedding cropped from 192×192 (≤ 3072 px)",
    ),
    DiffusersConfig(
        name="sd3.5-medium", family="sd3",
        config=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                    caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                    qk_norm="rms_norm"),
        source="stabilityai/stable-diffusion-3.5-medium, transformer/config.json "
               "(Hugging Face Hub)",
        text_tokens=333, vae_factor=8, latent_channels=16, default_res=(1024, 1024),
        notes="MMDiT-X: layers 0-12 add an image-only self-attention (attn2); image tokens "
              "first; text = 77 CLIP + 256 T5 tokens",
    ),
    DiffusersConfig(
        name="pixart-sigma", family="pixart",
        config=dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                    num_layers=28, dropout=0.0, norm_num_groups=32, cross_attention_dim=1152,
                    attention_bias=True, sample_size=128, patch_size=2,
                    activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                    upcast_attention=False, norm_type="ada_norm_single",
                    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
                    use_additional_conditions=False, caption_channels=4096),
        source="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json "
               "(Hugging Face Hub)",
        text_tokens=300, vae_factor=8, latent_channels=4, default_res=(1024, 1024),
        notes="self-attention over image tokens; T5 text (300 tokens) by cross-attention; "
              "LiT's text-to-image conversion starts from this model",
    ),
    DiffusersConfig(
        name="sana-1.6b", family="sana",
        config=dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
                    num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
                    cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, dropout=0.0,
                    attention_bias=False, sample_size=32, patch_size=1,
                    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None),
        source="Efficient-Large-Model/Sana_1600M_1024px_diffusers, transformer/config.json "
               "(Hugging Face Hub)",
        text_tokens=300, vae_factor=32, latent_channels=32, default_res=(1024, 1024),
        notes="ReLU linear self-attention (70 heads × 32); Gemma-2 text (300 tokens) by "
              "cross-attention; DC-AE f32c32 latents",
    ),
    _wan("wan2.1-t2v-1.3b", 1536, 30, 12, 8960,
         "Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json (Hugging Face Hub); "
         "Wan-Video/Wan2.1 wan/configs/wan_t2v_1_3B.py"),
    _wan("wan2.1-t2v-14b", 5120, 40, 40, 13824,
         "Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json (Hugging Face Hub); "
         "Wan-Video/Wan2.1 wan/configs/wan_t2v_14B.py"),
    DiffusersConfig(
        name="dit-xl-2-256", family="dit",
        config=dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                    num_layers=28, dropout=0.0, norm_num_groups=32, attention_bias=True,
                    sample_size=32, patch_size=2, activation_fn="gelu-approximate",
                    num_embeds_ada_norm=1000, upcast_attention=False, norm_type="ada_norm_zero",
                    norm_elementwise_affine=False, norm_eps=1e-5),
        source="facebook/DiT-XL-2-256, transformer/config.json (Hugging Face Hub)",
        text_tokens=0, vae_factor=8, latent_channels=4, default_res=(256, 256),
        notes="class-conditional; square inputs only (unpatchify uses √N); not numerically "
              "the official DiT (attnbench's own DiT is)",
    ),
]

_TINY = [
    DiffusersConfig(
        name="flux-tiny", family="flux", tiny=True,
        config=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                    pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        source="attnbench: flux.1-dev's structure at width 32",
        text_tokens=7, vae_factor=8, latent_channels=4, pack=2, default_res=(48, 80),
    ),
    DiffusersConfig(
        name="sd3-tiny", family="sd3", tiny=True,
        config=dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                    attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                    caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
                    pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
        source="attnbench: sd3.5-medium's structure (dual attention, QK norm) at width 32",
        text_tokens=5, vae_factor=8, latent_channels=4, default_res=(48, 80),
    ),
    DiffusersConfig(
        name="pixart-tiny", family="pixart", tiny=True,
        config=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                    num_layers=2, cross_attention_dim=32, attention_bias=True, sample_size=8,
                    patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                    use_additional_conditions=False, caption_channels=24),
        source="attnbench: pixart-sigma's structure at width 32",
        text_tokens=5, vae_factor=8, latent_channels=4, default_res=(48, 80),
    ),
    DiffusersConfig(
        name="sana-tiny", family="sana", tiny=True,
        config=dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8,
                    num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                    cross_attention_dim=32, caption_channels=24, mlp_ratio=2.5,
                    attention_bias=False, sample_size=8, patch_size=1),
        source="attnbench: sana-1.6b's structure at width 32",
        text_tokens=5, vae_factor=32, latent_channels=4, default_res=(96, 160),
    ),
    _wan("wan-tiny", 32, 2, 2, 48, "attnbench: wan2.1-t2v-1.3b's structure at width 32",
         channels=4, text_dim=24, freq_dim=16, tiny=True, text_tokens=5, default_res=(48, 80),
         default_frames=9, notes=""),
    DiffusersConfig(
        name="dit-tiny", family="dit", tiny=True,
        config=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                    num_layers=2, attention_bias=True, sample_size=8, patch_size=2,
                    activation_fn="gelu-approximate", num_embeds_ada_norm=10,
                    norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5),
        source="attnbench: dit-xl-2-256's structure at width 32",
        text_tokens=0, vae_factor=8, latent_channels=4, default_res=(64, 64),
    ),
]


#: every entry by name: the published configurations, then the tiny versions
DIFFUSERS_CONFIGS: dict[str, DiffusersConfig] = {
    e.name: e for e in [*_PUBLISHED, *_TINY]
}


def config_from_transformer(name: str, family: str, config: dict[str, Any], source: str,
                            defaults: dict[str, Any]) -> DiffusersConfig:
    """An entry for a transformer known only by its ``config.json``: ``defaults`` -- what
    its family's pipeline fixes (``text_tokens``, ``vae_factor``, ``pack``, ``default_res``,
    ``vae_temporal``, ``default_frames``)."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    pack = defaults.get("pack", 1)
    channels = int(config.get("in_channels", 4)) // (pack * pack)
    return DiffusersConfig(name=name, family=family, config=config, source=source,
                           latent_channels=channels, **defaults)


def diffusers_config_names(tiny: bool | None = None) -> list[str]:
    """Zoo names (``tiny=False``: published only, ``True``: tiny only, ``None``: all)."""
    return [n for n, e in DIFFUSERS_CONFIGS.items() if tiny is None or e.tiny == tiny]


def get_diffusers_config(name: str | DiffusersConfig) -> DiffusersConfig:
    """The zoo entry ``name`` (case-insensitive), or ``ValueError`` listing the valid ones."""
    if isinstance(name, DiffusersConfig):
        return name
    key = str(name).strip().lower()
    if key in DIFFUSERS_CONFIGS:
        return DIFFUSERS_CONFIGS[key]

    close = difflib.get_close_matches(key, list(DIFFUSERS_CONFIGS), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown diffusers model {name!r}{hint} "
                     f"(valid: {', '.join(DIFFUSERS_CONFIGS)})")
