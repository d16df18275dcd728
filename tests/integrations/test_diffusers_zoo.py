"""The diffusers zoo: published configurations (sizes as published), true shapes, inputs,
building on a device in a dtype, and the analytic FLOPs of a step against a FLOP counter."""

from __future__ import annotations

import pytest
import torch

from attnbench import attention

pytest.importorskip("diffusers")

from attnbench.attention import Layout
from attnbench.bench.flops import count_flops
from attnbench.integrations.diffusers import (
    build_transformer,
    make_inputs,
    model_shapes,
    swap_attention,
)
from attnbench.integrations.diffusers.flops import step_flops
from attnbench.models.diffusers_configs import (
    DIFFUSERS_CONFIGS,
    diffusers_config_names,
    get_diffusers_config,
)

#: parameters of each published transformer (billions), as its model card / paper states them
PUBLISHED_SIZE = {"flux.1-dev": 12, "sd3.5-large": 8.1, "sd3.5-medium": 2.2,
                  "pixart-sigma": 0.6, "sana-1.6b": 1.6, "wan2.1-t2v-1.3b": 1.4,
                  "wan2.1-t2v-14b": 14, "dit-xl-2-256": 0.75}


def test_every_family_has_published_and_tiny_entries():
    published = diffusers_config_names(tiny=False)
    assert set(published) == set(PUBLISHED_SIZE)
    families = {e.family for e in DIFFUSERS_CONFIGS.values()}
    assert families == {get_diffusers_config(n).family for n in diffusers_config_names(tiny=True)}
    for name in published:
        assert get_diffusers_config(name).source  # every entry cites where it comes from
    with pytest.raises(ValueError, match="did you mean 'flux.1-dev'"):
        get_diffusers_config("flux-1-dev")


@pytest.mark.parametrize("name", list(PUBLISHED_SIZE))
def test_published_sizes_built_on_meta_in_bf16(name):
    model = build_transformer(name, device="meta", dtype=torch.bfloat16)
    size = sum(p.numel() for p in model.parameters()) / 1e9
    assert size == pytest.approx(PUBLISHED_SIZE[name], rel=0.06)
    dtypes = {p.dtype for p in model.parameters()}
    kept = torch.float32 in dtypes  # Wan keeps its norms and embedders in float32
    assert torch.bfloat16 in dtypes and kept == (get_diffusers_config(name).family == "wan")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_true_shapes():
    flux = model_shapes("flux.1-dev", 1024)
    assert flux.layout == Layout((64, 64), text=512, text_first=True)
    assert (flux.heads, flux.head_dim, flux.attention_layers) == (24, 128, 57)
    assert flux.latent == (4096, 64) and flux.attention_shape(2)[:4] == (2, 24, 4608, 128)
    sd3 = model_shapes("sd3.5-medium", (1024, 768))
    assert sd3.layout == Layout((64, 48), text=333, text_first=False)
    assert sd3.image_only_layers == 13
    wan = model_shapes("wan2.1-t2v-1.3b", (480, 832), frames=81)
    assert wan.layout == Layout((21, 30, 52)) and wan.latent == (16, 21, 60, 104)
    assert wan.cross_layers == 30 and wan.text_tokens == 512
    sana = model_shapes("sana-1.6b", 1024)
    assert sana.grid == (32, 32) and (sana.cross_heads, sana.cross_head_dim) == (20, 112)
    assert model_shapes("pixart-sigma", 1024).layout == Layout((64, 64))


@pytest.mark.parametrize("call, match", [
    (lambda: model_shapes("flux.1-dev", 1000), "multiples of 16 px"),
    (lambda: model_shapes("sana-1.6b", 1040), "multiples of 32 px"),
    (lambda: model_shapes("sd3.5-large", 4096), r"at most 192×192 patches \(3072 px\)"),
    (lambda: model_shapes("dit-xl-2-256", (256, 512)), "square"),
    (lambda: model_shapes("wan2.1-t2v-14b", 480, frames=80), "1 \\+ 4·k frames"),
    (lambda: model_shapes("flux.1-dev", 1024, frames=81), "image model"),
])
def test_shapes_refuse_what_the_model_cannot_run(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("name", diffusers_config_names(tiny=True))
def test_step_flops_match_the_flop_counter(name, gen):
    """Linear + attention + cross-attention FLOPs, text tokens included, equal what
    attnbench's FLOP counter counts in a real forward of the tiny model (softmax)."""
    entry = get_diffusers_config(name)
    model = build_transformer(name)
    shapes = model_shapes(name, entry.default_res, entry.default_frames)
    swap_attention(model, "softmax")  # SANA's linear attention → SDPA, as counted
    inputs = make_inputs(name, shapes, batch=2, generator=gen)
    with torch.no_grad():
        counted = count_flops(lambda: model(**inputs))
    flops = step_flops(model, shapes, "softmax", batch=2)
    assert flops.total == flops.total_dense == counted


def test_step_flops_of_a_method_and_unmodelled_layouts():
    model = build_transformer("dit-xl-2-256", device="meta")
    shapes = model_shapes("dit-xl-2-256", 256)
    lit = step_flops(model, shapes, "lit", batch=1)
    assert lit.linear == step_flops(model, shapes, "softmax").linear
    assert lit.attention < lit.attention_dense
    flux = build_transformer("flux-tiny", device="meta")
    flux_shapes = model_shapes("flux-tiny", (48, 80))
    clear = step_flops(flux, flux_shapes, "clear", options={"radius": 2})
    assert 0 < clear.attention < clear.attention_dense  # the window, text tokens counted
    softmax = type(attention.get("softmax"))
    image_only = type("ImageOnly", (softmax,), {"name": "image-only",
                                                "layout_kinds": ("image",)})()
    unmodelled = step_flops(flux, flux_shapes, image_only)
    assert unmodelled.attention is None and unmodelled.total is None


def test_inputs_and_build_in_half_precision(gen):
    model = build_transformer("wan-tiny", dtype=torch.bfloat16)
    shapes = model_shapes("wan-tiny", (48, 80), frames=9)
    inputs = make_inputs("wan-tiny", shapes, batch=1, dtype=torch.bfloat16, generator=gen)
    with torch.no_grad():
        out = model(**inputs)[0]
    assert out.shape == inputs["hidden_states"].shape and torch.isfinite(out.float()).all()


def test_every_zoo_entry_names_a_family_record():
    """A family is one record (families.py) plus zoo entries naming it: every entry's class,
    pipeline defaults and shapes come from its record."""
    from attnbench.integrations.diffusers.families import FAMILIES
    from attnbench.models.diffusers_configs import DIFFUSERS_CONFIGS

    for entry in DIFFUSERS_CONFIGS.values():
        family = FAMILIES[entry.family]
        assert (entry.vae_temporal > 1) == family.video, entry.name
        assert (entry.pack > 1) == (family.pack > 1), entry.name
        if not entry.tiny:  # a published entry is what its family's pipeline fixes
            assert entry.text_tokens == family.text_tokens, entry.name
            assert entry.vae_factor == family.vae_factor, entry.name
