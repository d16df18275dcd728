"""``world-t2i``: a text-to-image FLUX pipeline of the shapes world, built from configs.

The shapes world (:mod:`attnbench.data.shapes`) has exact ground truth for
GenEval's six tasks; this module gives it a text-to-image model of the FLUX
family, in diffusers' own format, so that ``DiffusionPipeline.from_pretrained(DIR,
local_files_only=True)`` loads it stock (``FluxPipeline``) and every diffusers
code path of attnbench (distill, sample, eval, fidelity) meets a *trained*
model with text tokens in its attention sequence.

Design (what is built, and why)
-------------------------------
* **Prompts** are the world's labels as text, GenEval's way: ``"a photo of "`` +
  the label's text ("a photo of three triangles", "a photo of a circle left of a
  square", "a photo of a red circle and a blue square"). :func:`prompt_text`.
* **Tokenizers**: word-level fast tokenizers built locally with the ``tokenizers``
  library (as :mod:`.tiny` does) over :data:`WORDS`, the words of every prompt;
  ``model_max_length`` = :data:`TEXT_TOKENS` (16: the longest prompt is 11 words
  + ``</s>``), which attnbench's samplers read as the prompt length, so the text
  occupies 16 tokens of the joint sequence.
* **Text encoders**: a CLIP text model (``text_encoder``, pooled output → FLUX's
  ``pooled_projections``) and a T5 encoder (``text_encoder_2``, per-token states →
  the text stream), both small (2 layers, width 64) and **random-init and
  frozen**: a random encoder is a fixed injective map of the 92 prompts (91 +
  the empty prompt) to features, and the transformer's ``context_embedder`` and
  joint attention learn to read them. Training them too would buy nothing the
  transformer cannot learn, and would make the text features drift under a
  distilled student. Their weights ship (they are part of the model).
* **VAE**: a small ``AutoencoderKL`` (two levels, channels 16/32, no mid-block
  attention, 4 latent channels), so ``vae_scale_factor`` = 2: 64 px images →
  32×32×4 latents, packed 2×2 by FLUX into 16×16 = **256 image tokens** of 16
  channels. It is *trained* briefly on world images (L1 + a small KL), not an
  identity: the world is flat palette colours on black, which a 2× autoencoder
  reconstructs almost exactly after a few hundred steps, and a learned decoder
  draws crisp edges that the transformer would otherwise have to place pixel by
  pixel. The latents' mean and std set ``shift_factor`` / ``scaling_factor``.
* **Transformer**: ``FluxTransformer2DModel`` with double-stream (joint) and
  single-stream blocks, 3-axis RoPE (``axes_dims_rope`` sums to the head dim;
  text tokens at position 0, image tokens at their (row, col)), no guidance
  embedding (``guidance_embeds=False``, FLUX.1-schnell's layout): a model
  trained from scratch has no CFG teacher to distil guidance from. Training
  drops 10 % of prompts to the empty prompt, so true CFG
  (``true_cfg_scale`` with ``negative_prompt=""``) stays available.
* **Scheduler**: ``FlowMatchEulerDiscreteScheduler`` with FLUX's dynamic
  shifting, anchored so that 256 tokens get ``mu = base_shift = 0.5``;
  training draws σ logit-normally (SD3's density), which covers that schedule.

Sizes are a :class:`WorldT2IConfig`; :data:`CONFIGS` names the shipped one
(``"default"``) and a tiny one for tests (``"quick"``). The training lives in
:mod:`attnbench.distill.world_t2i`; the shipped folder, once trained, lives in
``attnbench/assets/world_t2i/`` (:func:`default_pipeline_path`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ...data.shapes import PROMPTS
from ...models.checkpoint import check_sums, file_sha256
from .compat import import_diffusers

#: what precedes every label's text (GenEval's prompts read "a photo of ...")
PREFIX = "a photo of "
#: the text length (tokens) of both tokenizers: the longest prompt is 11 words + ``</s>``
TEXT_TOKENS = 16
SPECIAL = ("<pad>", "</s>", "<unk>")
ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "world_t2i"
SHA_FILE = "SHA256SUMS"
TRAINING_FILE = "training.json"
#: the world's 91 prompts, one a line, shipped inside the pipeline folder
PROMPTS_FILE = "prompts.txt"
MODEL_NAME = "world-t2i"


def prompt_text(label: int) -> str:
    """The prompt of a world label: ``"a photo of "`` + its text."""
    return PREFIX + PROMPTS[int(label)].text


def _words() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for p in PROMPTS:
        for w in prompt_text(p.label).split():
            seen.setdefault(w, None)
    return tuple(seen)


#: the vocabulary: every word of every prompt, in first-seen order
WORDS: tuple[str, ...] = _words()


def tokenizer():
    """A word-level fast tokenizer over :data:`WORDS` (pad 0, eos 1, unk 2), 16 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate((*SPECIAL, *WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>", bos_token="</s>",
                                   model_max_length=TEXT_TOKENS)


def vocab_size() -> int:
    return len(SPECIAL) + len(WORDS)


@dataclass(frozen=True)
class WorldT2IConfig:
    """The sizes of a world-t2i pipeline (module docstring)."""

    image_size: int = 64
    heads: int = 4
    head_dim: int = 32
    double_layers: int = 2
    single_layers: int = 4
    rope_axes: tuple[int, int, int] = (8, 12, 12)
    text_width: int = 64
    text_layers: int = 2
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def image_tokens(self) -> int:
        side = self.image_size // (2 * self.vae_factor)
        return side * side

    def validate(self) -> None:
        if sum(self.rope_axes) != self.head_dim:
            raise ValueError(f"rope_axes {self.rope_axes} must sum to head_dim {self.head_dim}")
        if self.image_size % (2 * self.vae_factor):
            raise ValueError(f"image_size {self.image_size} must be a multiple of "
                             f"{2 * self.vae_factor} (VAE × FLUX's 2×2 packing)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(width=self.width, vae_factor=self.vae_factor,
                    image_tokens=self.image_tokens)
        return data


CONFIGS: dict[str, WorldT2IConfig] = {
    "default": WorldT2IConfig(),
    # tests: 32 px, one level of VAE (factor 1) → 16×16 = 256 tokens, width 32; one double
    # and four single blocks, so that CLEAR's kd_attn rule (single-stream layers at a
    # position ≡ 0 mod 4 in the model's layer order) taps one, as on the default (single 2)
    "quick": WorldT2IConfig(image_size=32, heads=2, head_dim=16, double_layers=1,
                            single_layers=4, rope_axes=(4, 6, 6), text_width=16, text_layers=1,
                            vae_channels=(8,)),
}


def _clip(config: WorldT2IConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    w = config.text_width
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size(), hidden_size=w, intermediate_size=2 * w,
        num_hidden_layers=config.text_layers, num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS, projection_dim=w,
        pad_token_id=0, bos_token_id=1, eos_token_id=1))


def _t5(config: WorldT2IConfig):
    from transformers import T5Config, T5EncoderModel

    w = config.text_width
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size(), d_model=w, d_ff=2 * w, d_kv=w // 2, num_layers=config.text_layers,
        num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def build_vae(config: WorldT2IConfig):
    d = import_diffusers()
    n = len(config.vae_channels)
    return d.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(config.vae_channels),
        layers_per_block=1, latent_channels=config.latent_channels,
        norm_num_groups=min(8, config.vae_channels[0]), sample_size=config.image_size,
        mid_block_add_attention=False, scaling_factor=1.0, shift_factor=0.0)


def build_transformer(config: WorldT2IConfig):
    d = import_diffusers()
    return d.FluxTransformer2DModel(
        patch_size=1, in_channels=4 * config.latent_channels, num_layers=config.double_layers,
        num_single_layers=config.single_layers, attention_head_dim=config.head_dim,
        num_attention_heads=config.heads, joint_attention_dim=config.text_width,
        pooled_projection_dim=config.text_width, guidance_embeds=False,
        axes_dims_rope=tuple(config.rope_axes))


def build_scheduler(config: WorldT2IConfig):
    d = import_diffusers()
    return d.FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=config.image_tokens, max_image_seq_len=max(4096, config.image_tokens))


def build_pipeline(config: WorldT2IConfig, seed: int = 0):
    """A random-init world-t2i ``FluxPipeline`` of ``config`` (weights drawn from ``seed``)."""
    config.validate()
    d = import_diffusers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, t5 = _clip(config), _t5(config)
        vae, transformer = build_vae(config), build_transformer(config)
    for module in (clip, t5):
        module.requires_grad_(False).eval()
    return d.FluxPipeline(scheduler=build_scheduler(config), vae=vae, text_encoder=clip,
                          tokenizer=tokenizer(), text_encoder_2=t5, tokenizer_2=tokenizer(),
                          transformer=transformer)


# --------------------------------------------------------------------------- the shipped folder


def write_sums(folder: str | Path) -> Path:
    """``SHA256SUMS`` over every file of a pipeline folder (``HASH  REL/PATH`` lines)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SHA_FILE)
    text = "".join(f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)
    (folder / SHA_FILE).write_text(text)
    return folder / SHA_FILE


def verify_sums(folder: str | Path, flag: str = "--model-path") -> None:
    """Refuse a pipeline folder whose files do not match its ``SHA256SUMS`` (one line)."""
    folder = Path(folder)
    sums = folder / SHA_FILE
    if not sums.is_file():
        raise ValueError(f"{flag} {folder}: no {SHA_FILE} (a world-t2i pipeline ships with "
                         "one; retrain it with `python -m attnbench world --train-pipeline DIR`)")
    try:
        check_sums(folder)
    except ValueError as err:
        raise ValueError(f"{flag} {err}") from None


def load_world_pipeline(path: str | Path, *, flag: str = "--model-path", device="cpu"):
    """A world-t2i pipeline folder, its ``SHA256SUMS`` checked first, loaded stock."""
    from .pipelines import load_pipeline

    verify_sums(path, flag)
    return load_pipeline(path, device=device, flag=flag)[0]


def default_pipeline_path() -> Path:
    """The shipped world-t2i folder, checked; a clear error while none is trained yet."""
    if not (ASSET_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"--model {MODEL_NAME}: the world-t2i pipeline is not trained yet "
            f"({ASSET_DIR} holds none). Train it (about 3 CPU-hours, resumable) with "
            "`python -m attnbench world --train-pipeline runs/world-t2i`, copy "
            f"runs/world-t2i/pipeline to {ASSET_DIR}, or pass --model-path DIR")
    verify_sums(ASSET_DIR, "--model")
    return ASSET_DIR


def write_prompts(folder: str | Path) -> Path:
    """``prompts.txt``: the 91 prompts of the world, in label order (``--prompts``' format)."""
    path = Path(folder) / PROMPTS_FILE
    path.write_text("".join(prompt_text(p.label) + "\n" for p in PROMPTS))
    return path


def apply_default_model(args) -> None:
    """``--model world-t2i`` → ``--model-path`` the shipped folder, with its defaults.

    The CLI's diffusers commands (``distill``, ``sample``, ``fidelity``) call this
    before any other check: ``args.model_path`` becomes the shipped pipeline
    (refused with the training command while none is trained), and the flags left
    out take the model's own values -- its 64-px size (``--height``/``--width``,
    ``--res``) and the world's prompts (``--prompts``).
    """
    name = getattr(args, "model", None)
    if name is None or name.strip().lower() != MODEL_NAME:
        return
    if getattr(args, "model_path", None) is not None:
        raise ValueError(f"--model {MODEL_NAME} and --model-path: give one model")
    root = default_pipeline_path()
    args.model_path, args.model = str(root), None
    size = json.loads((root / "vae" / "config.json").read_text())["sample_size"]
    for flag in ("height", "width"):
        if hasattr(args, flag) and getattr(args, flag) is None:
            setattr(args, flag, size)
    if hasattr(args, "res") and args.res is None:
        args.res = str(size)
    if hasattr(args, "prompts") and args.prompts is None:
        args.prompts = str(root / PROMPTS_FILE)
