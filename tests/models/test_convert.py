"""Conversion = weight inheritance: exactness, recipes, reports, round trips."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import attnbench
from attnbench import attention
from attnbench.models import (
    REPORT_FILE,
    InheritanceReport,
    get_config,
    get_recipe,
    load_dit,
    model_from_state_dict,
    save_dit,
    save_student,
)
from attnbench.models.convert import lit_heads

from .conftest import make_inputs
from .spec import random_state, tiny_shapes


def cpu_methods() -> list[str]:
    return [n for n in attention.names() if attention.get(n).available("cpu") is None]


@pytest.fixture
def teacher(tiny_state):
    return model_from_state_dict(tiny_state)


def assert_accounted(report: InheritanceReport, teacher, student):
    """Every teacher key is inherited or dropped; every student key is in one list."""
    t_keys, s_keys = set(teacher.state_dict()), set(student.state_dict())
    inherited = set(report.inherited)
    assert inherited | set(report.dropped) == t_keys
    assert not inherited & set(report.dropped)
    lists = report.inherited + report.new + report.reinitialised
    assert sorted(lists) == sorted(s_keys) and len(lists) == len(s_keys)
    p = report.parameters
    assert p["inherited"] + p["new"] + p["reinitialised"] == p["student"]
    assert p["inherited"] + p["dropped"] == p["teacher"]
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key in report.inherited:
        assert torch.equal(s_state[key], t_state[key]), key


@pytest.mark.parametrize(("method", "options", "dense"), [
    ("clear", {}, True),  # r=8 covers the 4×4 grid
    ("clear", {"radius": 1}, False),
    ("sla", {}, True),  # one 64-token block holds all 16 tokens (+ the linear branch)
    ("sla", {"linear_over": "marginal"}, True),  # exactly softmax
    ("sla", {"block_q": 4, "block_kv": 4, "topk": 0.25}, False),
    ("lit", {}, False),
])
def test_a_student_that_is_softmax_at_its_grid_is_flagged(teacher, method, options, dense):
    _, report = attnbench.convert(teacher, method, **options)
    assert bool(report.warnings) == dense
    if dense:
        assert "4×4 token grid" in report.warnings[0] and "warning:" in report.summary()


# --------------------------------------------------------------------------- exactness


def test_softmax_student_is_bit_identical(teacher, gen):
    student, report = attnbench.convert(teacher, "softmax")
    assert report.dropped == report.new == report.reinitialised == []
    x, t, y = make_inputs(gen, side=12)
    with torch.no_grad():
        assert torch.equal(student(x, t, y), teacher(x, t, y))
    assert_accounted(report, teacher, student)


def test_clear_with_a_radius_covering_the_grid_matches(teacher, gen):
    x, t, y = make_inputs(gen, side=16)  # an 8×8 token grid: every distance < 8·√2 < 12
    student, report = attnbench.convert(teacher, "clear", radius=12)
    assert report.recipe == "clear" and report.inherit_projections
    assert report.new == report.reinitialised == report.dropped == []
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, y), teacher(x, t, y), rtol=1e-4, atol=1e-5)


def test_clear_down_factor_adds_only_its_pooling_weights(teacher):
    student, report = attnbench.convert(teacher, "clear", radius=4, down_factor=2)
    assert report.new and all(".attn." in k for k in report.new)
    assert report.reinitialised == report.dropped == []
    assert_accounted(report, teacher, student)


def test_sla_with_every_block_matches(teacher, gen):
    x, t, y = make_inputs(gen, side=16)  # 64 tokens in 4 blocks of 16
    student, report = attnbench.convert(teacher, "sla", topk=1.0, block_q=16, block_kv=16)
    assert report.recipe == "sla" and report.inherit_projections
    assert report.new and report.reinitialised == report.dropped == []
    state = student.state_dict()
    assert all(not state[k].any() for k in report.new)  # zero-initialised linear branch
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, y), teacher(x, t, y), rtol=1e-4, atol=1e-5)


def test_fresh_sla_student_is_block_sparse_attention(teacher, gen):
    """With topk < 1 the student is exactly block-sparse softmax (the linear branch is off)."""
    x, t, y = make_inputs(gen, side=16)
    options = dict(topk=0.5, block_q=16, block_kv=16)
    student, _ = attnbench.convert(teacher, "sla", **options)
    sparse, _ = attnbench.convert(teacher, "sla", linear_over="all", **options)
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, y), sparse(x, t, y), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(student(x, t, y), teacher(x, t, y), atol=1e-3)


# --------------------------------------------------------------------------- LiT's rule


def test_lit_report_matches_the_papers_rule(teacher, gen):
    student, report = attnbench.convert(teacher, "lit")
    t_keys = list(teacher.state_dict())
    # LiT's class-to-image code: drop every key containing "attn", inherit the rest
    assert report.dropped == [k for k in t_keys if "attn" in k]
    assert sorted(report.inherited) == sorted(k for k in t_keys if "attn" not in k)
    assert sorted(report.reinitialised) == sorted(report.dropped)
    assert report.new and all(".attn." in k for k in report.new)
    assert not report.inherit_projections and report.recipe == "lit"
    assert (report.teacher_heads, report.student_heads) == (4, 2)
    assert_accounted(report, teacher, student)
    # re-initialised projections are DiT's / LiT's Xavier-uniform with zero bias
    for key in report.reinitialised:
        value = student.state_dict()[key]
        if key.endswith("bias"):
            assert not value.any()
        else:
            fan_out, fan_in = value.shape
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert value.abs().max() <= bound and value.std() > bound / 3
    x, t, y = make_inputs(gen)
    assert torch.isfinite(student(x, t, y)).all()


def test_lit_few_heads_rule():
    assert lit_heads(get_config("DiT-S/2")) == 2  # the paper: 2 heads for DiT-S/2
    assert lit_heads(get_config("DiT-XL/2")) == 4  # and 4 for DiT-XL/2
    assert lit_heads(get_config("DiT-B/2")) == 3 and lit_heads(get_config("DiT-L/2")) == 4
    assert 192 % lit_heads(get_config("DiT-Ti/2")) == 0


def test_lit_options_inherit_projections_and_heads(teacher, gen):
    student, report = attnbench.convert(teacher, "lit", num_heads=4, inherit_projections=True,
                                        dwc_kernel=3)
    assert report.dropped == report.reinitialised == []
    assert report.student_heads == 4 and report.options["dwc_kernel"] == 3
    assert all(m.num_heads == 4 for m in student.mixers())
    assert_accounted(report, teacher, student)
    # few heads, the same qkv weights: inherited unchanged, split in 2 heads instead of 4
    few, report = attnbench.convert(teacher, "lit", num_heads=2, inherit_projections=True)
    assert torch.equal(few.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    assert few.blocks[0].attn.head_dim == 32


def test_recipe_is_selectable(teacher):
    _, report = attnbench.convert(teacher, "lit", recipe="inherit")
    assert report.recipe == "inherit" and report.student_heads == 4
    assert report.inherit_projections  # "inherit": every parameter with a counterpart
    _, report = attnbench.convert(teacher, "softmax", recipe=get_recipe("lit"))
    assert report.student_heads == 2 and report.reinitialised


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "lit", "num_heads": 3}, r"num_heads=3 does not divide the hidden size 64"),
        ({"method": "lti"}, "unknown attention method 'lti'; did you mean 'lit'"),
        ({"method": "lit", "radius": 3}, "lit: unknown option 'radius'"),
        ({"method": "sla", "topk": 2.0}, "topk"),
        ({"method": "lit", "recipe": "nope"}, "unknown conversion recipe 'nope'"),
        ({"method": "sla", "impl": "triton9"}, "sla: unknown implementation 'triton9'"),
    ],
)
def test_bad_conversions(teacher, kwargs, match):
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        attnbench.convert(teacher, method, **kwargs)


# --------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", cpu_methods())
def test_every_method_converts_and_round_trips(teacher, tmp_path, gen, method):
    student, report = attnbench.convert(teacher, method)
    assert_accounted(report, teacher, student)
    weights = save_student(student, tmp_path / method, report)
    assert (weights.parent / "config.json").is_file()
    saved = json.loads((weights.parent / REPORT_FILE).read_text())
    assert saved["method"] == method and saved["inherited"] == report.inherited
    assert InheritanceReport.load(weights.parent / REPORT_FILE) == report
    again = load_dit(tmp_path / method)
    assert again.config == student.config
    assert [type(m) for m in again.mixers()] == [type(m) for m in student.mixers()]
    x, t, y = make_inputs(gen, side=8)
    with torch.no_grad():
        assert torch.equal(again(x, t, y), student(x, t, y))


@pytest.mark.parametrize("target", ["student.safetensors", "student.pt"])
def test_single_file_round_trip(teacher, tmp_path, gen, target):
    student, _ = attnbench.convert(teacher, "lit", dwc_kernel=3)
    again = load_dit(save_dit(student, tmp_path / target))
    x, t, y = make_inputs(gen)
    with torch.no_grad():
        assert torch.equal(again(x, t, y), student(x, t, y))


def test_a_256px_checkpoint_runs_at_512px(tmp_path, gen):
    path = tmp_path / "DiT-T-2-256x256.pt"
    torch.save(random_state(tiny_shapes(input_size=32), gen), path)  # a 32×32 latent = 256 px
    model = load_dit(path)
    assert model.config.image_size == 256
    x, t, y = make_inputs(gen, batch=1, side=64)  # 512 px
    student, _ = attnbench.convert(model, "lit")
    with torch.no_grad():
        out = model(x, t, y)
        assert out.shape == (1, 8, 64, 64) and torch.isfinite(out).all()
        assert torch.isfinite(student(x, t, y)).all()


def test_student_of_a_student(teacher):
    lit, _ = attnbench.convert(teacher, "lit")
    back, report = attnbench.convert(lit, "softmax")
    assert report.teacher_heads == 2 and report.student_heads == 4  # the DiT's own heads
    assert report.dropped and all(".attn." in k for k in report.dropped)
    assert_accounted(report, lit, back)


# --------------------------------------------------------------------------- provenance


def test_report_records_the_source_checkpoint(tiny_ckpt):
    _, report = attnbench.convert(tiny_ckpt, "lit")
    assert report.source["sha256"] == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert report.source["path"] == str(tiny_ckpt)
    assert report.student_config["attention"] == "lit"
    assert report.student_config["attention_heads"] == 2
    assert report.versions["torch"] == torch.__version__
    assert "lit" in report.summary() and "dropped" in report.summary()


def test_conversion_is_seeded_and_leaves_the_global_rng(teacher):
    state = torch.random.get_rng_state()
    a, _ = attnbench.convert(teacher, "lit", seed=1)
    b, _ = attnbench.convert(teacher, "lit", seed=1)
    c, _ = attnbench.convert(teacher, "lit", seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_student_follows_the_teachers_dtype_and_mode(teacher):
    teacher = teacher.double().train()
    student, _ = attnbench.convert(teacher, "sla")
    assert student.training and student.pos_embed.dtype == torch.float64


def test_report_carries_the_recipes_sources(teacher):
    _, report = attnbench.convert(teacher, "sla")
    assert "arXiv 2509.24006" in report.recipe_source
    assert "TurboDiffusion" in report.distill_recipe_source
    _, report = attnbench.convert(teacher, "clear", radius=2.0)
    assert "Huage001/CLEAR" in report.distill_recipe_source
    assert "kd_attn pre-proj" in report.distill_recipe


def test_student_core_keys_and_the_teacher_loads_unchanged(teacher):
    student, report = attnbench.convert(teacher, "lit")
    assert "blocks.0.attn.core.dwc.weight" in report.new
    assert not any(k.startswith("blocks.0.attn.dwc") for k in student.state_dict())
    assert all(".core." not in k for k in teacher.state_dict())  # softmax cores own nothing
