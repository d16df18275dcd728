"""Tiny pipelines of the diffusers families, built offline from configs (for tests and demos).

Every part is real and random: text encoders built from ``transformers``
configs, tokenizers built locally with the ``tokenizers`` library over a small
word-level vocabulary, a tiny VAE, the family's transformer (a few layers,
width 32) and its stock scheduler. ``save_tiny_pipeline(family, DIR)`` writes
what ``save_pretrained`` writes, so the CLI meets them as it meets real ones.
Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .compat import import_diffusers
from .pipelines import quiet

#: the vocabulary of the tiny tokenizers (unknown words map to <unk>)
WORDS = ("a an the of and with on in at red green blue yellow black white small big cat dog "
         "bird car house tree flower photo painting of_a sky sea mountain city night day").split()
#: text length of the tiny pipelines (their tokenizers' model_max_length)
TEXT_TOKENS = 8


def tokenizer(max_length: int = TEXT_TOKENS):
    """A word-level fast tokenizer over :data:`WORDS` (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>", bos_token="</s>", model_max_length=max_length)


def vocab_size() -> int:
    return len(WORDS) + 3


def _clip(width: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size(), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=TEXT_TOKENS, projection_dim=width,
                            pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(width: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cls, cfg = (UMT5EncoderModel, UMT5Config) if umt5 else (T5EncoderModel, T5Config)
    return cls(cfg(vocab_size=vocab_size(), d_model=width, d_ff=2 * width, d_kv=8, num_layers=1,
                   num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae_kl(latent_channels: int, **kw):
    d = import_diffusers()
    return d.AutoencoderKL(in_channels=3, out_channels=3,
                           down_block_types=["DownEncoderBlock2D"] * 4,
                           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8] * 4,
                           layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                           **kw)


def _flux():
    d = import_diffusers()
    transformer = d.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = d.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return d.FluxPipeline(scheduler=scheduler, vae=_vae_kl(4, shift_factor=0.1, scaling_factor=0.5),
                          text_encoder=_clip(16), tokenizer=tokenizer(),
                          text_encoder_2=_t5(32), tokenizer_2=tokenizer(), transformer=transformer)


def _sd3():
    d = import_diffusers()
    transformer = d.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
        dual_attention_layers=(0,), qk_norm="rms_norm")
    return d.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae_kl(4, shift_factor=0.1, scaling_factor=0.5),
        text_encoder=_clip(16, projection=True), tokenizer=tokenizer(),
        text_encoder_2=_clip(16, projection=True), tokenizer_2=tokenizer(),
        text_encoder_3=_t5(32), tokenizer_3=tokenizer())


def _pixart():
    d = import_diffusers()
    transformer = d.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=32, attention_bias=True, sample_size=8, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
        caption_channels=32)
    return d.PixArtSigmaPipeline(tokenizer=tokenizer(), text_encoder=_t5(32),
                                 vae=_vae_kl(4), transformer=transformer,
                                 scheduler=d.DPMSolverMultistepScheduler())


def _sana():
    from transformers import Gemma2Config, Gemma2Model

    d = import_diffusers()
    transformer = d.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
        cross_attention_dim=16, caption_channels=16, mlp_ratio=2.5, attention_bias=False,
        sample_size=32, patch_size=1)
    vae = d.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    gemma = Gemma2Model(Gemma2Config(
        vocab_size=vocab_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0,
        eos_token_id=1, bos_token_id=1, max_position_embeddings=512))
    scheduler = d.DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                              use_flow_sigmas=True, flow_shift=3.0)
    return d.SanaPipeline(tokenizer=tokenizer(300), text_encoder=gemma, vae=vae,
                          transformer=transformer, scheduler=scheduler)


def _wan():
    d = import_diffusers()
    transformer = d.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=16, ffn_dim=48, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    vae = d.AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True],
                             latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    scheduler = d.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                          use_flow_sigmas=True, flow_shift=3.0)
    return d.WanPipeline(tokenizer=tokenizer(), text_encoder=_t5(32, umt5=True), vae=vae,
                         scheduler=scheduler, transformer=transformer)


BUILDERS = {"flux": _flux, "sd3": _sd3, "pixart": _pixart, "sana": _sana, "wan": _wan}


def tiny_pipeline(family: str, seed: int = 0):
    """The tiny pipeline of ``family`` with random weights drawn from ``seed``."""
    if family not in BUILDERS:
        raise ValueError(f"no tiny pipeline for {family!r}; available: {', '.join(BUILDERS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[family]()


def save_tiny_pipeline(family: str, folder: str | Path, seed: int = 0) -> Path:
    """``tiny_pipeline(family)`` written with ``save_pretrained`` (safetensors) to ``folder``."""

    quiet()
    folder = Path(folder)
    tiny_pipeline(family, seed).save_pretrained(folder, safe_serialization=True)
    return folder
