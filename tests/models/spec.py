"""The official DiT state-dict layout, written from facebookresearch/DiT's key names.

Independent of attnbench's model on purpose: the tests build checkpoints from
this list and check that attnbench loads them and that its own state dict has
exactly these keys and shapes.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def official_shapes(
    *,
    depth: int,
    hidden: int,
    patch: int,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    input_size: int = 32,
    mlp_ratio: float = 4.0,
) -> dict[str, tuple[int, ...]]:
    """Key → shape of a DiT checkpoint (timm Attention/Mlp/PatchEmbed names)."""
    out = in_channels * (2 if learn_sigma else 1)
    mlp = int(hidden * mlp_ratio)
    tokens = (input_size // patch) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * hidden, hidden),
            b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden),
            b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (mlp, hidden),
            b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (hidden, mlp),
            b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
            b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    shapes.update({
        "final_layer.linear.weight": (patch * patch * out, hidden),
        "final_layer.linear.bias": (patch * patch * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    })
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict:
    """Random values that keep activations O(1): every branch of the net matters."""
    state = {}
    for key, shape in shapes.items():
        if len(shape) >= 2 and key != "pos_embed" and "embedding_table" not in key:
            fan_in = int(np.prod(shape[1:]))
            value = torch.randn(shape, generator=gen) / fan_in**0.5
        else:
            value = torch.randn(shape, generator=gen) * (0.1 if len(shape) == 1 else 1.0)
        state[key] = value
    return state


def tiny_shapes(**kw) -> dict[str, tuple[int, ...]]:
    """The official layout at DiT-T/2 size (depth 2, hidden 64, 10 classes, 64 px)."""
    args = dict(depth=2, hidden=64, patch=2, num_classes=10, input_size=8)
    args.update(kw)
    return official_shapes(**args)


def train_py_checkpoint(ema: dict, model: dict) -> dict:
    """What facebookresearch/DiT's train.py saves."""
    opt = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    args = argparse.Namespace(model="DiT-T/2", image_size=64, num_classes=10, global_seed=0)
    return {"model": model, "ema": ema, "opt": opt, "args": args}


def mae_sincos(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """MAE / DiT get_2d_sincos_pos_embed, generalised to a grid_h × grid_w grid."""

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64)
        omega /= d / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw = np.arange(grid_w, dtype=np.float32)
    gh = np.arange(grid_h, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0)  # w goes first, as in DiT
    grid = grid.reshape(2, 1, grid_h, grid_w)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
