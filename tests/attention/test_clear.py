"""CLEAR: every path against a float64 reference, the reference against the definition.

The definition is rebuilt here naively (Python loops over query/key pairs and
patches), independent of ``clear.allowed``. FlexAttention compiles once per
shape on CPU (seconds each), so its cases share two shapes; everything else
runs on the masked SDPA path or the reference in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnbench import attention
from attnbench.attention import clear
from attnbench.bench.flops import count_flops
from tests.helpers import qkv

CLEAR = attention.get("clear")
SOFTMAX = attention.get("softmax")
FLEX_REASON = CLEAR.path_reasons("cpu", torch.float32, (1, 2, 530, 64))["flex"]


# --------------------------------------------------------------------------- the definition


def naive_mask(grid, radius, text=0, down_factor=0) -> torch.Tensor:
    """``[N, M]`` bool, pair by pair: text↔all, image→text/pooled/circle."""
    hg, wg = grid
    g, f = text, down_factor
    n = g + hg * wg
    m = n + ((hg // f) * (wg // f) if f else 0)
    rows = []
    for i in range(n):
        row = []
        for j in range(m):
            if i < g:
                row.append(j < n)
            elif j < g or j >= n:
                row.append(True)
            else:
                qy, qx = divmod(i - g, wg)
                ky, kx = divmod(j - g, wg)
                row.append((qy - ky) ** 2 + (qx - kx) ** 2 < radius**2)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def naive_pool(x, grid, text, f, weight=None) -> torch.Tensor:
    """Pooled tokens patch by patch (top-left region when the grid is not a multiple of f)."""
    hg, wg = grid
    weight = torch.full((f, f), 1.0 / f**2, dtype=x.dtype) if weight is None else weight
    out = []
    for py in range(hg // f):
        for px in range(wg // f):
            acc = torch.zeros_like(x[:, :, 0])
            for i in range(f):
                for j in range(f):
                    acc = (
                        acc + weight[i, j] * x[:, :, text + (py * f + i) * wg + px * f + j]
                    )
            out.append(acc)
    return torch.stack(out, dim=2) if out else x[:, :, :0]


def naive_clear(q, k, v, grid, radius, text=0, down_factor=0, weight=None):
    """Dense masked softmax over K/V extended with naively pooled tokens."""
    mask = naive_mask(grid, radius, text, down_factor)
    if down_factor:
        k = torch.cat([k, naive_pool(k, grid, text, down_factor, weight)], dim=2)
        v = torch.cat([v, naive_pool(v, grid, text, down_factor, weight)], dim=2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def exact_pairs_clear(q, k, v, mask):
    """Softmax over exactly the allowed keys of each query: the FLOP-honest computation."""
    out = torch.empty_like(q)
    for i in range(q.shape[2]):
        keys = mask[i].nonzero()[:, 0]
        scores = q[:, :, i : i + 1] @ k[:, :, keys].transpose(-1, -2) / math.sqrt(q.shape[-1])
        out[:, :, i : i + 1] = torch.softmax(scores, dim=-1) @ v[:, :, keys]
    return out


# (batch, heads, grid, text tokens first, down_factor, radius, head_dim)
CASES = [
    (2, 2, (7, 9), 0, 0, 2.5, 64),  # N = 63
    (1, 3, (9, 13), 2, 0, 3.0, 72),  # N = 119, integer radius: strict boundary
    (3, 1, (6, 10), 3, 2, 2.2, 64),  # N = 63, pooled 3×5
    (2, 2, (7, 9), 2, 2, 1.5, 72),  # 7×9 not a multiple of 2: remainder not pooled
    (1, 2, (5, 13), 0, 4, 4.0, 64),  # one row of pooled tokens, right columns left over
    (2, 1, (16, 9), 1, 3, 0.5, 64),  # N = 145 > 128, radius < 1: self only + text + pooled
]


def _case_id(case) -> str:
    b, h, (hg, wg), g, f, r, d = case
    return f"B{b}H{h}g{hg}x{wg}G{g}f{f}r{r}d{d}"


def _opts(case) -> dict:
    _, _, _, _, f, r, _ = case
    return {"radius": r, "down_factor": f}


def _layout(case) -> attention.Layout:
    """The case's grid with its text tokens first."""
    return attention.Layout(case[2], text=case[3])


def _naive(q, k, v, case, weight=None):
    _, _, grid, g, f, r, _ = case
    return naive_clear(q, k, v, grid, r, g, f, weight=weight)


def _inputs(gen, case, dtype=torch.float64):
    b, h, (hg, wg), g, _, _, d = case
    return qkv(gen, b, h, g + hg * wg, d, dtype=dtype)


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_is_the_definition(case, gen):
    q, k, v = _inputs(gen, case)
    out = CLEAR.reference(q, k, v, layout=_layout(case), **_opts(case))
    expected = _naive(q, k, v, case)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_reference_in_many_chunks_is_the_definition(gen, monkeypatch):
    """Forced into one grid row per chunk, the key band still covers every circle."""
    monkeypatch.setattr(clear.window, "REFERENCE_CHUNK_ELEMENTS", 1)
    case = (2, 2, (9, 7), 3, 2, 2.9, 16)
    q, k, v = _inputs(gen, case)
    assert clear.window._row_block(clear.Window.of((9, 7), 2.9, 3, 2), 4) == 1
    out = CLEAR.attend(q, k, v, layout=_layout(case), impl="reference", **_opts(case))
    torch.testing.assert_close(out, _naive(q, k, v, case), atol=1e-12, rtol=0)


@pytest.mark.parametrize("text", [0, 3])
@pytest.mark.parametrize("impl", ["reference", "masked_sdpa"])
def test_radius_covering_the_grid_is_softmax(text, impl, gen):
    grid = (6, 9)
    q, k, v = qkv(gen, 2, 2, text + 54, 16)
    radius = math.hypot(*grid)  # > the largest distance (5, 8)
    out = CLEAR.attend(q, k, v, layout=attention.Layout(grid, text=text), radius=radius,
                       impl=impl)
    expected = SOFTMAX.attend(q, k, v, grid=(text + 54, 1))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_reference_at_a_128_by_128_grid_stays_chunked(gen, monkeypatch):
    """16,384 tokens: no chunk of scores comes near the 16384² matrix."""
    seen = []
    inner = clear.reference.softmax_reference

    def spy(q, k, v, **kw):
        seen.append(q.shape[2] * k.shape[2])
        return inner(q, k, v, **kw)

    monkeypatch.setattr(clear.reference, "softmax_reference", spy)
    n = 128 * 128
    q, k, v = (torch.randn(1, 1, n, 4, generator=gen) for _ in range(3))
    out = CLEAR.attend(q, k, v, grid=(128, 128), radius=8, impl="reference")
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert len(seen) > 1 and max(seen) <= clear.window.MASK_CHUNK_ELEMENTS <= n * n // 64
    # spot check one query in the middle against its own neighbourhood
    i = 64 * 128 + 70
    ky, kx = torch.arange(n) // 128, torch.arange(n) % 128
    mask = (ky - 64) ** 2 + (kx - 70) ** 2 < 64
    expected = torch.softmax(q[0, 0, i] @ k[0, 0, mask].T / 2, dim=-1) @ v[0, 0, mask]
    torch.testing.assert_close(out[0, 0, i], expected, atol=1e-5, rtol=1e-5)
    ws = CLEAR.memory(1, 1, n, 4, grid=(128, 128), element_size=4, impl="reference")
    assert ws.workspace < n * n * 4 / 16


# --------------------------------------------------------------------------- fast paths


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_masked_sdpa_matches_the_reference(case, dtype, gen):
    q, k, v = _inputs(gen, case)
    expected = CLEAR.reference(q, k, v, layout=_layout(case), **_opts(case))
    out = CLEAR.attend(
        *(t.to(dtype) for t in (q, k, v)), layout=_layout(case), impl="masked_sdpa",
        **_opts(case)
    )
    assert out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


# Two compiled shapes in all: [1, 2, 530, 64] with K = 530, and K = 566 (pooled).
FLEX_CASES = [
    ((20, 20), 130, 0, 3.0),  # 130 text tokens: a whole tile of full blocks
    ((10, 40), 130, 0, 5.5),  # non-square, same shapes: no recompile
    ((25, 16), 130, 0, 1.0),  # radius 1: the diagonal only
    ((10, 53), 0, 0, 4.0),  # no text tokens, same shapes
    ((20, 20), 130, 3, 2.0),  # pooled 6×6, 20 not a multiple of 3
]


@pytest.mark.skipif(FLEX_REASON is not None, reason=f"flex: {FLEX_REASON}")
@pytest.mark.parametrize("grid, text, down_factor, radius", FLEX_CASES)
def test_flex_matches_the_reference(grid, text, down_factor, radius, gen):
    opts = {"radius": radius, "down_factor": down_factor}
    layout = attention.Layout(grid, text=text)
    q, k, v = qkv(gen, 1, 2, layout.tokens, 64)
    expected = CLEAR.reference(q, k, v, layout=layout, **opts)
    out = CLEAR.attend(q.float(), k.float(), v.float(), layout=layout, impl="flex", **opts)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "grid, g, f, r",
    [((20, 20), 130, 3, 2.0), ((30, 17), 0, 4, 2.5), ((16, 40), 5, 0, 2.0)],
)
def test_block_mask_tiles_are_the_dense_mask_reduced(grid, g, f, r):
    layout = clear.Window.of(grid, r, g, f)
    partial, full = clear.flex._block_flags(layout, torch.device("cpu"))
    mask = naive_mask(grid, r, g, f)
    n, m, bs = mask.shape[0], mask.shape[1], clear.FLEX_BLOCK
    padded = torch.zeros(-(-n // bs) * bs, -(-m // bs) * bs, dtype=torch.long)
    padded[:n, :m] = mask
    counts = padded.view(padded.shape[0] // bs, bs, -1, bs).sum(dim=(1, 3))
    assert torch.equal(full, counts == bs * bs)
    assert torch.equal(partial, (counts > 0) & (counts < bs * bs))
    empty = ~(partial | full)
    assert partial.any() and empty.any()
    if g >= bs:
        assert full.any()  # a tile of text queries over text/image keys
    assert clear.block_density(grid, r, g, f) == pytest.approx(1 - empty.float().mean().item())
    built = clear.block_mask(grid, r, g, f)
    assert clear.block_mask(grid, r, g, f) is built  # cached: built once per layout
    assert built.seq_lengths == (n, m)


def test_availability_gives_reasons():
    reasons = CLEAR.path_reasons("cpu", torch.float64, (1, 1, 64, 8))
    assert reasons["reference"] is None and reasons["masked_sdpa"] is None
    assert "float64" in reasons["flex"]
    huge = CLEAR.path_reasons("cpu", torch.float32, (1, 1, 1 << 16, 64))["masked_sdpa"]
    assert "GiB" in huge
    assert CLEAR.select("cpu", torch.float32, (1, 1, 64, 8), needs_grad=True) == "halo"
    assert CLEAR.select("cpu", torch.float64, (1, 1, 1 << 16, 8)) == "halo"
    assert all(
        r is None or isinstance(r, str) for r in CLEAR.path_reasons("cpu", torch.float16).values()
    )


def test_overhead_steps_build_from_scratch(gen):
    q, k, v = qkv(gen, 1, 2, 3 + 48, 8)
    opts = {"radius": 2.0, "down_factor": 4}
    layout = attention.Layout((6, 8), text=3)
    steps = CLEAR.overhead_steps(q, k, v, layout=layout, impl="masked_sdpa", **opts)
    assert set(steps) == {"pool_kv", "dense_mask"}
    assert torch.equal(steps["dense_mask"](), naive_mask((6, 8), 2.0, 3, 4))
    k_ext, _ = steps["pool_kv"]()
    assert k_ext.shape[2] == 51 + 1 * 2  # pooled 1×2 of the 6×8 grid
    if FLEX_REASON is None:  # building the block mask compiles nothing
        q, k, v = (t.float() for t in (q, k, v))
        steps = CLEAR.overhead_steps(q, k, v, layout=layout, impl="flex", radius=2.0)
        assert set(steps) == {"block_mask"} and steps["block_mask"]().seq_lengths == (51, 51)


# --------------------------------------------------------------------------- pairs and FLOPs

PAIR_CASES = [
    ((7, 9), 2.5, 0, 0),
    ((16, 8), 3.0, 0, 0),  # integer radius: (3, 0) excluded
    ((1, 20), 4.0, 0, 0),
    ((5, 5), 0.5, 0, 0),
    ((5, 5), 1.0, 2, 0),
    ((4, 4), 100.0, 0, 0),  # covers the grid: N²
    ((12, 7), 3.7, 5, 3),
    ((6, 10), 2.2, 3, 2),
]


@pytest.mark.parametrize("grid, radius, text, down_factor", PAIR_CASES)
def test_dense_mask_is_the_definition(grid, radius, text, down_factor):
    expected = naive_mask(grid, radius, text, down_factor)
    assert torch.equal(clear.dense_mask(grid, radius, text, down_factor), expected)


@pytest.mark.parametrize("grid, radius, text, down_factor", PAIR_CASES)
def test_pair_count_is_the_mask_sum(grid, radius, text, down_factor):
    mask = naive_mask(grid, radius, text, down_factor)
    assert clear.allowed_pairs(grid, radius, text, down_factor) == int(mask.sum())
    hg, wg = grid
    local = naive_mask(grid, radius)
    assert clear.local_pairs(grid, radius) == int(local.sum())
    n = text + hg * wg
    flops = CLEAR.flops(
        2, 3, n, 8, attention.Layout(grid, text=text), radius=radius, down_factor=down_factor
    )
    assert flops.actual == 4 * 2 * 3 * int(mask.sum()) * 8
    assert flops.dense == 4 * 2 * 3 * n * n * 8


def test_pair_count_scales_like_the_circle():
    """Far from the borders each query has ~πr² keys."""
    pairs = clear.local_pairs((1000, 1000), 16)
    assert pairs / 1e6 == pytest.approx(math.pi * 16**2, rel=0.05)


def test_flop_model_equals_the_counted_flops_of_exact_pair_attention(gen):
    """No path computes only the allowed pairs (flex: whole 128² tiles; SDPA and the
    reference: dense rows), so FlopCounterMode cannot check the sparse count on
    them. A per-query gather of exactly the allowed keys can: its matmuls are
    4·d FLOPs per pair, and its output must be CLEAR's."""
    grid, g, f, r = (6, 7), 2, 2, 2.3
    q, k, v = qkv(gen, 2, 2, g + 42, 8)
    mask = naive_mask(grid, r, g, f)
    k_ext = torch.cat([k, naive_pool(k, grid, g, f)], dim=2)
    v_ext = torch.cat([v, naive_pool(v, grid, g, f)], dim=2)
    counted = count_flops(exact_pairs_clear, q, k_ext, v_ext, mask)
    layout = attention.Layout(grid, text=g)
    analytic = CLEAR.flops(2, 2, g + 42, 8, layout, radius=r, down_factor=f)
    assert counted == analytic.actual
    expected = CLEAR.reference(q, k, v, layout=layout, radius=r, down_factor=f)
    torch.testing.assert_close(exact_pairs_clear(q, k_ext, v_ext, mask), expected)


def test_flop_model_equals_counted_sdpa_when_dense(gen):
    """With a radius covering the grid every pair is allowed: the model is the SDPA
    count. With a small radius the counter still reports the dense N×M (the masked
    kernel computes every score), which is why the check above uses exact pairs."""
    q, k, v = qkv(gen, 2, 2, 48, 16, dtype=torch.float32)
    dense = CLEAR.flops(2, 2, 48, 16, grid=(6, 8), radius=20)
    assert count_flops(CLEAR.attend, q, k, v, grid=(6, 8), radius=20, impl="masked_sdpa") == (
        dense.actual
    )
    assert dense.actual == dense.dense and dense.ratio == 1
    sparse = CLEAR.flops(2, 2, 48, 16, grid=(6, 8), radius=2)
    counted = count_flops(CLEAR.attend, q, k, v, grid=(6, 8), radius=2, impl="masked_sdpa")
    assert counted == dense.dense > sparse.actual


def test_memory_models():
    n, grid = 64 * 64, (64, 64)
    ref = CLEAR.memory(1, 16, n, 72, grid=grid, impl="reference", element_size=2)
    fast = CLEAR.memory(1, 16, n, 72, grid=grid)
    sdpa = CLEAR.memory(1, 16, n, 72, grid=grid, impl="masked_sdpa", element_size=2)
    assert sdpa.workspace == n * n * 3
    assert 0 < fast.workspace < ref.workspace < 16 * n * n * 4
    pooled = CLEAR.memory(1, 16, n, 72, grid=grid, down_factor=4)
    assert pooled.workspace > fast.workspace  # the concatenated K/V copies
    with pytest.raises(ValueError, match="unknown impl"):
        CLEAR.memory(1, 16, n, 72, grid=grid, impl="sdpa")


# --------------------------------------------------------------------------- options


def test_invalid_options_are_value_errors(gen):
    q, k, v = qkv(gen, 1, 1, 16, 8)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"option 'radius'.*finite number > 0"):
            CLEAR.attend(q, k, v, grid=(4, 4), radius=bad)
    with pytest.raises(ValueError, match="option 'radius' takes a float"):
        CLEAR.attend(q, k, v, grid=(4, 4), radius="wide")
    with pytest.raises(ValueError, match=r"option 'down_factor'=-2: must be >= 0"):
        CLEAR.attend(q, k, v, grid=(4, 4), down_factor=-2)
    with pytest.raises(ValueError, match="takes an integer"):
        CLEAR.attend(q, k, v, grid=(4, 4), radius_t=1.5)
    with pytest.raises(ValueError, match=r"2 text \+ 3x4 = 14 tokens.* has 16"):
        CLEAR.attend(q, k, v, layout=attention.Layout((3, 4), text=2))
    with pytest.raises(ValueError, match=r"option 'radius_t'=-1: must be >= 0"):
        CLEAR.attend(q, k, v, grid=(4, 4), radius_t=-1)
    with pytest.raises(ValueError, match="grid 4x4 = 16 tokens, but the input has 20"):
        CLEAR.reference(*qkv(gen, 1, 1, 20, 8), grid=(4, 4))
    with pytest.raises(ValueError, match=r"pool_weight must be \[2, 2\]"):
        CLEAR.attend(q, k, v, grid=(4, 4), down_factor=2, pool_weight=torch.ones(3, 3))
    with pytest.raises(ValueError, match="down_factor is 1"):
        CLEAR.attend(q, k, v, grid=(4, 4), pool_weight=torch.ones(2, 2))
    assert CLEAR.resolve({"radius": "16", "down_factor": "4"})["radius"] == 16.0


# --------------------------------------------------------------------------- mixer


def test_mixer_new_parameters_are_the_pool_weights():
    assert CLEAR.mixer(48, 4).new_parameters() == []
    mixer = CLEAR.mixer(48, 4, down_factor=4)
    assert mixer.new_parameters() == ["core.pool_weight"]
    assert mixer.core.pool_weight.shape == (4, 4)
    torch.testing.assert_close(mixer.core.pool_weight.data, torch.full((4, 4), 1 / 16))
    with torch.no_grad():
        mixer.core.pool_weight.mul_(3)
    mixer.reset_new_parameters()
    torch.testing.assert_close(mixer.core.pool_weight.data, torch.full((4, 4), 1 / 16))


def test_mixer_with_text_tokens_uses_its_weights(gen):
    grid, g = (6, 7), 2
    layout = attention.Layout(grid, text=g)
    mixer = CLEAR.mixer(32, 2, radius=2.5, down_factor=2).double()
    x = torch.randn(2, g + 42, 32, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = mixer.split_heads(x)
        at_init = CLEAR.attend(q, k, v, layout=layout, radius=2.5, down_factor=2)
        assert mixer(x, layout).shape == x.shape
        torch.testing.assert_close(mixer.core(q, k, v, layout=layout), at_init, atol=1e-12,
                                   rtol=1e-12)
        mixer.core.pool_weight.copy_(torch.randn(2, 2, generator=gen, dtype=torch.float64))
        learned = mixer.core(q, k, v, layout=layout)
    expected = naive_clear(q, k, v, grid, 2.5, g, 2, weight=mixer.core.pool_weight.detach())
    torch.testing.assert_close(learned, expected, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(learned, at_init)


def test_mixer_gradients_flow_on_cpu(gen):
    grid, g = (5, 6), 1
    mixer = CLEAR.mixer(32, 4, radius=2.0, down_factor=2)
    x = torch.randn(2, g + 30, 32, generator=gen, requires_grad=True)
    assert CLEAR.select("cpu", torch.float32, (2, 4, g + 30, 8), needs_grad=True) == "halo"
    mixer(x, attention.Layout(grid, text=g)).square().mean().backward()
    for name in ("core.pool_weight", "qkv.weight", "proj.weight"):
        grad = dict(mixer.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_pooling_alone_trains_with_frozen_projections(gen):
    """Only pool_weight requires grad: still a differentiable path on CPU, not flex."""
    mixer = CLEAR.mixer(32, 4, radius=2.0, down_factor=2)
    for p in (*mixer.qkv.parameters(), *mixer.proj.parameters()):
        p.requires_grad_(False)
    x = torch.randn(1, 30, 32, generator=gen)
    mixer(x, (5, 6)).sum().backward()
    assert mixer.core.pool_weight.grad is not None and mixer.core.pool_weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- official semantics


@pytest.mark.parametrize("impl", ["reference", "masked_sdpa"])
def test_down_factor_one_is_no_pooling(impl, gen):
    """The official meaning: 1 (the default of distill.py) and 0 append no pooled keys."""
    q, k, v = qkv(gen, 1, 2, 8 * 8, 16)
    none = CLEAR.attend(q, k, v, grid=(8, 8), radius=2.5, down_factor=0, impl=impl)
    one = CLEAR.attend(q, k, v, grid=(8, 8), radius=2.5, down_factor=1, impl=impl)
    torch.testing.assert_close(one, none, atol=0, rtol=0)
    assert clear.Window.of((8, 8), 2.5, 0, 1).pooled == 0
    assert clear.allowed_pairs((8, 8), 2.5, 0, 1) == clear.allowed_pairs((8, 8), 2.5)
    assert CLEAR.core(2, 16, down_factor=1).new_parameters() == []
    assert CLEAR.core(2, 16, down_factor=2).new_parameters() == ["pool_weight"]


def test_defaults_are_the_official_training_defaults():
    opts = CLEAR.resolve()
    assert opts["radius"] == 16.0 and opts["down_factor"] == 1
    sources = {o.name: o.source for o in CLEAR.options}
    assert "window_size 16" in sources["radius"] and "down_factor 1" in sources["down_factor"]


def test_density_is_the_windows_pairs_over_n_squared():
    grid, r = (16, 16), 3.0
    assert CLEAR.density(grid, radius=r) == clear.local_pairs(grid, r) / 256**2
    dense = CLEAR.density(grid, radius=100.0)
    assert dense == 1.0
    pooled = CLEAR.density(grid, radius=r, down_factor=4)  # + 16 pooled keys per image query
    assert pooled == pytest.approx((clear.local_pairs(grid, r) + 256 * 16) / 256**2)
    assert CLEAR.density(attention.Layout((16, 16)), radius=r) == CLEAR.density(grid, radius=r)
    text = CLEAR.density(attention.Layout((16, 16), text=4), radius=r)  # 4 rows + 4 columns
    assert text == pytest.approx((clear.local_pairs(grid, r) + 4 * 260 + 256 * 4) / 260**2)


def test_effective_options_and_rounding_warning():
    eff = CLEAR.effective_options((4, 4), radius=2.5, down_factor=8)
    assert eff["max_sq_distance"] == 6 and eff["pooled_tokens"] == 0
    assert "adds no pooled keys" in CLEAR.rounding_warning((4, 4), radius=2.5, down_factor=8)
    assert "covers the whole 4×4 grid" in CLEAR.rounding_warning((4, 4), radius=40.0)
    assert CLEAR.rounding_warning((32, 32), radius=8.0) is None


# --------------------------------------------------------------------------- layouts


def naive_layout_mask(layout, radius, radius_t=None) -> torch.Tensor:
    """``[N, N]`` bool straight from a layout, in its own token order (text first or last):
    text↔all, image→text and the cylinder ``dy² + dx² < r²``, ``|dt| ≤ radius_t``."""
    text = set(range(layout.tokens)[layout.text_slice])
    image = list(range(layout.tokens)[layout.image_slice])
    hg, wg = layout.frame_grid
    where = {i: divmod(p, hg * wg) for p, i in enumerate(image)}  # i -> (t, y·wg + x)
    n = layout.tokens
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i in text or j in text:
                mask[i, j] = True
                continue
            (qt, qr), (kt, kr) = where[i], where[j]
            (qy, qx), (ky, kx) = divmod(qr, wg), divmod(kr, wg)
            near = (qy - ky) ** 2 + (qx - kx) ** 2 < radius**2
            mask[i, j] = near and (radius_t is None or abs(qt - kt) <= radius_t)
    return mask


def masked_softmax(q, k, v, mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


LAYOUTS = [
    attention.Layout((5, 7), text=4),  # FLUX: text first
    attention.Layout((5, 7), text=4, text_first=False),  # SD3: text last
    attention.Layout((3, 4, 5)),  # video
    attention.Layout((3, 4, 5), text=3, text_first=False),  # video + text last
    attention.Layout((4, 3, 6), text=2),  # video + text first
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe().replace(" ", ""))
@pytest.mark.parametrize("radius_t", [None, 0, 1])
def test_every_path_is_the_definition_on_every_layout(layout, radius_t, gen):
    q, k, v = qkv(gen, 2, 2, layout.tokens, 8)
    expected = masked_softmax(q, k, v, naive_layout_mask(layout, 2.3, radius_t))
    for impl in ("reference", "masked_sdpa"):
        out = CLEAR.attend(q, k, v, layout=layout, radius=2.3, radius_t=radius_t, impl=impl)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe().replace(" ", ""))
def test_pair_counts_are_the_layout_mask_sums(layout):
    for radius_t in (None, 0, 1):
        mask = naive_layout_mask(layout, 2.3, radius_t)
        density = CLEAR.density(layout, radius=2.3, radius_t=radius_t)
        assert density == pytest.approx(int(mask.sum()) / layout.tokens**2, rel=1e-12)
        flops = CLEAR.flops(2, 3, layout.tokens, 8, layout, radius=2.3, radius_t=radius_t)
        assert flops.actual == 4 * 2 * 3 * 8 * int(mask.sum())


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe().replace(" ", ""))
def test_a_window_covering_every_layout_is_softmax(layout, gen):
    q, k, v = qkv(gen, 1, 2, layout.tokens, 8)
    expected = SOFTMAX.attend(q, k, v, layout=layout, impl="reference")
    for impl in ("reference", "masked_sdpa"):
        out = CLEAR.attend(q, k, v, layout=layout, radius=10.0, impl=impl)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert CLEAR.effective_options(layout, radius=10.0)["covers_grid"]
    assert CLEAR.density(layout, radius=10.0) == 1.0


def test_radius_t_zero_is_clear_frame_by_frame(gen):
    """With |dt| ≤ 0 each frame is an image of its own: CLEAR on each frame's grid."""
    layout = attention.Layout((3, 4, 5))
    q, k, v = qkv(gen, 1, 2, 60, 8)
    out = CLEAR.attend(q, k, v, layout=layout, radius=2.0, radius_t=0)
    for t in range(3):
        part = slice(20 * t, 20 * (t + 1))
        frame = CLEAR.attend(q[:, :, part], k[:, :, part], v[:, :, part], grid=(4, 5), radius=2.0)
        torch.testing.assert_close(out[:, :, part], frame, atol=1e-12, rtol=1e-12)


def test_retired_global_tokens_is_refused_with_its_replacement(gen):
    """The retired option names the layout's text count; rows that carry it still read."""
    q, k, v = qkv(gen, 1, 2, 3 + 30, 8)
    for call in (lambda: CLEAR.attend(q, k, v, grid=(5, 6), radius=2.0, global_tokens=3),
                 lambda: CLEAR.mixer(32, 2, global_tokens=3),
                 lambda: CLEAR.flops(1, 2, 33, 8, (5, 6), global_tokens=3)):
        with pytest.raises(ValueError, match=r"'global_tokens' is no longer taken: give the "
                                             r"text tokens in the layout, layout=Layout\(grid, "
                                             r"text=G\)"):
            call()
    with pytest.raises(ValueError, match="text=3 and a layout with 3 text tokens"):
        clear.Window.of(attention.Layout((5, 6), text=3), 2.0, 3)
    old_row = {"radius": 2.0, "global_tokens": 0, "radius_t": None, "down_factor": 1}
    assert CLEAR.stated_options({"radius": 2.0}, old_row) == {"radius": 2.0}
    assert CLEAR.stated_options({"global_tokens": 3}, old_row)["global_tokens"] == 3


def test_pooled_keys_on_video_are_refused_before_work(gen):
    q, k, v = qkv(gen, 1, 1, 2 * 8 * 8, 8)
    with pytest.raises(ValueError, match="down_factor=4 .pooled keys. is defined on image grids"):
        CLEAR.attend(q, k, v, layout=attention.Layout((2, 8, 8)), down_factor=4)
    with pytest.raises(ValueError, match="defined on image grids"):
        CLEAR.density(attention.Layout((2, 8, 8)), down_factor=4)


def test_video_rounding_says_what_radius_t_means():
    layout = attention.Layout((3, 4, 5))
    assert CLEAR.effective_options(layout, radius=2.0, radius_t=7)["max_frame_distance"] == 2
    assert "reaches every one of the 3 frames" in CLEAR.rounding_warning(
        layout, radius=2.0, radius_t=7)


@pytest.mark.skipif(FLEX_REASON is not None, reason=f"flex cannot run here: {FLEX_REASON}")
@pytest.mark.parametrize("layout", [attention.Layout((5, 44), text=20, text_first=False),
                                    attention.Layout((2, 4, 30), text=20)],
                         ids=["text-last-tiled", "video-text-first"])
def test_flex_on_layouts_matches_the_reference(layout, gen):
    """One shape (N = 240): one compile; the 44-wide grid runs in tile order."""
    q, k, v = qkv(gen, 1, 2, layout.tokens, 16)
    opts = {"radius": 3.2, "radius_t": 1}
    expected = CLEAR.attend(q, k, v, layout=layout, impl="reference", **opts)
    out = CLEAR.attend(q.float(), k.float(), v.float(), layout=layout, impl="flex", **opts)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------- high resolution


def test_high_resolution_options_are_off_by_default_and_stated():
    opts = CLEAR.resolve(mixer=True)
    assert opts["proportional_attention"] is False and opts["ntk_factor"] == 1.0
    assert "SDEdit" in " ".join(CLEAR.describe()["notes"])
    with pytest.raises(ValueError, match="ntk_factor.*DiT has none"):
        CLEAR.mixer(32, 2, ntk_factor=10)


@pytest.mark.parametrize("down_factor", [1, 2])
def test_proportional_attention_is_the_official_scale(down_factor, gen):
    """Huage001/CLEAR attention_processor.py, restated: scale = √(log_L(n) / d) with
    L = 64² + 512 and n the key count (10·n in the pooled processor)."""
    layout = attention.Layout((6, 6), text=4)
    d, n = 8, 40
    q, k, v = (torch.randn(1, 2, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    core = CLEAR.core(2, d, radius=2.0, down_factor=down_factor, proportional_attention=True,
                      impl="reference").double()
    plain = CLEAR.core(2, d, radius=2.0, down_factor=down_factor, impl="reference").double()
    keys = 10 * n if down_factor > 1 else n
    official = math.sqrt(math.log(keys, 64**2 + 512) / d)
    expected = plain(q * official * math.sqrt(d), k, v, layout=layout)
    torch.testing.assert_close(core(q, k, v, layout=layout), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(core(q, k, v, layout=layout), plain(q, k, v, layout=layout))


# --------------------------------------------------------------------------- halo path

HALO_CASES = [
    # (layout, options, forced tile side): boxes, partial tiles, text, pooled keys, video
    pytest.param(attention.Layout((13, 18)), {"radius": 3.5}, 4, id="13x18-r3.5-t4"),
    pytest.param(attention.Layout((13, 18), text=5), {"radius": 2.0}, 8, id="text-first-t8"),
    pytest.param(attention.Layout((12, 10), text=4, text_first=False), {"radius": 1.0}, 4,
                 id="text-last-r1-t4"),
    pytest.param(attention.Layout((10, 12)), {"radius": 2.5, "down_factor": 3}, 4,
                 id="pooled-t4"),
    pytest.param(attention.Layout((4, 9, 10)), {"radius": 2.5, "radius_t": 1}, 4,
                 id="video-reach1-t4"),
    pytest.param(attention.Layout((3, 9, 10), text=6), {"radius": 3.0}, 8, id="video-text-t8"),
    pytest.param(attention.Layout((3, 8, 8)), {"radius": 2.0, "radius_t": 0}, 4,
                 id="video-per-frame"),
    pytest.param(attention.Layout((9, 13)), {"radius": 100.0}, 4, id="covers-grid-t4"),
]


@pytest.mark.parametrize("layout, opts, side", HALO_CASES)
def test_halo_forward_and_backward_match_the_reference(layout, opts, side, gen, monkeypatch):
    """Forced tile sides (several tiles per axis, partial edge tiles, boxes past the
    grid's edges), several chunks: output and dq, dk, dv (and the pooling weights'
    gradient) against the float64 reference."""
    from attnbench.attention.clear import halo

    monkeypatch.setattr(halo, "TILE_SIDES", (side,))
    monkeypatch.setattr(halo, "WORKSPACE_MIN_BYTES", 1)  # one tile of one head per SDPA call
    monkeypatch.setattr(halo, "WORKSPACE_FRACTION", 1e-9)
    halo.halo_index.cache_clear()
    halo.halo_bias.cache_clear()
    f = opts.get("down_factor", 0)
    shape = (2, 2, layout.tokens, 8)
    inputs = qkv(gen, *shape)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    pool = torch.rand(f, f, generator=gen, dtype=torch.float64) if f > 1 else None
    grads = {}
    for impl in ("reference", "halo"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        extra = {}
        if pool is not None:
            extra["pool_weight"] = pool.clone().requires_grad_()
            leaves.append(extra["pool_weight"])
        out = CLEAR.attend(*leaves[:3], layout=layout, impl=impl, **opts, **extra)
        grads[impl] = (out, *torch.autograd.grad((out * weight).sum(), leaves))
    for got, want in zip(grads["halo"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    with torch.inference_mode():  # the chunks reuse one set of buffers
        out = CLEAR.attend(*inputs, layout=layout, impl="halo", **opts,
                           **({"pool_weight": pool} if pool is not None else {}))
    torch.testing.assert_close(out, grads["reference"][0], atol=1e-10, rtol=1e-10)
    halo.halo_index.cache_clear()
    halo.halo_bias.cache_clear()


def test_halo_tile_comes_from_the_cost_model(monkeypatch):
    """The tile grows with the radius and stops at the grid: not a constant; within the
    workspace budget the chosen tile's chunks fit it, and a tighter budget takes a
    smaller tile."""
    from attnbench.attention.clear import halo
    from attnbench.attention.clear.halo import choose_tile

    window = clear.Window.of((128, 128), 48.0)
    fitted = choose_tile(window, 3, 64, 4)
    chunk = fitted.chunking(3, 64, 4)
    per_head, per_tile = fitted.unit_bytes(64, 4)
    assert chunk.heads * chunk.tiles * per_head + chunk.tiles * per_tile <= \
        fitted.budget(3, 64, 4)
    monkeypatch.setattr(halo, "WORKSPACE_FRACTION", 1e3)  # the cost model alone
    assert choose_tile(window, 3, 64, 4).th > fitted.th

    def side(grid, radius):
        return choose_tile(clear.Window.of(grid, radius), 3, 64, 4).th

    assert side((128, 128), 2.0) < side((128, 128), 16.0) <= side((128, 128), 48.0)
    assert side((16, 16), 16.0) == 16  # one tile: the whole (small) grid
    tiling = choose_tile(clear.Window.of((128, 128), 16.0), 3, 64, 4)
    assert tiling.keys < 128 * 128 / 4  # the halo is a fraction of the keys at 2048 px


def test_halo_is_chosen_on_cpu_and_trains():
    assert CLEAR.select("cpu", torch.float32, (1, 2, 64, 16)) == "halo"
    assert CLEAR.select("cpu", torch.float32, (1, 2, 64, 16), needs_grad=True) == "halo"
    assert CLEAR.describe()["capabilities"]["halo"]["auto"] == ["cpu"]
