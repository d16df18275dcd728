"""The DiT model: layout, configs, any resolution, CFG, init."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from attnbench import attention
from attnbench.models import (
    DIT_CONFIGS,
    DiT,
    DiTConfig,
    build_dit,
    get_config,
    model_from_state_dict,
    sincos_pos_embed,
)
from attnbench.models import dit as dit_module

from .conftest import make_inputs
from .spec import mae_sincos, official_shapes

PAPER = {  # facebookresearch/DiT models.py: depth, hidden, heads
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}


def cpu_methods() -> list[str]:
    return [n for n in attention.names() if attention.get(n).available("cpu") is None]


@pytest.mark.parametrize("size", list(PAPER))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_zoo_state_dict_is_the_official_layout(size, patch):
    depth, hidden, heads = PAPER[size]
    config = get_config(f"DiT-{size}/{patch}")
    assert (config.depth, config.hidden_size, config.num_heads) == (depth, hidden, heads)
    with torch.device("meta"):
        model = DiT(config)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_shapes(depth=depth, hidden=hidden, patch=patch)


def test_xl2_parameter_count_matches_dit():
    with torch.device("meta"):
        model = DiT(get_config("DiT-XL/2"))
    # train.py of facebookresearch/DiT logs "DiT Parameters: 675,129,632" for XL/2
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert model.pos_embed.requires_grad is False


def test_config_names_and_errors():
    assert get_config("DiT-XL-2") == get_config("dit-xl/2") == DIT_CONFIGS["DiT-XL/2"]
    assert {"DiT-T/2", "DiT-Ti/2"} <= set(DIT_CONFIGS)
    with pytest.raises(ValueError, match="did you mean"):
        get_config("DiT-XXL/2")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiTConfig(hidden_size=64, num_heads=3)
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        get_config("DiT-T/2", hiden_size=3)
    with pytest.raises(ValueError, match="positive integer"):
        DiTConfig.from_dict({"depth": "12"})
    config = get_config("DiT-T/2", attention="lit", attention_heads=2)
    assert DiTConfig.from_dict(config.to_dict()) == config


def test_forward_shapes_and_learn_sigma(gen):
    model = build_dit("DiT-T/2", seed=0).eval()
    x, t, y = make_inputs(gen)
    assert model(x, t, y).shape == (2, 8, 8, 8)
    plain = build_dit("DiT-T/4", learn_sigma=False, seed=0).eval()
    assert plain(x, t, y).shape == (2, 4, 8, 8)


def test_fresh_model_is_adaln_zero(gen):
    """adaLN-Zero: a freshly initialised DiT outputs zeros."""
    model = build_dit("DiT-T/2", seed=0).eval()
    assert torch.count_nonzero(model(*make_inputs(gen))) == 0


def test_seeded_build_is_reproducible_and_leaves_the_global_rng():
    state = torch.random.get_rng_state()
    a, b = build_dit("DiT-T/2", seed=3), build_dit("DiT-T/2", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_stored_pos_embed_is_dits_sincos():
    model = build_dit("DiT-T/2", seed=0)
    expected = torch.from_numpy(mae_sincos(64, 4, 4)).float()
    torch.testing.assert_close(model.pos_embed[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid", [(4, 4), (8, 8), (3, 5), (7, 2)])
def test_recomputed_pos_embed_follows_dits_convention(grid):
    got = sincos_pos_embed(64, grid)
    expected = torch.from_numpy(mae_sincos(64, *grid)).float()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_any_resolution_uses_the_grids_embedding(gen, tiny_state):
    model = model_from_state_dict(tiny_state)
    assert model.pos_embed_for((4, 4)) is model.pos_embed
    x, t, y = make_inputs(gen, side=16, width=12)  # a non-square, larger latent
    out = model(x, t, y)
    assert out.shape == (2, 8, 16, 12) and torch.isfinite(out).all()
    emb = model.pos_embed_for((8, 6))
    assert model.pos_embed_for((8, 6)) is emb  # cached
    torch.testing.assert_close(emb[0], torch.from_numpy(mae_sincos(64, 8, 6)).float())
    model.double()  # a dtype change drops the cache
    assert model.pos_embed_for((8, 6)).dtype == torch.float64


def test_pos_embed_cache_is_bounded():
    model = build_dit("DiT-T/2", seed=0)
    for side in range(1, 12):
        model.pos_embed_for((side, side + 1))
    assert len(model._pos_cache) <= dit_module.POS_EMBED_CACHE_SIZE


def test_grid_reaches_every_mixer(gen, tiny_state, monkeypatch):
    model = model_from_state_dict(tiny_state)
    seen = []
    for mixer in model.mixers():
        mixer.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[1])))
    model(*make_inputs(gen, side=12, width=6))
    assert seen == [(6, 3)] * 2


def test_forward_with_cfg(gen, tiny_state):
    model = model_from_state_dict(tiny_state)
    x, t, _ = make_inputs(gen, batch=4)
    x = torch.cat([x[:2], x[:2]])
    y = torch.tensor([1, 2, 10, 10])
    out = model.forward_with_cfg(x, t, y, cfg_scale=1.5)
    raw = model(x, t, y)
    cond, uncond = raw[:2], raw[2:]
    guided = uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3])
    torch.testing.assert_close(out[:2, :3], guided)
    torch.testing.assert_close(out[2:, :3], guided)
    torch.testing.assert_close(out[:, 3:], raw[:, 3:])  # DiT guides 3 channels only
    full = model.forward_with_cfg(x, t, y, cfg_scale=1.5, cfg_channels=None)
    torch.testing.assert_close(full[:2, :4], uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4]))


def test_label_dropout_uses_the_null_class(tiny_state):
    model = model_from_state_dict(tiny_state)
    labels = torch.tensor([1, 2, 3])
    dropped = model.y_embedder(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    table = model.y_embedder.embedding_table.weight
    torch.testing.assert_close(dropped, table[torch.tensor([10, 2, 10])])
    model.train()
    model.y_embedder.dropout_prob = 1.0  # training drops every label
    assert torch.equal(model.y_embedder(labels, train=True), table[[10, 10, 10]])


def test_bad_inputs(tiny_state):
    model = model_from_state_dict(tiny_state)
    t, y = torch.zeros(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(2, 4, 9, 8), t, y)
    with pytest.raises(ValueError, match=r"expected latents \[B, 4, H, W\]"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="t and y must be"):
        model(torch.randn(2, 4, 8, 8), torch.zeros(3), y)


@pytest.mark.parametrize("method", cpu_methods())
def test_dit_init_keeps_the_methods_init(method):
    """Mixers' reset_new_parameters() runs after DiT's Xavier pass (e.g. zero-init branches)."""
    bare = attention.get(method).mixer(64, 4)
    zero = {n for n, p in bare.named_parameters() if n in bare.new_parameters() and not p.any()}
    model = build_dit("DiT-T/2", attention=method, seed=0)
    for mixer in model.mixers():
        params = dict(mixer.named_parameters())
        for name in zero:
            assert not params[name].any(), f"{method}: {name} should stay zero-initialised"


def test_model_code_names_no_method():
    """The model never special-cases a method: no method name is a constant of dit.py."""
    tree = ast.parse(Path(dit_module.__file__).read_text())
    constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    # "softmax" is the default of DiTBlock's signature, nothing more
    assert not (constants & set(attention.names())) - {"softmax"}


def test_float64_forward_matches_float32(gen, tiny_state):
    model = model_from_state_dict(tiny_state)
    x, t, y = make_inputs(gen)
    with torch.no_grad():
        ref = model.double()(x.double(), t, y)
        got = model.float()(x, t, y)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
