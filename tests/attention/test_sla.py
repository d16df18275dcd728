"""SLA: the block selection, the naive reference, the gather path, the mixer, the cost model.

The reference is itself checked against a per-query loop written from the
paper's formulas, the block map against a brute-force loop, and the gather
path against the float64 reference across the shapes that break block code
(partial last blocks, unequal block sizes, head dim 72, batch > 1).
"""

from __future__ import annotations

import pytest
import torch

from attnbench import attention
from attnbench.attention import Layout
from attnbench.attention import sla as sla_module
from attnbench.bench.flops import count_flops
from tests.helpers import qkv

SLA = attention.get("sla")
SOFTMAX = attention.get("softmax")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}

# (batch, heads, grid, head_dim, options): partial blocks, non-square grids, several blocks
CASES = [
    pytest.param(2, 3, (5, 7), 64, {}, id="N35-one-partial-block"),
    pytest.param(1, 2, (9, 13), 72, {}, id="N117-d72"),
    pytest.param(2, 1, (16, 8), 64, {"topk": 0.5}, id="N128-whole-blocks"),
    pytest.param(2, 2, (12, 25), 32, {"topk": 0.4}, id="N300-5-blocks"),
    pytest.param(1, 2, (10, 23), 16, {"topk": 0.3, "block_q": 32, "block_kv": 24}, id="unequal"),
]


def _options(**given):
    return SLA.resolve(given)


def _naive_block_logits(q, k, block_q, block_kv):
    """Pooled-q · pooled-centred-k / √d from explicit loops over blocks and valid tokens."""
    b, h, n, d = q.shape
    nq, nk = -(-n // block_q), -(-n // block_kv)
    out = torch.empty(b, h, nq, nk, dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            mu = sum(k[bi, hi, t] for t in range(n)) / n
            for i in range(nq):
                rows = range(i * block_q, min(n, (i + 1) * block_q))
                pq = sum(q[bi, hi, t] for t in rows) / len(rows)
                for j in range(nk):
                    cols = range(j * block_kv, min(n, (j + 1) * block_kv))
                    pk = sum(k[bi, hi, t] - mu for t in cols) / len(cols)
                    out[bi, hi, i, j] = (pq @ pk) / d**0.5
    return out


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "kv_blocks, topk, expected",
    # 0.29 of 100: the official int(0.29·100) = 28 (the float product is 28.999...)
    [(4, 0.05, 1), (1, 0.05, 1), (10, 0.3, 3), (100, 0.29, 28), (20, 0.999, 19), (20, 1.0, 20)],
)
def test_selected_count_rounds_down_but_keeps_one(kv_blocks, topk, expected):
    assert sla_module.selected_count(kv_blocks, topk) == expected


def test_kept_blocks_are_the_official_count_except_zero():
    """thu-ml/SLA utils.py get_block_map: topk = min(K, int(topk_ratio * K)), restated;
    attnbench keeps 1 where it gives 0, and the row's effective options say so."""
    for kv_blocks in (1, 3, 7, 10, 33, 64, 100, 257):
        for topk in [i / 100 for i in range(1, 101)]:
            official = min(kv_blocks, int(topk * kv_blocks))
            assert sla_module.selected_count(kv_blocks, topk) == max(1, official)
    eff = SLA.effective_options((10, 10), topk=0.1, block_q=16, block_kv=16)  # 7 blocks
    assert eff["kept_blocks"] == 1 and eff["official_kept_blocks"] == 0
    assert "official_kept_blocks" not in SLA.effective_options((10, 10), topk=0.5)


@pytest.mark.parametrize("block_q, block_kv, topk", [(8, 8, 0.3), (16, 7, 0.5), (5, 1, 0.29)])
def test_block_map_against_a_brute_force_loop(block_q, block_kv, topk, gen):
    q, k, _ = qkv(gen, 2, 2, 100, 8)
    k = k + 3.0  # an offset for centring to remove
    naive = _naive_block_logits(q, k, block_q, block_kv)
    logits = sla_module.block_logits(q, k, block_q, block_kv)
    torch.testing.assert_close(logits, naive, atol=1e-12, rtol=1e-12)

    selected = sla_module.block_map(q, k, block_q, block_kv, topk)
    nk = -(-100 // block_kv)
    kk = sla_module.selected_count(nk, topk)
    assert selected.shape == naive.shape and selected.dtype == torch.bool
    assert (selected.sum(-1) == kk).all()
    # the kept blocks are the kk best of the naive scores: every kept ≥ every dropped
    kept_min = naive.masked_fill(~selected, float("inf")).amin(-1)
    dropped_max = naive.masked_fill(selected, float("-inf")).amax(-1)
    assert (kept_min >= dropped_max).all()
    # the indices and the map agree; the softmax scores select the same blocks
    indices = sla_module.block_indices(q, k, block_q, block_kv, topk)
    assert torch.equal(sla_module.indices_to_map(indices, nk), selected)
    assert (indices.diff(dim=-1) > 0).all()
    scores = sla_module.block_scores(q, k, block_q, block_kv)
    torch.testing.assert_close(scores.sum(-1), torch.ones_like(scores[..., 0]))
    assert torch.equal(scores.topk(kk, dim=-1).indices.sort(-1).values, indices)


def test_block_logits_centre_k(gen):
    """Centred k: the logits ignore a shift shared by all keys (uncentred ones would not)."""
    q, k, _ = qkv(gen, 1, 2, 70, 8)
    shift = torch.randn(8, generator=gen, dtype=torch.float64) * 10
    torch.testing.assert_close(
        sla_module.block_logits(q, k + shift, 16, 16), sla_module.block_logits(q, k, 16, 16)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_block_logits_from_their_definition(dtype, gen):
    """pool(q)·pool(k − k̄)ᵀ/√d with explicit float64 copies, partial last blocks included."""
    q, k, _ = qkv(gen, 2, 3, 70, 8, dtype=dtype)
    q64, k64 = q.double(), k.double()
    centred = k64 - k64.mean(dim=-2, keepdim=True)
    expected = (sla_module.mean_pool(q64, 16) @ sla_module.mean_pool(centred, 12).mT) / 8**0.5
    got = sla_module.block_logits(q, k, 16, 12)
    assert got.dtype == (torch.float32 if dtype == torch.bfloat16 else torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def test_mean_pool_divides_a_partial_block_by_its_tokens():
    x = torch.arange(10, dtype=torch.float64).reshape(1, 1, 10, 1)
    pooled = sla_module.mean_pool(x, 4)
    assert pooled.flatten().tolist() == [1.5, 5.5, 8.5]


# --------------------------------------------------------------------------- reference


def _sla_from_definition(q, k, v, selected, block_q, block_kv, phi, linear_over, eps):
    """One query at a time: softmax over its critical keys + linear over the others (or all)."""
    n = q.shape[2]
    out = torch.empty_like(q)
    key_block = torch.arange(n) // block_kv
    for i in range(n):
        critical = selected[:, :, i // block_q][..., key_block]  # [B, H, N] keys
        scores = (q[:, :, i : i + 1] @ k.transpose(-1, -2))[:, :, 0] / q.shape[-1] ** 0.5
        p = torch.softmax(scores.masked_fill(~critical, float("-inf")), dim=-1)
        o_s = (p.unsqueeze(-1) * v).sum(2)
        w = (phi(q[:, :, i : i + 1]) * phi(k)).sum(-1)  # [B, H, N]
        if linear_over == "marginal":
            w = w * ~critical
        o_l = (w.unsqueeze(-1) * v).sum(2) / (w.sum(-1, keepdim=True) + eps)
        out[:, :, i] = o_s + o_l
    return out


@pytest.mark.parametrize("linear_over", ["marginal", "all"])
@pytest.mark.parametrize("feature_map", ["softmax", "relu", "elu"])
def test_reference_from_its_definition(feature_map, linear_over, gen):
    q, k, v = qkv(gen, 2, 2, 45, 8)
    opts = _options(
        topk=0.4, block_q=8, block_kv=10, feature_map=feature_map, linear_over=linear_over,
        order="row-major",
    )
    selected = sla_module.block_map(q, k, 8, 10, 0.4)
    phi = sla_module.FEATURE_MAPS[feature_map]
    expected = _sla_from_definition(q, k, v, selected, 8, 10, phi, linear_over, opts["eps"])
    out = SLA.reference(q, k, v, grid=(5, 9), **opts)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_feature_maps():
    x = torch.tensor([[-1.0, 0.0, 2.0]], dtype=torch.float64)
    maps = sla_module.FEATURE_MAPS
    torch.testing.assert_close(maps["softmax"](x), torch.softmax(x, -1))
    assert maps["relu"](x).tolist() == [[0.0, 0.0, 2.0]]
    torch.testing.assert_close(maps["elu"](x), torch.nn.functional.elu(x) + 1)
    assert (maps["elu"](x) > 0).all()


@pytest.mark.parametrize("linear_over", ["marginal", "all"])
def test_reference_chunks_query_blocks(linear_over, gen, monkeypatch):
    q, k, v = qkv(gen, 2, 2, 150, 8)
    opts = _options(topk=0.5, block_q=16, block_kv=16, linear_over=linear_over)
    whole = SLA.reference(q, k, v, grid=(10, 15), **opts)
    # 2 blocks per chunk
    monkeypatch.setattr(sla_module.reference, "REFERENCE_CHUNK_ELEMENTS", 2 * 2 * 150 * 40)
    chunked = SLA.reference(q, k, v, grid=(10, 15), **opts)
    torch.testing.assert_close(chunked, whole, atol=1e-13, rtol=1e-13)


# --------------------------------------------------------------------------- limiting cases


@pytest.mark.parametrize("impl", ["reference", "gather"])
@pytest.mark.parametrize(
    "b, h, grid, d, blocks",
    [(1, 2, (10, 20), 32, (64, 64)), (2, 1, (9, 13), 72, (32, 48)), (2, 2, (8, 8), 64, (64, 64))],
)
def test_every_block_selected_is_softmax(impl, b, h, grid, d, blocks, gen):
    n = grid[0] * grid[1]
    q, k, v = qkv(gen, b, h, n, d)
    expected = SOFTMAX.attend(q, k, v, grid=grid, impl="reference")
    out = SLA.attend(q, k, v, grid=grid, impl=impl, topk=1.0, block_q=blocks[0], block_kv=blocks[1],
                     linear_over="marginal")
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_every_block_selected_is_softmax_in_float32(gen):
    """An empty marginal set gives O_l = 0 exactly (the gather path skips the branch)."""
    q, k, v = qkv(gen, 2, 2, 300, 32)
    expected = SOFTMAX.attend(q, k, v, grid=(15, 20), impl="reference")
    q, k, v = q.float(), k.float(), v.float()
    o_s, o_l = SLA.attend_parts(q, k, v, grid=(15, 20), impl="gather", topk=1.0,
                                linear_over="marginal")
    assert not o_l.any()
    torch.testing.assert_close(o_s.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["reference", "gather"])
def test_every_block_selected_over_all_is_softmax_plus_linear(impl, gen):
    q, k, v = qkv(gen, 2, 2, 100, 16)
    eps = 1e-5
    fq, fk = torch.softmax(q, -1), torch.softmax(k, -1)
    linear = (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(2).unsqueeze(-1) + eps)
    expected = SOFTMAX.attend(q, k, v, grid=(10, 10), impl="reference") + linear
    out = SLA.attend(q, k, v, grid=(10, 10), impl=impl, topk=1.0, linear_over="all")
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------- gather path


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("b, h, grid, d, given", CASES)
def test_gather_matches_float64_reference(b, h, grid, d, given, dtype, gen):
    n = grid[0] * grid[1]
    q, k, v = qkv(gen, b, h, n, d)
    expected = SLA.reference(q, k, v, grid=grid, **_options(**given))
    out = SLA.attend(q.to(dtype), k.to(dtype), v.to(dtype), grid=grid, impl="gather", **given)
    assert out.shape == q.shape and out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("linear_over", ["marginal", "all"])
@pytest.mark.parametrize("feature_map", ["softmax", "relu", "elu"])
def test_gather_parts_match_reference_parts(feature_map, linear_over, gen):
    """O_s and O_l apart, from one shared selection, for every φ and both variants."""
    q, k, v = qkv(gen, 2, 2, 150, 24)
    opts = _options(
        topk=0.4, block_q=16, block_kv=32, feature_map=feature_map, linear_over=linear_over
    )
    got = SLA.attend_parts(q, k, v, grid=(10, 15), impl="gather", **opts)
    want = SLA.attend_parts(q, k, v, grid=(10, 15), impl="reference", **opts)
    for part, expected in zip(got, want, strict=True):
        torch.testing.assert_close(part, expected, atol=1e-12, rtol=1e-12)
    assert want[1].abs().max() > 1e-3  # the linear branch is really there


def test_gather_chunks_query_blocks(gen, monkeypatch):
    q, k, v = qkv(gen, 1, 2, 200, 8)
    opts = {"topk": 0.5, "block_q": 16, "block_kv": 16}
    whole = SLA.attend(q, k, v, grid=(10, 20), impl="gather", **opts)
    monkeypatch.setattr(sla_module.gather, "GATHER_CHUNK_ELEMENTS", 1)  # one query block per chunk
    assert sla_module.gather_chunk_blocks(1, 2, 6, 16, 8) == 1
    chunked = SLA.attend(q, k, v, grid=(10, 20), impl="gather", **opts)
    torch.testing.assert_close(chunked, whole, atol=1e-13, rtol=1e-13)


def test_gather_gradients_match_reference(gen):
    q, k, v = (t.requires_grad_() for t in qkv(gen, 2, 2, 150, 16))
    weight = torch.randn(2, 2, 150, 16, generator=gen, dtype=torch.float64)
    grads = {}
    for impl in ("reference", "gather"):
        out = SLA.attend(q, k, v, grid=(10, 15), impl=impl, topk=0.4, block_q=32, block_kv=32)
        grads[impl] = torch.autograd.grad((out * weight).sum(), (q, k, v))
    for got, want in zip(grads["gather"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert SLA.select("cpu", torch.float32, needs_grad=True) == "batched"
    assert SLA.select("cuda", torch.float32, needs_grad=True) == "gather"


# --------------------------------------------------------------------------- batched path

BATCHED_LAYOUTS = [
    Layout((10, 15)),
    Layout((6, 9), text=7),
    Layout((6, 9), text=7, text_first=False),
    Layout((3, 4, 5)),
    Layout((2, 4, 6), text=12, text_first=False),
]


@pytest.mark.parametrize("order", ["row-major", "tiles"])
@pytest.mark.parametrize("layout", BATCHED_LAYOUTS, ids=lambda lay: lay.describe())
@pytest.mark.parametrize("feature_map, linear_over", [("softmax", "marginal"), ("relu", "all"),
                                                      ("elu", "marginal")])
def test_batched_parts_match_reference_parts(order, layout, feature_map, linear_over, gen,
                                             monkeypatch):
    """O_s and O_l of the batched path, forward and backward, in both token orders, every
    layout kind, partial last blocks of queries and keys, several chunks of query blocks
    (of 3 blocks: chunks that span heads) and runs of one head's tokens in the total
    state's sum; without autograd, the steps' buffers carved from one."""
    monkeypatch.setattr(sla_module.batched, "chunk_blocks", lambda *_: 3)  # query blocks
    monkeypatch.setattr(sla_module.batched, "state_tokens", lambda *_: 7)  # keys per step
    n = layout.tokens
    q, k, v = (t.requires_grad_() for t in qkv(gen, 2, 2, n, 8))
    opts = _options(topk=0.4, block_q=16, block_kv=12, feature_map=feature_map,
                    linear_over=linear_over, order=order)
    weights = [torch.randn(2, 2, n, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    results = {}
    for impl in ("batched", "reference"):
        parts = SLA.attend_parts(q, k, v, layout=layout, impl=impl, **opts)
        loss = sum((p * w).sum() for p, w in zip(parts, weights, strict=True))
        results[impl] = (*parts, *torch.autograd.grad(loss, (q, k, v)))
    for got, want in zip(results["batched"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-11)
    assert results["reference"][1].abs().max() > 1e-3  # the linear branch is really there
    whole = SLA.attend(q, k, v, layout=layout, impl="batched", **opts)
    torch.testing.assert_close(whole, results["batched"][0] + results["batched"][1],
                               atol=1e-13, rtol=1e-13)
    with torch.inference_mode():
        reused = SLA.attend(q, k, v, layout=layout, impl="batched", **opts)
    torch.testing.assert_close(reused, whole, atol=1e-13, rtol=1e-13)


def test_batched_with_every_block_selected_has_no_linear_branch(gen):
    q, k, v = (t.float() for t in qkv(gen, 2, 2, 300, 32))
    o_s, o_l = SLA.attend_parts(q, k, v, grid=(15, 20), impl="batched", topk=1.0,
                                  linear_over="marginal")
    assert not o_l.any()
    expected = SOFTMAX.attend(q.double(), k.double(), v.double(), grid=(15, 20))
    torch.testing.assert_close(o_s.double(), expected, atol=2e-5, rtol=2e-5)


def test_batched_memory_is_a_fraction_of_gathers():
    """DiT-Ti/2 at 2048 px: the batched path keeps chunks and a d×d state, not the gather
    path's per-block states and padded copies."""
    args = dict(grid=(128, 128), element_size=4, topk=0.05, order="row-major")
    n, io = 128 * 128, 4 * 3 * 128 * 128 * 64 * 4
    batched = SLA.memory(1, 3, n, 64, impl="batched", **args)
    gather = SLA.memory(1, 3, n, 64, impl="gather", **args)
    assert batched.workspace < io / 4 < gather.workspace


def test_gather_in_bfloat16(gen):
    q, k, v = qkv(gen, 1, 2, 256, 64)
    expected = SLA.reference(q, k, v, grid=(16, 16), **_options(topk=0.5))
    out = SLA.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), grid=(16, 16), topk=0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


def test_gather_never_forms_the_n_by_n_matrix(gen):
    """65,536 tokens: an N×N float32 score matrix would need 16 GiB; the gather path ~30 MiB."""
    q, k, v = (torch.randn(1, 1, 256 * 256, 8, generator=gen) for _ in range(3))
    out = SLA.attend(q, k, v, grid=(256, 256), topk=0.01)
    assert out.shape == q.shape and torch.isfinite(out).all()
    for impl in ("fast", "reference"):
        assert SLA.memory(1, 1, 256 * 256, 8, topk=0.01, impl=impl).workspace < 256**4 * 4 / 16


def test_memory_model_follows_the_path_that_runs():
    """DiT-XL/2 at 8192 px in bf16: the Triton kernel keeps per-block states and the
    selection for its "gemm" correction, never the gather path's padded copies."""
    args = dict(grid=(512, 512), element_size=2, topk=0.05, linear_over="marginal")
    n = 512 * 512
    triton = SLA.memory(1, 16, n, 72, impl="triton", **args)
    gather = SLA.memory(1, 16, n, 72, impl="gather", **args)
    assert SLA.memory(1, 16, n, 72, impl="fast", **args) == triton  # the first fast path
    nq = nk = n // 64
    corrections = 16 * ((nk + nq) * (72 * 72 + 72) + nq * nk) * 2
    assert corrections < triton.workspace < gather.workspace
    with pytest.raises(ValueError, match="unknown implementation 'flex'"):
        SLA.memory(1, 16, n, 72, impl="flex", **args)


# --------------------------------------------------------------------------- mixer


def test_mixer_zero_init_is_block_sparse_attention(gen):
    torch.manual_seed(0)
    mixer = SLA.mixer(64, 2, topk=0.4, block_q=16, block_kv=16).double()
    assert mixer.core.proj_l.weight.shape == (32, 32) and mixer.core.proj_l.bias.shape == (32,)
    assert mixer.new_parameters() == ["core.proj_l.weight", "core.proj_l.bias"]
    x = torch.randn(2, 10 * 12, 64, generator=gen, dtype=torch.float64)
    q, k, v = mixer.split_heads(x)
    o_s, o_l = SLA.attend_parts(q, k, v, grid=(10, 12), topk=0.4, block_q=16, block_kv=16)
    assert o_l.abs().max() > 1e-3
    sparse_only = mixer.proj(o_s.transpose(1, 2).reshape(2, 120, 64))
    torch.testing.assert_close(mixer(x, (10, 12)), sparse_only, atol=1e-12, rtol=1e-12)

    # a model's own init (DiT: Xavier on every Linear) is undone by reset_new_parameters
    torch.nn.init.xavier_uniform_(mixer.core.proj_l.weight)
    torch.nn.init.normal_(mixer.core.proj_l.bias)
    with_linear = mixer.proj((o_s + mixer.core.proj_l(o_l)).transpose(1, 2).reshape(2, 120, 64))
    torch.testing.assert_close(mixer(x, (10, 12)), with_linear, atol=1e-12, rtol=1e-12)
    mixer.reset_new_parameters()
    assert not mixer.core.proj_l.weight.any() and not mixer.core.proj_l.bias.any()
    assert mixer.inheritable_parameters() == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]


def test_mixer_gradients_flow_through_the_cpu_path(gen):
    mixer = SLA.mixer(64, 2, topk=0.4, block_q=16, block_kv=16)
    x = torch.randn(2, 100, 64, generator=gen)
    calls = []
    original = sla_module.PARTS["batched"]
    sla_module.PARTS["batched"] = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        mixer(x, (10, 10)).square().sum().backward()
    finally:
        sla_module.PARTS["batched"] = original
    assert calls, "the mixer must run the batched path on CPU when gradients are needed"
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"no gradient reaches {name}"


# --------------------------------------------------------------------------- cost model


@pytest.mark.parametrize(
    "grid, given",
    [
        ((16, 16), {}),  # 4 blocks, kk = 1
        ((9, 13), {"topk": 0.5, "block_kv": 32}),  # partial blocks: counted padded
        ((10, 20), {"topk": 0.4, "block_q": 32, "block_kv": 48, "linear_over": "all"}),
        ((8, 16), {"topk": 1.0}),  # marginal set empty: no linear branch
        ((8, 16), {"topk": 1.0, "linear_over": "all"}),
    ],
)
def test_flop_model_equals_the_counted_gather_path(grid, given, gen):
    n = grid[0] * grid[1]
    q, k, v = qkv(gen, 2, 3, n, 24, dtype=torch.float32)
    counted = count_flops(SLA.attend, q, k, v, grid=grid, impl="gather", **given)
    model = SLA.flops(2, 3, n, 24, grid=grid, **given)
    assert counted == model.actual
    assert model.dense == 4 * 2 * 3 * n * n * 24
    opts = _options(**given)
    nq, nk = -(-n // opts["block_q"]), -(-n // opts["block_kv"])
    assert model.overhead == 2 * 2 * 3 * nq * nk * 24
    overhead = count_flops(SLA.block_map, q, k, **given)
    assert overhead == model.overhead


def test_flops_at_paper_sparsity():
    """At 5% of 512 blocks the sparse part is 5% of dense; scoring and linear add a little."""
    flops = SLA.flops(1, 12, 32768, 128, grid=(128, 256))
    sparse = 4 * 12 * 32768 * (25 * 64) * 128
    assert flops.actual > sparse and flops.ratio < 0.06
    assert SLA.flops(1, 12, 32768, 128, grid=(128, 256), topk=1.0,
                     linear_over="marginal").ratio == pytest.approx(1.0, rel=1e-3)


def test_memory_models():
    fast = SLA.memory(1, 16, 4096, 72)
    ref = SLA.memory(1, 16, 4096, 72, impl="reference")
    assert 0 < fast.workspace < ref.workspace
    assert fast.io == 4 * 16 * 4096 * 72 * 2


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "given, message",
    [
        ({"topk": 0}, r"'topk'=0.0: must lie in \(0, 1\]"),
        ({"topk": -0.1}, "topk"),
        ({"topk": 1.5}, "topk"),
        ({"feature_map": "hedgehog"}, r"feature_map.*\['softmax', 'relu', 'elu'\]"),
        ({"linear_over": "none"}, "linear_over.*marginal"),
        ({"block_q": 0}, "'block_q'=0: must be > 0"),
        ({"block_kv": -64}, "block_kv"),
        ({"block_q": 1.5}, "block_q.*integer"),
        ({"eps": 0}, "eps"),
        ({"topkk": 0.1}, "unknown option 'topkk'.*'topk'"),
    ],
)
def test_invalid_options_raise(given, message, gen):
    q, k, v = qkv(gen, 1, 1, 16, 8)
    with pytest.raises(ValueError, match=message):
        SLA.attend(q, k, v, grid=(4, 4), **given)
    with pytest.raises(ValueError, match=message):
        SLA.mixer(16, 2, **given)
    with pytest.raises(ValueError, match=message):
        SLA.flops(1, 1, 16, 8, **given)


def test_describe_and_paths():
    info = SLA.describe()
    assert info["paper"] == "Zhang et al., SLA, arXiv 2509.24006"
    # the Triton kernel first (preferred where it runs), the pure-torch paths after it
    assert info["implementations"] == ["reference", "triton", "batched", "gather"]
    assert info["capabilities"]["batched"]["auto"] == ["cpu"]
    defaults = {o["name"]: o["default"] for o in info["options"]}
    assert defaults == {
        "topk": 0.05,
        "block_q": 64,
        "block_kv": 64,
        "feature_map": "softmax",
        "linear_over": "all",  # the official main branch (was "marginal", the paper's)
        "eps": 1e-5,
        "order": "row-major",  # the official order (was attnbench's tiles)
    }


# --------------------------------------------------------------------------- honest labels


def test_kept_blocks_density_and_the_rounding_warning():
    """topk=0.05 at 256 tokens (4 blocks of 64) keeps 1 block: 25%, not 5%."""
    sla = attention.get("sla")
    eff = sla.effective_options((16, 16))
    assert (eff["kv_blocks"], eff["kept_blocks"], eff["effective_topk"]) == (4, 1, 0.25)
    assert sla.density((16, 16)) == 0.25
    assert sla.rounding_warning((16, 16)) == "sla:topk=0.05 keeps 1 of 4 blocks (25%)"
    assert sla.rounding_warning((160, 160), topk=0.05) is None  # 400 blocks: 20 kept = 5%
    assert sla.density((160, 160)) == pytest.approx(0.05)
    assert sla.density((16, 16), topk=1.0) == 1.0
    # a partial last block (N = 100: blocks of 64 and 36) counts its real tokens
    assert sla.density((10, 10), topk=0.5) == pytest.approx(1 * (64 + 36) / 2 / 100)


def test_recipe_sources_say_when_they_are_attnbench_s_choice():
    sla = attention.get("sla")
    # SLA's recipe is TurboDiffusion's (published); attnbench's earlier one is a variant
    assert "TurboDiffusion" in sla.distill_recipe.source
    assert "attnbench's choice" in sla.distill_alternatives[0].source
    assert sla.conversion_recipe.inherit_projections


# --------------------------------------------------------------------------- layouts

Layout = attention.Layout


def _naive_order(layout, tile):
    """SLA's order built by sorting explicit (patch, position-in-patch) keys; text last."""
    pt, ph, pw = tile
    t, (h, w) = layout.frames, layout.frame_grid
    text = layout.text if layout.text_first else 0
    keys = []
    for f in range(t):
        for y in range(h):
            for x in range(w):
                patch = (f // pt, y // ph, x // pw)
                keys.append((patch, (f % pt, y % ph, x % pw), text + (f * h + y) * w + x))
    image = [i for _, _, i in sorted(keys)]
    return torch.tensor(image + list(range(text)))


@pytest.mark.parametrize("layout, block, tile", [
    (Layout((16, 16)), 64, (1, 8, 8)),
    (Layout((9, 13), text=5), 64, (1, 8, 8)),
    (Layout((4, 8, 8)), 64, (4, 4, 4)),
    (Layout((2, 8, 8)), 64, (1, 8, 8)),  # fewer frames than the cube: tiles per frame
    (Layout((5, 6, 7), text=3), 32, (2, 2, 2)),
])
def test_token_order_is_tiles_or_cubes_then_text(layout, block, tile):
    from attnbench.attention.sla import order

    assert order.patch_shape(layout, block) == tile
    got = order.token_order(layout, "attnbench-tiles", block, "cpu")
    expected = _naive_order(layout, tile)
    perm = torch.arange(layout.tokens) if got is None else got[0]
    assert torch.equal(perm, expected)
    if got is not None:
        assert torch.equal(got[0][got[1]], torch.arange(layout.tokens))
    assert order.token_order(layout, "row-major", block, "cpu") is None


def test_a_block_of_the_order_is_an_8x8_tile_and_text_has_its_own_blocks():
    from attnbench.attention.sla import order

    layout = Layout((16, 16), text=64)  # text first in the layout, last in SLA's order
    perm, _ = order.token_order(layout, "attnbench-tiles", 64, "cpu")
    first = perm[:64] - 64
    assert set((first // 16).tolist()) == set(range(8)) and set((first % 16).tolist()) == set(
        range(8))
    assert torch.equal(perm[-64:], torch.arange(64))


LAYOUTS = [Layout((6, 9), text=10), Layout((6, 9), text=10, text_first=False),
           Layout((3, 4, 5)), Layout((4, 4, 4), text=6, text_first=False)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe().replace(" ", ""))
@pytest.mark.parametrize("order", ["attnbench-tiles", "row-major"])
def test_every_block_selected_is_softmax_on_every_layout(layout, order, gen):
    q, k, v = qkv(gen, 2, 2, layout.tokens, 8)
    expected = attention.get("softmax").attend(q, k, v, layout=layout, impl="reference")
    for impl in ("reference", "gather"):
        out = SLA.attend(q, k, v, layout=layout, topk=1.0, block_q=16, block_kv=16, order=order,
                         impl=impl, linear_over="marginal")
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe().replace(" ", ""))
def test_tiles_are_row_major_sla_on_the_reordered_tokens(layout, gen):
    """Built independently: move the text first, permute by the naive order, run SLA in
    the given order, permute back, move the text back."""
    q, k, v = qkv(gen, 1, 2, layout.tokens, 8)
    opts = {"topk": 0.4, "block_q": 16, "block_kv": 16, "order": "attnbench-tiles"}
    perm = _naive_order(layout.text_first_form, (1, 4, 4) if not layout.is_video else
                        order_patch(layout))
    text_first = [layout.to_text_first(t) for t in (q, k, v)]
    qp, kp, vp = (t[:, :, perm] for t in text_first)
    plain = SLA.attend(qp, kp, vp, grid=(layout.tokens, 1), impl="reference",
                       **{**opts, "order": "row-major"})
    back = torch.empty_like(plain)
    back[:, :, perm] = plain
    expected = layout.from_text_first(back)
    for impl in ("reference", "gather"):
        out = SLA.attend(q, k, v, layout=layout, impl=impl, **opts)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    bmap = SLA.block_map(q, k, layout=layout, **opts)
    assert torch.equal(bmap, sla_module.block_map(qp, kp, 16, 16, 0.4))
    # the default is the official order: the tokens as given
    assert torch.equal(SLA.block_map(q, k, layout=layout, topk=0.4, block_q=16, block_kv=16),
                       sla_module.block_map(*(layout.to_text_first(t) for t in (q, k)),
                                            16, 16, 0.4))


def test_order_default_is_official_and_tiles_say_they_are_attnbenchs():
    eff = SLA.effective_options((16, 16))
    assert eff["order"] == "row-major" and eff["blocks"] == "row-major"
    tiles = SLA.effective_options((16, 16), order="tiles")  # the earlier name still works
    assert tiles["order"] == "attnbench-tiles" and tiles["blocks"] == "attnbench tiles 8x8"
    option = next(o for o in SLA.options if o.name == "order")
    assert "thu-ml/SLA" in option.source and "attnbench's extension" in option.source


def order_patch(layout):
    from attnbench.attention.sla import order

    return order.patch_shape(layout, 16)


def test_sla_labels_count_text_tokens_and_say_the_blocks():
    layout = Layout((4, 8, 8), text=64)
    eff = SLA.effective_options(layout, topk=0.25, order="attnbench-tiles")
    assert eff["kv_blocks"] == 5 and eff["kept_blocks"] == 1
    assert eff["blocks"] == "attnbench cubes 4x4x4"
    assert SLA.density(layout, topk=0.4) == pytest.approx(2 / 5)
    assert SLA.flops(1, 2, 320, 8, layout).dense == 4 * 2 * 320 * 320 * 8
    plain = SLA.memory(1, 2, 320, 8, layout, order="row-major").workspace
    assert SLA.memory(1, 2, 320, 8, layout, order="attnbench-tiles").workspace == \
        plain + 5 * 2 * 320 * 8 * 2


def test_list_states_where_sla_differs_from_the_official_code():
    notes = " ".join(SLA.describe()["notes"])
    for fact in ("int(topk·K)", "at least 1", "SLA-1", "bf16", "row-major"):
        assert fact in notes, fact
    options = {o["name"]: o for o in SLA.describe()["options"]}
    assert "int(topk·K)" in options["topk"]["help"]
    assert "adds none" in options["eps"]["source"]
