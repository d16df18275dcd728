"""The Triton kernels (LiT, SLA) against their references, and CLEAR's tile order.

Where the kernels run here: on a CUDA GPU, compiled (float32, float16,
bfloat16); on CPU, in Triton's interpreter (float32 and float16 -- its bfloat16
arithmetic is wrong). Triton decides interpreted-or-compiled when a kernel is
decorated, i.e. when ``attnbench.attention.{lit,sla}.triton`` is imported, so
the ``kernels`` fixture (module scope) sets ``TRITON_INTERPRET=1`` on CPU,
imports the kernel modules under it, and restores the environment afterwards.
Other tests of the same process are unaffected: outside this module the CPU
fast paths say "only under TRITON_INTERPRET=1" and the registry keeps choosing
the pure-torch paths. Without triton installed the kernel tests are skipped;
the CLEAR tests here need no triton.

Shapes are small (N ≤ 256) so the interpreter runs this file in a minute or two.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from attnbench import attention
from attnbench.attention import _triton, clear, lit, sla
from attnbench.attention.lit import linear_attention
from attnbench.attention.lit.reference import PHI_SHIFT
from tests.helpers import qkv

LIT = attention.get("lit")
SLA = attention.get("sla")
CLEAR = attention.get("clear")
HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# bfloat16 only compiled: the interpreter's bfloat16 arithmetic is wrong
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=_triton.INSTALL_HINT)


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules, interpreted on CPU (TRITON_INTERPRET=1 while this module runs)."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in (lit.TRITON_MODULE, sla.TRITON_MODULE):
            mode = _triton.loaded_mode(name)
            if mode is not None and mode == ON_GPU:
                pytest.skip(f"{name} was imported {'interpreted' if mode else 'compiled'} "
                            "earlier in this process")
        yield _triton.load(lit.TRITON_MODULE), _triton.load(sla.TRITON_MODULE)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _close(out, expected, dtype, scale=1.0):
    tol = TOL[dtype] * scale
    torch.testing.assert_close(out.double().cpu(), expected.cpu(), atol=tol, rtol=tol)


def _inputs(gen, b, h, n, d):
    return qkv(gen, b, h, n, d)  # float64, cast per test


def _on(x, dtype):
    return x.to(device=DEVICE, dtype=dtype)


# --------------------------------------------------------------------------- LiT


@needs_triton
def test_lit_head_tiles_and_splits(kernels):
    lit_triton, _ = kernels
    assert [lit_triton.head_tile(d) for d in (8, 40, 64, 72, 96, 128, 288)] == [
        16, 64, 64, 32, 32, 64, 32,
    ]  # fmt: skip
    cpu = torch.device("cpu")  # the interpreter: as few programs as possible
    assert lit_triton.split_plan(1000, 4, cpu) == (1, 1024)
    splits, chunk = lit_triton.split_plan(1000, 4, cpu, splits=3)
    assert chunk % lit_triton.SPLIT_GRANULE == 0 and (splits - 1) * chunk < 1000 <= splits * chunk


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "b, h, n, d, splits",
    [(2, 2, 200, 64, None), (1, 2, 117, 72, 3), (1, 1, 256, 16, 2), (1, 1, 5, 40, None)],
)
def test_lit_forward_matches_the_reference(kernels, b, h, n, d, splits, dtype, gen):
    lit_triton, _ = kernels
    q, k, v = _inputs(gen, b, h, n, d)
    expected = linear_attention(q, k, v, eps=1e-6)
    out, *_ = lit_triton.forward(_on(q, dtype), _on(k, dtype), _on(v, dtype), 1e-6,
                                 phi_shift=PHI_SHIFT, splits=splits)
    assert out.dtype == dtype and out.shape == q.shape
    _close(out, expected, dtype)


@needs_triton
def test_lit_kernel_follows_the_official_feature_map(kernels, gen):
    """A query row with every entry negative: ≈ the mean of V (not 0), as the reference;
    and phi_shift=0 is the plain ReLU kernel on both sides."""
    lit_triton, _ = kernels
    q, k, v = _inputs(gen, 1, 2, 64, 16)
    q[:, :, 7] = -q[:, :, 7].abs() - 0.1
    f32 = [_on(t, torch.float32) for t in (q, k, v)]
    out = lit_triton.linear_attention(*f32, eps=1e-6, phi_shift=PHI_SHIFT)
    expected = linear_attention(q, k, v, eps=1e-6)
    _close(out, expected, torch.float32)
    assert out[:, :, 7].abs().sum() > 0
    plain = lit_triton.linear_attention(*f32, eps=1e-6, phi_shift=0.0)
    _close(plain, linear_attention(q, k, v, eps=1e-6, phi_shift=0.0), torch.float32)
    assert (plain[:, :, 7] == 0).all()


@needs_triton
def test_lit_forward_takes_strided_inputs(kernels, gen):
    """q, k, v as the mixer makes them: views into one qkv projection, tokens not adjacent."""
    lit_triton, _ = kernels
    b, n, h, d = 2, 96, 2, 72
    qkv_proj = torch.randn(b, n, 3, h, d, generator=gen, dtype=torch.float64)
    q, k, v = qkv_proj.permute(2, 0, 3, 1, 4).unbind(0)
    f32 = [_on(t, torch.float32) for t in (q, k, v)]
    out = lit_triton.linear_attention(*f32, eps=1e-6, phi_shift=PHI_SHIFT)
    _close(out, linear_attention(q, k, v, eps=1e-6), torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b, h, n, d", [(2, 1, 96, 64), (1, 2, 150, 72)])
def test_lit_backward_matches_autograd(kernels, b, h, n, d, dtype, gen):
    lit_triton, _ = kernels
    q, k, v = (t.requires_grad_() for t in _inputs(gen, b, h, n, d))
    grad = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    linear_attention(q, k, v, eps=1e-6).backward(grad)
    leaves = [_on(t.detach(), dtype).requires_grad_() for t in (q, k, v)]
    lit_triton.linear_attention(*leaves, eps=1e-6, phi_shift=PHI_SHIFT).backward(
        _on(grad, dtype))
    for leaf, ref in zip(leaves, (q, k, v), strict=True):
        scale = ref.grad.abs().max().item()  # gradients are not O(1): compare relative to max
        _close(leaf.grad / scale, ref.grad / scale, dtype, scale=2.0)


@needs_triton
def test_lit_registry_picks_the_kernel_and_trains_through_it(kernels, gen):
    assert LIT.select(DEVICE, torch.float32, (1, 2, 64, 72), needs_grad=True) == "triton"
    mixer = LIT.mixer(144, 2).to(DEVICE)
    reference = LIT.mixer(144, 2, impl="reference").to(DEVICE)
    reference.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 64, 144, generator=gen).to(DEVICE)
    out, expected = mixer(x, (8, 8)), reference(x, (8, 8))
    _close(out, expected.double(), torch.float32, scale=5)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), r in zip(mixer.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-4, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------- SLA


@needs_triton
def test_sla_head_pieces(kernels):
    _, sla_triton = kernels
    assert [sla_triton.head_pieces(d) for d in (16, 40, 64, 72, 96, 128)] == [
        (16, 0), (64, 0), (64, 0), (64, 16), (64, 32), (64, 64),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="head_dim <= 128"):
        sla_triton.head_pieces(144)


def _sla_case(gen, b, h, n, d, bq, bkv, topk, dtype, **opts):
    q, k, v = _inputs(gen, b, h, n, d)
    indices = sla.block_indices(q, k, bq, bkv, topk)  # shared: both sides attend the same blocks
    options = {"block_q": bq, "block_kv": bkv, "eps": 1e-5, **opts}
    expected = sla.sla_reference_parts(q, k, v, indices, **options)
    return (_on(q, dtype), _on(k, dtype), _on(v, dtype), indices.to(DEVICE)), options, expected


@needs_triton
@pytest.mark.parametrize("correction", ["gemm", "output", "state"])
@pytest.mark.parametrize("linear_over", ["marginal", "all"])
@pytest.mark.parametrize("feature_map", ["softmax", "relu", "elu"])
def test_sla_parts_match_the_reference(kernels, feature_map, linear_over, correction, gen):
    _, sla_triton = kernels
    args, options, (o_s, o_l) = _sla_case(
        gen, 1, 2, 200, 72, 64, 64, 0.3, torch.float32,
        feature_map=feature_map, linear_over=linear_over,
    )  # fmt: skip
    out_s, out_l = sla_triton.sla_triton_parts(*args, correction=correction, **options)
    _close(out_s, o_s, torch.float32)
    _close(out_l, o_l, torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "b, h, n, d, bq, bkv, topk",
    [
        (2, 1, 256, 64, 64, 64, 0.25),  # whole blocks, DiT-S/B/L head dim
        (1, 2, 117, 72, 32, 48, 0.4),  # partial blocks, non-power-of-2 block, DiT-XL head dim
        (1, 1, 130, 16, 16, 16, 0.1),  # many small blocks, one selected of 9
    ],
)
def test_sla_parts_across_shapes_and_dtypes(kernels, b, h, n, d, bq, bkv, topk, dtype, gen):
    _, sla_triton = kernels
    args, options, (o_s, o_l) = _sla_case(
        gen, b, h, n, d, bq, bkv, topk, dtype, feature_map="softmax", linear_over="marginal"
    )
    out_s, out_l = sla_triton.sla_triton_parts(*args, **options, splits=2)
    assert out_s.dtype == out_l.dtype == dtype
    _close(out_s, o_s, dtype, scale=1.0 if dtype == torch.float32 else 2.0)
    _close(out_l, o_l, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("linear_over, correction",
                         [("all", "gemm"), ("marginal", "output"), ("marginal", "state")])
def test_sla_branches_and_corrections_in_every_dtype(kernels, linear_over, correction, dtype,
                                                     gen):
    """The GPU run times the kernel with the linear branch over all tokens (the official
    settings) in bfloat16: that branch and each correction, in every dtype of this device."""
    _, sla_triton = kernels
    args, options, (o_s, o_l) = _sla_case(
        gen, 1, 2, 117, 72, 32, 48, 0.4, dtype, feature_map="softmax", linear_over=linear_over,
    )  # fmt: skip
    out_s, out_l = sla_triton.sla_triton_parts(*args, correction=correction, **options)
    scale = 1.0 if dtype == torch.float32 else 2.0
    _close(out_s, o_s, dtype, scale=scale)
    _close(out_l, o_l, dtype, scale=scale)


@needs_triton
def test_sla_every_block_selected_has_no_linear_branch(kernels, gen):
    _, sla_triton = kernels
    args, options, (o_s, o_l) = _sla_case(
        gen, 1, 2, 200, 72, 64, 64, 1.0, torch.float32, feature_map="softmax",
        linear_over="marginal",
    )  # fmt: skip
    out_s, out_l = sla_triton.sla_triton_parts(*args, **options)
    assert not out_l.any() and not o_l.any()  # exactly zero, as the gather path
    _close(out_s, o_s, torch.float32)


@needs_triton
def test_sla_registry_picks_the_kernel_for_inference_only(kernels, gen):
    assert SLA.select(DEVICE, torch.float32, (1, 2, 128, 72)) == "triton"
    trains = "gather" if DEVICE.type == "cuda" else "batched"  # the CPU's torch path
    assert SLA.select(DEVICE, torch.float32, (1, 2, 128, 72), needs_grad=True) == trains
    q, k, v = (_on(t, torch.float32) for t in _inputs(gen, 1, 2, 128, 72))
    o_s, o_l = SLA.attend_parts(q, k, v, grid=(8, 16), topk=0.5)
    e_s, e_l = SLA.attend_parts(q, k, v, grid=(8, 16), topk=0.5, impl="gather")
    _close(o_s, e_s.double(), torch.float32)
    _close(o_l, e_l.double(), torch.float32)
    mixer = SLA.mixer(144, 2).to(DEVICE)
    x = torch.randn(1, 128, 144, generator=gen).to(DEVICE)
    with torch.no_grad():
        out = mixer(x, (8, 16))
    assert out.shape == x.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------- availability


@needs_triton
def test_availability_reasons(kernels):
    shape = (1, 2, 64, 72)
    assert "float64" in LIT.path_reasons(DEVICE, torch.float64, shape)["triton"]
    assert "head_dim <= 128" in SLA.path_reasons(DEVICE, torch.float32, (1, 2, 64, 200))["triton"]
    if not ON_GPU:
        assert "bfloat16" in LIT.path_reasons("cpu", torch.bfloat16, shape)["triton"]
        assert LIT.path_reasons("cpu", torch.float32, shape)["triton"] is None  # interpreter on
        # loaded interpreted here: the GPU must not run the interpreter unawares
        assert "interpreted" in LIT.path_reasons("cuda", torch.float16, shape)["triton"]


def test_without_the_interpreter_flag_cpu_keeps_the_torch_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = LIT.path_reasons("cpu", torch.float32, (1, 1, 16, 8))["triton"]
    assert reason and ("TRITON_INTERPRET=1" in reason or "not installed" in reason)
    assert LIT.select("cpu", torch.float32) == "chunked"
    assert SLA.select("cpu", torch.float32) == "batched"


# --------------------------------------------------------------------------- CLEAR tile order


def test_tile_permutation_orders_tiles_row_by_row():
    layout = clear.Window.of((3, 10), 2.0, text=2, down_factor=2)
    perm = clear.tile_permutation(layout)
    assert sorted(perm.tolist()) == list(range(layout.keys))
    assert perm[:2].tolist() == [0, 1] and perm[32:].tolist() == list(range(32, 37))
    grid = perm[2:32] - 2  # row-major indices of the 3×10 grid, in tile order (TILE = 8)
    first_tile = [y * 10 + x for y in range(3) for x in range(8)]
    second_tile = [y * 10 + x for y in range(3) for x in (8, 9)]
    assert grid.tolist() == first_tile + second_tile


@pytest.mark.parametrize(
    "grid, g, f, r", [((20, 44), 130, 4, 3.0), ((33, 41), 0, 0, 5.5), ((9, 70), 5, 3, 2.0)]
)
def test_tile_order_block_flags_are_the_permuted_mask_reduced(grid, g, f, r):
    layout = clear.Window.of(grid, r, g, f)
    perm = clear.tile_permutation(layout)
    partial, full = clear.flex._block_flags(layout, torch.device("cpu"), perm)
    mask = clear.dense_mask(grid, r, g, f)[perm[: layout.tokens]][:, perm]
    n, m, bs = layout.tokens, layout.keys, clear.FLEX_BLOCK
    padded = torch.zeros(-(-n // bs) * bs, -(-m // bs) * bs, dtype=torch.long)
    padded[:n, :m] = mask
    counts = padded.view(padded.shape[0] // bs, bs, -1, bs).sum(dim=(1, 3))
    assert torch.equal(full, counts == bs * bs)
    assert torch.equal(partial, (counts > 0) & (counts < bs * bs))


def test_tile_order_skips_more_blocks_at_64_by_64():
    """The issue's measurement: DiT-XL/2 at 1024 px is a 64×64 grid; r = 8."""
    row = 1 - clear.block_density((64, 64), 8.0)
    tiled = 1 - clear.block_density((64, 64), 8.0, tiled=True)
    assert row == pytest.approx(0.738, abs=1e-3)
    assert tiled == pytest.approx(0.785, abs=1e-3)
    layout = clear.Window.of((64, 64), 8.0)
    assert clear.flex_tile_order(layout)
    assert not clear.flex_tile_order(clear.Window.of((32, 32), 8.0))  # row order skips more
    built = clear.block_mask((64, 64), 8.0, tiled=True)
    assert clear.block_mask((64, 64), 8.0, tiled=True) is built  # cached per layout


FLEX_REASON = CLEAR.path_reasons("cpu", torch.float32, (1, 2, 1000, 64))["flex"]


@pytest.mark.skipif(FLEX_REASON is not None, reason=f"flex: {FLEX_REASON}")
def test_flex_in_tile_order_matches_the_reference(gen):
    grid, opts = attention.Layout((17, 40), text=3), {"radius": 3.5, "down_factor": 4}
    n = 3 + 17 * 40
    assert clear.flex_tile_order(clear.Window.of(grid, **opts))
    q, k, v = qkv(gen, 1, 2, n, 64)
    expected = CLEAR.reference(q, k, v, layout=grid, **opts)
    out = CLEAR.attend(q.float(), k.float(), v.float(), layout=grid, impl="flex", **opts)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    steps = CLEAR.overhead_steps(q.float(), k.float(), v.float(), layout=grid, impl="flex",
                                 **opts)
    assert set(steps) == {"pool_kv", "block_mask", "tile_permute"}
    k_tiles, _, back = steps["tile_permute"]()
    assert torch.equal(back, q.float()) and k_tiles.shape[2] == n + 4 * 10
