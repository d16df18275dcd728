"""Memory of a diffusers distillation: the estimate against the real objects of a tiny run,
the student sharing its frozen tensors with the teacher, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from attnbench.distill.diffusers_distill import DiffusersTrainer, student_of
from attnbench.distill.diffusers_objective import DiffusersBatch, diffusers_losses, trainable_names
from attnbench.distill.memory import training_memory, zoo_training_memory
from attnbench.distill.recipes import recipe_for
from attnbench.integrations.diffusers import build_transformer
from attnbench.integrations.diffusers.families import FAMILIES

FLUX = FAMILIES["flux"]


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_estimate_equals_the_bytes_a_tiny_run_holds(optimizer):
    if optimizer == "prodigy":
        prodigyopt = pytest.importorskip("prodigyopt")
    teacher = build_transformer("flux-tiny", dtype=torch.bfloat16)
    student, _ = student_of(teacher, "clear", {"radius": 2}, FLUX, "attention")
    names = trainable_names(student, FLUX, "attention")
    params = dict(student.named_parameters())
    chosen = [params[n] for n in names]
    for p in chosen:
        p.grad = torch.ones_like(p)
    opt = (prodigyopt.Prodigy(chosen, lr=1.0) if optimizer == "prodigy"
           else torch.optim.AdamW(chosen, lr=1e-4))
    opt.step()
    ema = DiffusersTrainer.ema_init(None, student, names)
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    held = {
        "teacher": _nbytes(teacher.parameters()),
        "student": _nbytes(p for p in student.parameters() if p.data_ptr() not in teacher_ptrs),
        "gradients": _nbytes(p.grad for p in chosen),
        "optimizer": sum(v.numel() * v.element_size() for p in chosen
                         for v in opt.state[p].values()
                         if torch.is_tensor(v) and v.numel() == p.numel()),
        "ema": _nbytes(ema.values()),
    }
    estimate = training_memory(teacher, names, dtype=torch.bfloat16, optimizer=optimizer,
                               student=student)
    assert estimate.parts == held
    assert estimate.trainable < estimate.parameters  # attention only


def test_student_shares_frozen_tensors_and_computes_as_an_unshared_copy(gen):
    teacher = build_transformer("flux-tiny")
    student, _ = student_of(teacher, "clear", {"radius": 2}, FLUX, "attention")
    names = set(trainable_names(student, FLUX, "attention"))
    stock = dict(teacher.named_parameters())
    for name, p in student.named_parameters():
        shared = name in stock and p.data_ptr() == stock[name].data_ptr()
        assert shared == (name not in names), name
        assert p.dtype == torch.float32
    import copy

    from attnbench.integrations.diffusers.swap import swap_attention

    unshared = copy.deepcopy(teacher)
    swap_attention(unshared, "clear", radius=2)
    batch = _batch(gen)
    recipe = recipe_for("sla")  # kd_out: the teacher runs too
    with torch.no_grad():
        a = diffusers_losses(recipe, FLUX, student, teacher, batch, guidance=3.5, tapped=[])
        b = diffusers_losses(recipe, FLUX, unshared, teacher, batch, guidance=3.5, tapped=[])
    assert torch.equal(a["loss"], b["loss"])


def _batch(gen, b=2):
    x0 = torch.randn(b, 6, 16, generator=gen)  # 2×3 tokens of 4×2×2 packed channels
    text = {"encoder_hidden_states": torch.randn(b, 7, 32, generator=gen),
            "pooled_projections": torch.randn(b, 16, generator=gen)}
    return DiffusersBatch(x0, text, torch.randn(x0.shape, generator=gen),
                          torch.rand(b, generator=gen), (2, 3))


def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients(gen):
    """--gradient-checkpointing: each block runs again in the backward pass, the gradients
    are unchanged; the frozen teacher builds no graph."""
    teacher = build_transformer("flux-tiny")
    batch = _batch(gen)
    recipe = recipe_for("sla")  # kd_out: the teacher runs too
    grads, calls = [], []
    for checkpointing in (False, True):
        student, _ = student_of(teacher, "clear", {"radius": 2}, FLUX, "attention")
        names = set(trainable_names(student, FLUX, "attention"))
        for n, p in student.named_parameters():
            p.requires_grad_(n in names)
        if checkpointing:
            student.enable_gradient_checkpointing()
        count = []
        student.transformer_blocks[0].register_forward_pre_hook(
            lambda *a, count=count: count.append(1))
        teacher_out = []
        hook = teacher.register_forward_hook(
            lambda m, i, o, out=teacher_out: out.append(o[0]))
        terms = diffusers_losses(recipe, FLUX, student, teacher, batch, guidance=3.5,
                                 tapped=[])
        hook.remove()
        assert not teacher_out[0].requires_grad
        terms["loss"].backward()
        calls.append(len(count))
        grads.append({n: p.grad for n, p in student.named_parameters() if n in names})
    assert calls == [1, 2]  # the block ran again in the backward pass
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_flux_dev_attention_student_fits_one_141_gb_gpu():
    """The docs' estimate (docs/diffusers-distillation-memory.md), from FLUX.1-dev's real
    parameter counts: CLEAR's recipe (Prodigy), --trainable attention, bf16 teacher."""
    est = zoo_training_memory("flux.1-dev", "attention", optimizer="prodigy")
    assert round(est.parameters / 1e9, 2) == 11.90
    assert round(est.trainable / 1e9, 2) == 2.51
    assert est.peak < 141e9
    full = zoo_training_memory("flux.1-dev", "all", optimizer="adamw")
    assert full.training > 141e9  # a full fine-tune of the 12B model does not fit
