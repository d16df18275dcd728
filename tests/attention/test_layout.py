"""The token layout of the attention contract: grids, video grids, text tokens."""

import pytest
import torch

from attnbench import attention
from attnbench.attention import Layout


def test_plain_grid_is_the_grid_argument():
    assert Layout.coerce(grid=(4, 5)) == Layout((4, 5))
    assert Layout((4, 5)).is_plain and Layout((4, 5)).tokens == 20


@pytest.mark.parametrize("text_first", [True, False])
def test_split_join_round_trip(text_first):
    layout = Layout((2, 3, 4), text=5, text_first=text_first)
    x = torch.arange(layout.tokens).view(1, 1, -1, 1)
    text, image = layout.split(x)
    assert text.shape[-2] == 5 and image.shape[-2] == 24
    assert (text.flatten()[0] == (0 if text_first else 24)).item()
    assert torch.equal(layout.join(text, image), x)


@pytest.mark.parametrize("bad", [(0, 4), (4,), (1, 2, 3, 4), ("a", 2)])
def test_bad_grids_are_refused(bad):
    with pytest.raises(ValueError, match="layout grid"):
        Layout(bad)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="not both"):
        Layout.coerce(Layout((2, 2)), grid=(2, 2))
    with pytest.raises(ValueError, match="video grid goes in layout"):
        Layout.coerce(grid=(2, 2, 2))
    with pytest.raises(ValueError, match="token count"):
        Layout((2, 2), text=-1)


def test_softmax_accepts_every_layout():
    gen = torch.Generator().manual_seed(0)
    layout = Layout((2, 3, 4), text=5, text_first=False)
    q, k, v = (torch.randn(2, 2, layout.tokens, 8, generator=gen, dtype=torch.float64)
               for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    for impl in attention.get("softmax").paths():
        out = attention.get("softmax").attend(q, k, v, layout=layout, impl=impl)
        assert torch.allclose(out, ref, atol=1e-12), impl
    with pytest.raises(ValueError, match="= 29 tokens, but the input has 28"):
        attention.get("softmax").attend(q[..., :28, :], k[..., :28, :], v[..., :28, :],
                                        layout=layout)


def test_core_runs_the_method_on_projected_heads():
    gen = torch.Generator().manual_seed(1)
    layout = Layout((3, 4), text=2)
    q, k, v = (torch.randn(2, 2, layout.tokens, 8, generator=gen) for _ in range(3))
    core = attention.get("softmax").core(2, 8)
    assert isinstance(core, torch.nn.Module)
    ref = attention.get("softmax").attend(q, k, v, layout=layout, impl="reference")
    assert torch.allclose(core(q, k, v, layout=layout), ref, atol=1e-6)
    with pytest.raises(ValueError, match="unknown option"):
        attention.get("clear").core(2, 8, radiuss=3)


# --------------------------------------------------------------------------- LiT


def _linear_over_all(q, k, v, eps=1e-6, shift=1e-6):
    """LiT's formula written out over every token (text included), float64."""
    fq, fk = q.relu() + shift, k.relu() + shift
    n = k.shape[2]
    return (fq @ (fk.transpose(-1, -2) @ v / n)) / (fq @ fk.mean(2, keepdim=True).transpose(-1, -2)
                                                    + eps)


@pytest.mark.parametrize("layout", [Layout((3, 4), text=5),
                                    Layout((3, 4), text=5, text_first=False),
                                    Layout((2, 3, 4)), Layout((2, 3, 4), text=3, text_first=False)],
                         ids=lambda lay: lay.describe().replace(" ", ""))
@pytest.mark.parametrize("dwc_3d", [False, True])
def test_lit_core_is_linear_attention_over_all_plus_a_conv_over_the_image(layout, dwc_3d):
    """Built independently: the linear sums over all tokens, then F.conv2d per frame (or
    F.conv3d over the video) on the image tokens' V, added at the image positions only."""
    gen = torch.Generator().manual_seed(3)
    b, h, d = 2, 2, 4
    q, k, v = (torch.randn(b, h, layout.tokens, d, generator=gen, dtype=torch.float64)
               for _ in range(3))
    core = attention.get("lit").core(h, d, dwc_kernel=3, dwc_3d=dwc_3d).double()
    with torch.no_grad():
        core.dwc.weight.normal_(generator=gen)
        core.dwc.bias.normal_(generator=gen)
    out = core(q, k, v, layout=layout)

    expected = _linear_over_all(q, k, v)
    image_index = torch.arange(layout.tokens)[layout.image_slice]
    t, (hg, wg) = layout.frames, layout.frame_grid
    vi = v[:, :, image_index].reshape(b * h, t, hg, wg, d)
    w, bias = core.dwc.weight, core.dwc.bias
    if dwc_3d:
        conv = torch.nn.functional.conv3d(vi.permute(0, 4, 1, 2, 3), w, bias, padding=1, groups=d)
        conv = conv.permute(0, 2, 3, 4, 1)
    else:
        frames = vi.reshape(b * h * t, hg, wg, d).permute(0, 3, 1, 2)
        conv = torch.nn.functional.conv2d(frames, w, bias, padding=1, groups=d).permute(0, 2, 3, 1)
    expected[:, :, image_index] += conv.reshape(b, h, -1, d)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_lit_conv_flops_count_image_tokens_only():
    lit = attention.get("lit")
    plain = lit.mixer_flops(1, 2, 12, 8, dwc_kernel=5)
    assert lit.mixer_flops(1, 2, 17, 8, layout=Layout((3, 4), text=5), dwc_kernel=5) == plain
    assert lit.mixer_flops(1, 2, 12, 8, dwc_kernel=5, dwc_3d=True) == 5 * plain
    assert lit.density(Layout((2, 3, 4), text=3)) == 0.0


def test_a_fast_path_declares_the_layouts_it_computes():
    """A path outside its layouts is passed over with the reason, never run silently wrong."""
    from attnbench.attention import FastPath

    path = FastPath("images_only", lambda q, k, v, **_: q, layouts=("image", "image+text"))
    video = Layout((2, 3, 4), text=1)
    reasons = path.not_supported_reasons("cpu", torch.float32, None, video)
    assert reasons == ["takes image, image+text layouts, not video+text (1 text + 2x3x4)"]
    assert path.not_supported_reasons("cpu", torch.float32, None, Layout((3, 4), text=2)) == []
    assert path.capabilities()["layouts"] == ["image", "image+text"]


def test_text_last_is_moved_once_and_paths_refuse_it_directly():
    layout = Layout((2, 3), text=2, text_first=False)
    x = torch.arange(8).view(1, 1, 8, 1)
    first = layout.to_text_first(x)
    assert first.flatten().tolist() == [6, 7, 0, 1, 2, 3, 4, 5]
    assert torch.equal(layout.from_text_first(first), x)
    with pytest.raises(ValueError, match="paths take text tokens first"):
        attention.get("clear").reference(*(torch.zeros(1, 1, 8, 4),) * 3, layout=layout)


def test_a_method_defines_its_layout_kinds():
    class PlainOnly(attention.AttentionBackend):
        name = "plain_only"

        def reference(self, q, k, v, *, grid):
            return v

    q = torch.zeros(1, 1, 12, 4)
    assert PlainOnly().attend(q, q, q, grid=(3, 4)) is q
    with pytest.raises(ValueError, match=r"plain_only takes image layouts; layout 2x2x3"):
        PlainOnly().attend(q, q, q, layout=Layout((2, 2, 3)))
