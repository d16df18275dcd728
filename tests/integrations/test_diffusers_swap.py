"""swap_attention in the six diffusers families: identity with softmax, restore, learned
parts in the state_dict, FLUX's geometry against a dense mask built from img_ids, refusals."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

pytest.importorskip("diffusers")

from attnbench import attention
from attnbench.attention import AttentionCore, Layout
from attnbench.integrations.diffusers import (
    build_transformer,
    flux_ids,
    make_inputs,
    model_shapes,
    swap_attention,
)

#: non-square grids where the model allows (DiT unpatchifies with √N: square only)
RESOLUTIONS = {"flux-tiny": (48, 80), "sd3-tiny": (48, 80), "pixart-tiny": (48, 80),
               "sana-tiny": (96, 160), "wan-tiny": (48, 80), "dit-tiny": (64, 64)}


def tiny(name: str, gen: torch.Generator, batch: int = 2):
    model = build_transformer(name, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
    shapes = model_shapes(name, RESOLUTIONS[name])
    return model, shapes, make_inputs(name, shapes, batch=batch, generator=gen)


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def softmax_reference(model, name: str, inputs) -> torch.Tensor:
    """The stock model's output with softmax self-attention: SANA's attn1 (ReLU linear
    attention in stock) runs diffusers' own SDPA processor for it, then gets its own back."""
    if name != "sana-tiny":
        return run(model, inputs)
    from diffusers.models.attention_processor import AttnProcessor2_0

    linear = [block.attn1.processor for block in model.transformer_blocks]
    for block in model.transformer_blocks:
        block.attn1.set_processor(AttnProcessor2_0())
    out = run(model, inputs)
    for block, processor in zip(model.transformer_blocks, linear, strict=False):
        block.attn1.set_processor(processor)
    return out


@pytest.mark.parametrize("name", list(RESOLUTIONS))
def test_softmax_swap_is_the_stock_model(name, gen):
    model, shapes, inputs = tiny(name, gen)
    assert shapes.layout.is_plain == (name not in ("flux-tiny", "sd3-tiny", "wan-tiny"))
    native = run(model, inputs)
    stock = softmax_reference(model, name, inputs)
    originals = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    handle = swap_attention(model, "softmax")
    assert handle.modules and handle.new_parameters == []
    swapped = run(model, inputs)
    assert (swapped - stock).abs().max().item() < 1e-5
    handle.restore()
    assert all(m.processor is originals[n]
               for n, m in model.named_modules() if hasattr(m, "processor"))
    assert torch.equal(run(model, inputs), native)  # bit-identical after restore
    assert not any(".processor." in k for k in model.state_dict())


def test_lit_without_conv_reproduces_sanas_linear_attention(gen):
    """SANA's stock attention is ReLU linear attention (no 1/√d, no shift of φ, eps 1e-15).

    LiT's core with φ = relu (phi_shift 0) is the same function: the mean form of its
    normaliser differs from SANA's sum form only in where the (negligible) eps sits.
    """
    model, _, inputs = tiny("sana-tiny", gen)
    stock = run(model, inputs)
    swap_attention(model, "lit", eps=1e-15, phi_shift=0.0, dwc_kernel=0, inherit_projections=True,
                   keep_heads=True)
    assert (run(model, inputs) - stock).abs().max().item() < 1e-5


class _ScaledCore(AttentionCore):
    """A core with a learned part: a per-head output gain (initialised to 1)."""

    def __init__(self, backend, num_heads, head_dim, **kw):
        super().__init__(backend, num_heads, head_dim, **kw)
        self.gain = torch.nn.Parameter(torch.ones(num_heads, 1, 1))

    def forward(self, q, k, v, *, layout=None, grid=None):
        return super().forward(q, k, v, layout=layout, grid=grid) * self.gain


def _gain_backend() -> attention.AttentionBackend:
    softmax = type(attention.get("softmax"))
    return type("GainSoftmax", (softmax,), {"name": "gain-softmax", "core_class": _ScaledCore})()


def test_learned_parts_are_in_the_state_dict_and_train(gen):
    model, _, inputs = tiny("flux-tiny", gen)
    handle = swap_attention(model, _gain_backend())
    assert handle.new_parameters == [f"{m}.processor.core.gain" for m in handle.modules]
    keys = set(model.state_dict())
    assert set(handle.new_parameters) <= keys
    assert "single_transformer_blocks.0.attn.processor.core.gain" in keys
    model.requires_grad_(True)
    model(**inputs)[0].square().mean().backward()
    gains = dict(model.named_parameters())
    assert all(gains[n].grad is not None and gains[n].grad.abs().sum() > 0
               for n in handle.new_parameters)
    assert handle.inherited and not handle.reinitialised


def test_lit_recipe_reinitialises_the_projections(gen):
    model, _, _ = tiny("pixart-tiny", gen)
    before = model.transformer_blocks[0].attn1.to_q.weight.clone()
    handle = swap_attention(model, "lit")
    assert attention.get("lit").inherits_projections is False
    assert "transformer_blocks.0.attn1.to_q.weight" in handle.reinitialised
    assert not torch.equal(model.transformer_blocks[0].attn1.to_q.weight, before)
    assert model.transformer_blocks[0].attn1.to_q.bias.abs().max() == 0
    assert handle.describe()["projections"] == "re-initialised"


# --------------------------------------------------------------------------- FLUX geometry


class _Recorder(AttentionCore):
    """CLEAR's reference on the layout the processor hands over, recording each layout."""

    seen: ClassVar[list[Layout]] = []

    def forward(self, q, k, v, *, layout=None, grid=None):
        type(self).seen.append(layout)
        clear = attention.get("clear")
        return clear.attend(q, k, v, layout=layout, impl="reference", radius=RADIUS)


RADIUS = 2.5


def _recorder_backend() -> attention.AttentionBackend:
    softmax = type(attention.get("softmax"))
    return type("Recorder", (softmax,), {"name": "recorder", "core_class": _Recorder})()


def clear_mask_from_ids(img_ids: torch.Tensor, text: int, radius: float) -> torch.Tensor:
    """CLEAR's mask, built from FLUX's ids alone: text sees and is seen by every token,
    image tokens see image tokens with Δrow² + Δcol² < r² ([text; image] order)."""
    pos = img_ids[:, 1:3].double()
    d2 = (pos[:, None, :] - pos[None, :, :]).square().sum(-1)
    n = text + pos.shape[0]
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[text:, text:] = d2 < radius * radius
    return mask[None, None]


def test_flux_layout_matches_a_dense_mask_from_img_ids(gen):
    model, _shapes, inputs = tiny("flux-tiny", gen)
    text = inputs["txt_ids"].shape[0]
    mask = clear_mask_from_ids(inputs["img_ids"], text, RADIUS)
    stock = run(model, {**inputs, "joint_attention_kwargs": {"attention_mask": mask}})
    # the check can fail: the same tokens read as a 5x3 grid give another mask and output
    transposed = clear_mask_from_ids(flux_ids((5, 3), text)[0], text, RADIUS)
    stock_transposed = run(model, {**inputs,
                                   "joint_attention_kwargs": {"attention_mask": transposed}})
    _Recorder.seen = []
    swap_attention(model, _recorder_backend())
    out = run(model, inputs)
    # one call per block, double- and single-stream, each with the right layout
    assert _Recorder.seen == [Layout((3, 5), text=text, text_first=True)] * 2
    assert (out - stock).abs().max().item() < 1e-5
    assert (out - stock_transposed).abs().max().item() > 1e-3


@pytest.mark.parametrize("impl", ["reference", "masked_sdpa", "auto"])
def test_clear_on_flux_matches_a_dense_mask_from_img_ids(gen, impl):
    """The registered CLEAR, swapped into FLUX, computes the stock model under CLEAR's
    mask built from FLUX's own ids (text tokens official: they see and are seen by all)."""
    model, _shapes, inputs = tiny("flux-tiny", gen)
    text = inputs["txt_ids"].shape[0]
    mask = clear_mask_from_ids(inputs["img_ids"], text, RADIUS)
    stock = run(model, {**inputs, "joint_attention_kwargs": {"attention_mask": mask}})
    swap_attention(model, "clear", radius=RADIUS, impl=impl)
    assert (run(model, inputs) - stock).abs().max().item() < 1e-5


def test_flux_refuses_masks_and_several_grids(gen):
    model, _, inputs = tiny("flux-tiny", gen)
    swap_attention(model, "softmax")
    mask = torch.ones(1, 1, 22, 22, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention mask"):
        run(model, {**inputs, "joint_attention_kwargs": {"attention_mask": mask}})
    kontext = inputs["img_ids"].clone()
    kontext[8:, 0] = 1  # a second image's ids, as FLUX Kontext marks them
    with pytest.raises(ValueError, match="one row-major grid"):
        run(model, {**inputs, "img_ids": kontext})


def test_refusals_before_any_change(gen):
    model, _, _ = tiny("pixart-tiny", gen)
    originals = [b.attn1.processor for b in model.transformer_blocks]
    with pytest.raises(ValueError, match="radius"):
        swap_attention(model, "clear", radius=-1)
    with pytest.raises(ValueError, match="not supported"):
        swap_attention(torch.nn.Linear(2, 2), "softmax")
    model.transformer_blocks[1].attn1.set_processor(lambda *a, **k: None)
    with pytest.raises(ValueError, match="not the stock AttnProcessor2_0"):
        swap_attention(model, "softmax")
    assert model.transformer_blocks[0].attn1.processor is originals[0]
    model.transformer_blocks[1].attn1.set_processor(originals[1])
    handle = swap_attention(model, "softmax")
    with pytest.raises(ValueError, match="installed already"):
        swap_attention(model, "softmax")
    handle.restore()
    handle.restore()  # idempotent
    assert model.transformer_blocks[1].attn1.processor is originals[1]


def test_sd3_puts_image_tokens_first_and_dual_attention_is_image_only(gen):
    model, _shapes, inputs = tiny("sd3-tiny", gen)
    _Recorder.seen = []

    class Seen(AttentionCore):
        def forward(self, q, k, v, *, layout=None, grid=None):
            _Recorder.seen.append(layout)
            return super().forward(q, k, v, layout=layout, grid=grid)

    softmax = type(attention.get("softmax"))
    backend = type("Seen", (softmax,), {"name": "seen", "core_class": Seen})()
    swap_attention(model, backend)
    run(model, inputs)
    joint = Layout((3, 5), text=5, text_first=False)
    assert _Recorder.seen == [joint, Layout((3, 5)), joint]  # block 0: attn, attn2; block 1


# --------------------------------------------------------------------------- recipes per family


def test_clear_kd_layers_on_a_19_plus_38_flux_are_the_official_rule():
    """FLUX.1's block structure (19 double-stream, 38 single-stream) at a tiny width: the
    recipe's layers against the official rule restated over diffusers' own processor order
    (Huage001/CLEAR distill.py: 'single' in name and idx % 4 == 0)."""
    from diffusers import FluxTransformer2DModel

    from attnbench.distill import RECIPES
    from attnbench.integrations.diffusers.swap import kd_attn_modules

    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=19,
                                   num_single_layers=38, attention_head_dim=4,
                                   num_attention_heads=1, joint_attention_dim=8,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 0))
    names = list(model.attn_processors)
    assert len(names) == 57
    official = [n.removesuffix(".processor") for i, n in enumerate(names)
                if "single" in n and i % 4 == 0]
    ours = kd_attn_modules(model, RECIPES["clear"])
    assert ours == official
    assert ours == [f"single_transformer_blocks.{i}.attn" for i in range(1, 38, 4)]


def test_lit_gets_few_heads_where_no_part_is_per_head(gen):
    """PixArt's attn1 has no QK norm and no RoPE: LiT's rule max(2, heads // 4) applies;
    FLUX (per-head QK norms, RoPE) and SD3.5 (per-head QK norms) keep the checkpoint's."""
    import dataclasses

    from attnbench.attention.lit import lit_heads
    from attnbench.models.diffusers_configs import get_diffusers_config

    base = get_diffusers_config("pixart-tiny")  # 8 heads of 4 channels: LiT takes 2
    entry = dataclasses.replace(base, config={**base.config, "num_attention_heads": 8,
                                              "attention_head_dim": 4})
    model = build_transformer(entry, seed=0)
    inputs = make_inputs(entry, model_shapes(entry, RESOLUTIONS["pixart-tiny"]), batch=1,
                         generator=gen)
    attn = model.transformer_blocks[0].attn1
    heads, inner = attn.heads, attn.inner_dim
    handle = swap_attention(model, "lit")
    assert attn.heads == lit_heads(heads, inner) != heads
    assert attn.processor.core.num_heads == attn.heads
    assert "by the method's rule" in next(iter(handle.heads.values()))
    assert run(model, inputs).isfinite().all()
    handle.restore()
    assert attn.heads == heads
    for name in ("flux-tiny", "sd3-tiny"):
        model, _, inputs = tiny(name, gen)
        before = [m.heads for _, m in model.named_modules() if hasattr(m, "processor")]
        handle = swap_attention(model, "lit")
        after = [m.heads for _, m in model.named_modules() if hasattr(m, "processor")]
        assert after == before
        assert all("per head" in why for why in handle.heads.values())
        assert run(model, inputs).isfinite().all()


def test_clear_ntk_factor_scales_fluxs_rope_base_until_restore(gen):
    """CLEAR's transformer_flux.py: get_1d_rotary_pos_embed(..., ntk_factor) multiplies
    θ. With a radius covering the grid, CLEAR+ntk equals CLEAR on a model whose θ was
    multiplied by hand; restore() puts θ back; models without RoPE refuse it."""
    model, _, inputs = tiny("flux-tiny", gen)
    theta = model.pos_embed.theta
    handle = swap_attention(model, "clear", radius=100.0, ntk_factor=10.0)
    assert model.pos_embed.theta == theta * 10
    scaled = run(model, inputs)
    handle.restore()
    assert model.pos_embed.theta == theta
    plain = swap_attention(model, "clear", radius=100.0)
    unscaled = run(model, inputs)
    model.pos_embed.theta = theta * 10
    torch.testing.assert_close(run(model, inputs), scaled, rtol=0, atol=1e-6)
    plain.restore()
    assert not torch.allclose(scaled, unscaled)
    model, _, _ = tiny("pixart-tiny", gen)
    with pytest.raises(ValueError, match="ntk_factor=10 scales a RoPE base"):
        swap_attention(model, "clear", ntk_factor=10)
