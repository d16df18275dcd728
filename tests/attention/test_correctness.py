"""Every method's every implementation that runs here, against its float64 reference.

Shapes cover what DiT uses and what breaks kernels: N not a multiple of 64,
non-square grids, head dims 64 and 72 (DiT-XL/2), batch > 1. Methods added
to the registry are picked up with no edit here.
"""

from __future__ import annotations

import pytest
import torch

from attnbench import attention
from attnbench.attention.softmax import reference as softmax_module
from attnbench.bench.flops import count_flops
from tests.helpers import qkv

# (batch, heads, grid, head_dim)
SHAPES = [
    (2, 3, (5, 7), 64),  # N = 35: smaller than one block
    (1, 2, (9, 13), 72),  # N = 117: not a multiple of 64, DiT-XL head dim
    (2, 1, (16, 8), 64),  # N = 128: whole blocks, non-square
]
# float32 against the float64 reference: atol/rtol as fast kernels reach them
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _cpu_cases():
    for name in attention.names():
        backend = attention.get(name)
        for impl in backend.paths():
            for dtype in (torch.float64, torch.float32):
                yield pytest.param(name, impl, dtype, id=f"{name}-{impl}-{str(dtype)[6:]}")


def _shape_id(shape) -> str:
    b, h, (hg, wg), d = shape
    return f"B{b}H{h}g{hg}x{wg}d{d}"


@pytest.mark.parametrize("name, impl, dtype", list(_cpu_cases()))
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_float64_reference(name, impl, dtype, shape, gen):
    backend = attention.get(name)
    b, h, grid, d = shape
    n = grid[0] * grid[1]
    reason = backend.path_reasons("cpu", dtype, (b, h, n, d))[impl]
    if reason:
        pytest.skip(f"{name}[{impl}] on cpu/{dtype}: {reason}")
    q, k, v = qkv(gen, b, h, n, d)
    expected = backend.reference(q, k, v, grid=grid, **backend.resolve())
    out = backend.attend(q.to(dtype), k.to(dtype), v.to(dtype), grid=grid, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


#: one token count (N = 60) for every layout: FlexAttention compiles once per shape
LAYOUTS = [
    attention.Layout((6, 9), text=6),  # image + text first (FLUX)
    attention.Layout((6, 9), text=6, text_first=False),  # image + text last (SD3)
    attention.Layout((3, 4, 5)),  # video (Wan)
    attention.Layout((2, 4, 6), text=12, text_first=False),  # video + text
]
#: options that make the geometry matter at these sizes (the defaults cover N = 60)
LAYOUT_OPTIONS = {"clear": {"radius": 2.5, "radius_t": 1},
                  "sla": {"topk": 0.5, "block_q": 16, "block_kv": 16}}


def _layout_id(layout) -> str:
    return layout.describe().replace(" ", "")


@pytest.mark.parametrize("name, impl, dtype", list(_cpu_cases()))
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_matches_float64_reference_on_every_layout(name, impl, dtype, layout, gen):
    """Every path a method has, on every layout kind it defines, against its float64
    reference (the per-method tests check the references against independent constructions)."""
    backend = attention.get(name)
    shape = (2, 2, layout.tokens, 16)
    if layout.kind not in backend.layout_kinds:
        pytest.skip(f"{name} does not define {layout.kind} layouts")
    reason = backend.path_reasons("cpu", dtype, shape, layout)[impl]
    if reason:
        pytest.skip(f"{name}[{impl}] on cpu/{dtype} at {layout.describe()}: {reason}")
    q, k, v = qkv(gen, *shape)
    opts = LAYOUT_OPTIONS.get(name, {})
    expected = backend.attend(q, k, v, layout=layout, impl="reference", **opts) \
        if not backend.kernel_only() else attention.get("softmax").attend(q, k, v, layout=layout)
    out = backend.attend(q.to(dtype), k.to(dtype), v.to(dtype), layout=layout, impl=impl, **opts)
    assert out.shape == q.shape and out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("name, impl, dtype", list(_cpu_cases()))
def test_a_batch_of_zero_gives_an_empty_output(name, impl, dtype):
    """Every path takes a batch of 0 (a rank's empty share of a sweep) and returns an empty
    output of the input's shape, as SDPA does: chunk sizing must not divide by the batch."""
    backend = attention.get(name)
    layout = attention.Layout((8, 8))
    shape = (0, 2, layout.tokens, 16)
    reason = backend.path_reasons("cpu", dtype, shape, layout)[impl]
    if reason:
        pytest.skip(f"{name}[{impl}] on cpu/{dtype}: {reason}")
    q = torch.randn(shape, dtype=dtype)
    out = backend.attend(q, q, q, layout=layout, impl=impl, **LAYOUT_OPTIONS.get(name, {}))
    assert out.shape == shape and out.dtype == dtype


def _grad_cases():
    """Every fast path whose capabilities say autograd runs through it on CPU (Triton's
    included: on CPU they run under its interpreter, float32)."""
    for name, impl, dtype in (c.values for c in _cpu_cases()):
        backend = attention.get(name)
        if impl == "reference" or backend.kernel_only():
            continue
        if not backend.fast_path(impl).supports_grad("cpu"):
            continue
        yield pytest.param(name, impl, dtype, id=f"{name}-{impl}-{str(dtype)[6:]}")


#: every layout kind: the plain grid, text first and last, video, video with text
GRAD_LAYOUTS = [attention.Layout((5, 8)), *LAYOUTS]
#: mixer options that give a method's core its learned parts at every layout they are
#: defined on (CLEAR's pooled keys are image-only: video layouts keep the default)
LEARNED_OPTIONS = {"clear": {"down_factor": 2}}


def _runnable(backend, name, impl, dtype, shape, layout, monkeypatch) -> None:
    """Skip unless ``impl`` runs here; Triton kernels run on CPU under the interpreter
    (``TRITON_INTERPRET=1`` when they are imported; never on a GPU machine, whose kernel
    tests import them compiled)."""
    fast = backend.fast_path(impl)
    if "triton" in fast.requires and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = backend.path_reasons("cpu", dtype, shape, layout)[impl]
    if reason:
        pytest.skip(f"{name}[{impl}] on cpu/{dtype} at {layout.describe()}: {reason}")


def _assert_grads_close(got, want, labels, dtype) -> None:
    """Gradients against float64 ones, relative to the largest of each (they sum over many
    terms)."""
    tol = TOLERANCE[dtype] * 10
    for g, w, label in zip(got, want, labels, strict=True):
        scale = w.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g.double() / scale, w / scale, atol=tol, rtol=tol,
                                   msg=lambda m, label=label: f"d{label}: {m}")


@pytest.mark.parametrize("name, impl, dtype", list(_grad_cases()))
@pytest.mark.parametrize("layout", GRAD_LAYOUTS, ids=_layout_id)
def test_gradients_match_float64_reference_on_every_layout(name, impl, dtype, layout, gen,
                                                           monkeypatch):
    """Backward of every path that trains on CPU, on every layout, against autograd through
    the float64 reference: dq, dk and dv for a random output gradient."""
    backend = attention.get(name)
    shape = (2, 2, layout.tokens, 16)
    if layout.kind not in backend.layout_kinds:
        pytest.skip(f"{name} does not define {layout.kind} layouts")
    _runnable(backend, name, impl, dtype, shape, layout, monkeypatch)
    opts = LAYOUT_OPTIONS.get(name, {})
    inputs = qkv(gen, *shape)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = {}
    for which, cast in (("reference", torch.float64), (impl, dtype)):
        leaves = [t.to(cast).requires_grad_() for t in inputs]
        out = backend.attend(*leaves, layout=layout, impl=which, **opts)
        grads[which] = torch.autograd.grad((out.double() * weight).sum(), leaves)
    _assert_grads_close(grads[impl], grads["reference"], "qkv", dtype)


def _learned_cases():
    for case in _grad_cases():
        if attention.get(case.values[0]).core_class is not None:
            yield case


@pytest.mark.parametrize("name, impl, dtype", list(_learned_cases()))
@pytest.mark.parametrize("layout", GRAD_LAYOUTS, ids=_layout_id)
def test_learned_parts_gradients_match_float64_reference_on_every_layout(
    name, impl, dtype, layout, gen, monkeypatch
):
    """The method's core (its learned parts: CLEAR's pooling weight, LiT's depth-wise conv,
    SLA's linear-branch projection) on every path that trains on CPU, against the same core
    on the float64 reference: the output, dq, dk, dv and every parameter's gradient, with
    the parameters at random values (not their initialisation, which can zero a branch)."""
    backend = attention.get(name)
    shape = (2, 2, layout.tokens, 16)
    if layout.kind not in backend.layout_kinds:
        pytest.skip(f"{name} does not define {layout.kind} layouts")
    _runnable(backend, name, impl, dtype, shape, layout, monkeypatch)
    opts = {**LAYOUT_OPTIONS.get(name, {}),
            **({} if layout.is_video else LEARNED_OPTIONS.get(name, {}))}
    reference = backend.core(2, 16, impl="reference", **opts).double()
    params = dict(reference.named_parameters())
    if not params:
        pytest.skip(f"{name} has no learned parts at {layout.describe()} with {opts}")
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    fast = backend.core(2, 16, impl=impl, **opts).to(dtype)
    fast.load_state_dict(reference.state_dict())
    inputs = qkv(gen, *shape)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    results = {}
    for core, cast in ((reference, torch.float64), (fast, dtype)):
        leaves = [t.to(cast).requires_grad_() for t in inputs]
        out = core(*leaves, layout=layout)
        wrt = [*leaves, *(p for _, p in core.named_parameters())]
        results[core] = (out, torch.autograd.grad((out.double() * weight).sum(), wrt))
    (out, got), (expected, want) = results[fast], results[reference]
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    _assert_grads_close(got, want, ["q", "k", "v", *params], dtype)


@pytest.mark.parametrize("name", list(attention.names()))
def test_every_builtin_defines_every_layout_and_its_labels(name):
    """Density, effective options, FLOPs and memory take a Layout and count its tokens."""
    backend = attention.get(name)
    assert set(backend.layout_kinds) == set(attention.layout.KINDS)
    layout = attention.Layout((2, 4, 6), text=12, text_first=False)
    opts = LAYOUT_OPTIONS.get(name, {})
    assert 0.0 <= backend.density(layout, **opts) <= 1.0
    assert isinstance(backend.effective_options(layout, **opts), dict)
    flops = backend.flops(1, 2, 60, 16, layout, **opts)
    assert flops.dense == 4 * 2 * 60 * 60 * 16
    memory = backend.memory(1, 2, 60, 16, layout=layout, **opts)
    assert memory.io == 4 * 2 * 60 * 16 * 2
    with pytest.raises(ValueError, match="= 60 tokens"):
        backend.flops(1, 2, 61, 16, layout, **opts)


def test_reference_is_not_a_fast_path_copy(gen):
    """The softmax reference itself against a from-the-definition float64 computation."""
    q, k, v = qkv(gen, 2, 2, 30, 16)
    scores = q @ k.transpose(-1, -2) / 16**0.5
    expected = torch.softmax(scores, dim=-1) @ v
    out = attention.get("softmax").attend(q, k, v, grid=(5, 6), impl="reference")
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_softmax_reference_chunks_queries(gen, monkeypatch):
    """Forced into many query chunks, the reference still equals SDPA."""
    monkeypatch.setattr(softmax_module, "REFERENCE_CHUNK_ELEMENTS", 2 * 3 * 100 * 7)
    q, k, v = qkv(gen, 2, 3, 100, 16)
    out = attention.get("softmax").attend(q, k, v, grid=(10, 10), impl="reference")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_lit_from_its_definition(gen):
    """LiT against the official per-query formula, in float64:
    φ(x) = relu(x) + 1e-6, O_i = Σ_j w_ij v_j / N / (Σ_j w_ij / N + eps), w_ij = φ(q_i)·φ(k_j)."""
    q, k, v = qkv(gen, 1, 2, 24, 8)
    eps = 1e-6
    fq, fk = q.relu() + 1e-6, k.relu() + 1e-6
    expected = torch.empty_like(q)
    for i in range(24):
        weights = fq[:, :, i : i + 1] @ fk.transpose(-1, -2) / 24  # [B, H, 1, N]
        expected[:, :, i] = ((weights @ v) / (weights.sum(-1, keepdim=True) + eps))[:, :, 0]
    out = attention.get("lit").attend(q, k, v, grid=(4, 6), eps=eps)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_lit_query_with_every_entry_negative_gives_about_the_mean_of_v(gen):
    """The official feature map keeps φ(q) = 1e-6 > 0: such a row averages V, it is not 0."""
    q, k, _ = qkv(gen, 1, 1, 16, 8)
    v = torch.full((1, 1, 16, 8), 3.0, dtype=torch.float64)  # every value the same
    q[:, :, 5] = -torch.rand(8, generator=gen, dtype=torch.float64) - 0.1  # all negative
    out = attention.get("lit").attend(q, k, v, grid=(4, 4))
    row = out[0, 0, 5]
    # φ(q)·mean φ(k) = 1e-6·Σ_d mean φ(k) ≫ eps here, so the row is close to 3, far from 0
    ratio = (1e-6 * (k.relu() + 1e-6).mean(2).sum()) / (1e-6 * (k.relu() + 1e-6).mean(2).sum()
                                                         + 1e-6)
    torch.testing.assert_close(row, torch.full_like(row, 3.0) * ratio, atol=1e-12, rtol=1e-12)
    assert (row > 2.0).all()


def test_lit_half_precision_accumulates_in_float32(gen):
    q, k, v = qkv(gen, 2, 2, 256, 64)
    expected = attention.get("lit").attend(q, k, v, grid=(16, 16))
    out = attention.get("lit").attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), grid=(16, 16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


def test_lit_never_forms_the_n_by_n_matrix(gen):
    """65,536 tokens: an N×N float32 score matrix would need 16 GiB; LiT needs kilobytes."""
    q, k, v = (torch.randn(1, 1, 256 * 256, 8, generator=gen) for _ in range(3))
    out = attention.get("lit").attend(q, k, v, grid=(256, 256))
    assert out.shape == q.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------- limiting cases


def test_clear_with_a_radius_covering_the_grid_is_softmax(gen):
    q, k, v = qkv(gen, 2, 2, 6 * 9, 16)
    radius = (6**2 + 9**2) ** 0.5 + 1
    out = attention.get("clear").attend(q, k, v, grid=(6, 9), radius=radius, impl="reference")
    expected = attention.get("softmax").attend(q, k, v, grid=(6, 9), impl="reference")
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_sla_with_every_block_selected_is_softmax(gen):
    q, k, v = qkv(gen, 1, 2, 200, 32)  # 4 blocks, the last partial
    expected = attention.get("softmax").attend(q, k, v, grid=(10, 20), impl="reference")
    sla = attention.get("sla")
    runnable = [p for p, why in sla.path_reasons("cpu", q.dtype, q.shape).items() if why is None]
    assert {"reference", "gather"} <= set(runnable)
    for impl in runnable:
        # the paper's marginal linear branch (the default, "all", adds a linear term)
        out = sla.attend(q, k, v, grid=(10, 20), topk=1.0, impl=impl, linear_over="marginal")
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------- FLOPs


def test_flop_counter_counts_cpu_sdpa(gen):
    q, k, v = qkv(gen, 2, 3, 50, 16, dtype=torch.float32)
    analytic = attention.get("softmax").flops(2, 3, 50, 16, grid=(5, 10))
    counted = count_flops(torch.nn.functional.scaled_dot_product_attention, q, k, v)
    assert counted == analytic.actual == analytic.dense == 4 * 2 * 3 * 50 * 50 * 16


@pytest.mark.parametrize("name", ["softmax", "lit"])
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_analytic_flops_equal_the_counted_ones(name, impl, gen):
    backend = attention.get(name)
    q, k, v = qkv(gen, 2, 2, 96, 24, dtype=torch.float32)
    counted = count_flops(backend.attend, q, k, v, grid=(8, 12), impl=impl)
    analytic = backend.flops(2, 2, 96, 24, grid=(8, 12))
    assert counted == pytest.approx(analytic.actual, rel=1e-9)
    assert analytic.dense == 4 * 2 * 2 * 96 * 96 * 24


def test_flops_grid_defaults_to_square_and_checks_it():
    lit = attention.get("lit")
    assert lit.flops(1, 1, 64, 8) == lit.flops(1, 1, 64, 8, grid=(8, 8))
    with pytest.raises(ValueError, match="not a square grid"):
        lit.flops(1, 1, 60, 8)


def test_linear_attention_flops_grow_linearly():
    lit, soft = attention.get("lit"), attention.get("softmax")
    small, large = lit.flops(1, 16, 1024, 72), lit.flops(1, 16, 4096, 72)
    assert large.actual == pytest.approx(4 * small.actual)
    soft_small, soft_large = soft.flops(1, 16, 1024, 72), soft.flops(1, 16, 4096, 72)
    assert soft_large.actual == pytest.approx(16 * soft_small.actual)
    assert large.dense == soft_large.actual


def test_memory_models_are_consistent():
    soft, lit = attention.get("softmax"), attention.get("lit")
    fast = soft.memory(1, 16, 4096, 72)
    ref = soft.memory(1, 16, 4096, 72, impl="reference")
    assert fast.io == 4 * 16 * 4096 * 72 * 2 and fast.workspace == 0
    assert ref.workspace > 0 and ref.actual > fast.actual
    assert lit.memory(1, 16, 4096, 72, impl="reference").workspace < ref.workspace
    # the Triton kernel applies φ on the fly: only the float32 state (and its partials)
    assert lit.memory(1, 16, 4096, 72).workspace == 2 * 16 * (72 * 72 + 72) * 4


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", list(attention.names()))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_inputs_are_one_value_error(name, dtype):
    """Integer, bool and complex tensors: the same ValueError for every method, before work."""
    q = torch.ones(1, 1, 16, 8, dtype=dtype)
    with pytest.raises(ValueError, match=rf"q has dtype {str(dtype)[6:]}; attention takes "
                                         r"floating-point tensors"):
        attention.get(name).attend(q, q, q, grid=(4, 4))


def _nan_cases():
    for name in attention.names():
        for impl in attention.get(name).paths():
            yield pytest.param(name, impl, id=f"{name}-{impl}")


@pytest.mark.parametrize("name, impl", list(_nan_cases()))
@pytest.mark.parametrize("where", ["q_all", "q_row", "k_token", "v_token"])
def test_non_finite_input_is_never_hidden(name, impl, where, gen):
    """Every path is NaN wherever its method's reference is (an all-NaN q: all NaN)."""
    backend = attention.get(name)
    shape = (1, 2, 64, 16)
    reason = backend.path_reasons("cpu", torch.float32, shape)[impl]
    if reason:
        pytest.skip(reason)
    q, k, v = (t.float() for t in qkv(gen, *shape))
    target = {"q_all": (q, slice(None)), "q_row": (q, 5), "k_token": (k, 9), "v_token": (v, 9)}
    tensor, index = target[where]
    tensor[:, :, index] = float("nan")
    opts = {"radius": 2.5} if name == "clear" else {}
    out = backend.attend(q, k, v, grid=(8, 8), impl=impl, **opts)
    reference_nan = backend.reference(q, k, v, grid=(8, 8), **backend.resolve(opts)).isnan()
    assert reference_nan.any()
    assert out.isnan()[reference_nan].all(), f"{name}[{impl}] hides a NaN of the reference"
    if where == "q_all":
        assert out.isnan().all()
