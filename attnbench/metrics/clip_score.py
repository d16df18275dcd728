"""CLIP score: how well each image matches its prompt, with a CLIP model from a local folder.

``clip_score = 100 · max(cos(E_image, E_text), 0)`` averaged over the images (Hessel et
al., 2021, CLIPScore with w = 100, as torchmetrics computes it). The model is
``transformers.CLIPModel.from_pretrained(DIR, local_files_only=True,
use_safetensors=True)`` with the folder's own tokenizer and image processor (a folder
``save_pretrained`` wrote, e.g. ``openai/clip-vit-large-patch14``): nothing is
downloaded and no pickle is read. The teacher's score for the same prompts is recorded
beside the student's, so a drop reads against what the teacher itself reaches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

FLAG = "--clip-model"
#: what a CLIP model folder must hold (weights: any *.safetensors)
NEEDED = ("config.json", "preprocessor_config.json")


def check_folder(path: str | Path | None) -> Path:
    """The CLIP folder, or ``ValueError`` naming ``--clip-model`` and what is missing."""
    if path is None:
        raise ValueError(f"--metrics clip needs {FLAG} DIR: a local CLIP model folder "
                         "(save_pretrained of transformers' CLIPModel with its tokenizer and "
                         "image processor, e.g. openai/clip-vit-large-patch14)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{FLAG} {folder}: no such folder")
    for name in NEEDED:
        if not (folder / name).is_file():
            raise ValueError(f"{FLAG} {folder}: no {name} (save the model, its tokenizer and "
                             "its image processor with save_pretrained into one folder)")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{FLAG} {folder}: no *.safetensors weights (attnbench never reads "
                         "pickles: save with save_pretrained(safe_serialization=True))")
    return folder


def load(folder: str | Path, device: str = "cpu"):
    """``(model, tokenizer, image_processor)`` from a checked local folder."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    folder = check_folder(folder)
    model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    return model.to(device).eval(), tokenizer, processor


@torch.no_grad()
def clip_scores(images: np.ndarray, prompts: list[str], model, tokenizer, processor, *,
                device: str = "cpu", batch: int = 32) -> np.ndarray:
    """The CLIP score of each uint8 ``N×H×W×3`` image against its prompt."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    limit = model.config.text_config.max_position_embeddings
    out = []
    for start in range(0, len(images), batch):
        pixels = processor(images=list(images[start:start + batch]), return_tensors="pt")
        text = tokenizer(prompts[start:start + batch], padding=True, truncation=True,
                         max_length=limit, return_tensors="pt")
        image_emb = model.get_image_features(pixel_values=pixels["pixel_values"].to(device))
        text_emb = model.get_text_features(input_ids=text["input_ids"].to(device),
                                           attention_mask=text["attention_mask"].to(device))
        cos = torch.nn.functional.cosine_similarity(_tensor(image_emb).double(),
                                                    _tensor(text_emb).double(), dim=-1)
        out.append((100.0 * cos.clamp(min=0)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _tensor(features) -> torch.Tensor:
    """transformers returns a tensor, or (newer versions) an output with ``pooler_output``."""
    return features if torch.is_tensor(features) else features.pooler_output


# --------------------------------------------------------------------------- the metric group


def check_group(ctx) -> None:
    check_folder(ctx.settings.get("clip_model"))


def compute_group(ctx) -> tuple[dict[str, float], dict[str, Any]]:
    folder = ctx.settings["clip_model"]
    model, tokenizer, processor = load(folder, ctx.device)
    student = clip_scores(ctx.images, ctx.prompts, model, tokenizer, processor,
                          device=ctx.device)
    teacher = clip_scores(ctx.teacher_images, ctx.prompts, model, tokenizer, processor,
                          device=ctx.device)
    return {"clip_score": float(student.mean())}, {
        "model": str(folder), "definition": "100 · max(cos(image, text), 0), mean over images",
        "teacher_clip_score": float(teacher.mean()),
        "per_image": [round(float(x), 4) for x in student]}
