"""The diffusion process, loss and samplers against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnbench.diffusion import (
    Diffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    space_timesteps,
)


@pytest.fixture(scope="module")
def diffusion() -> Diffusion:
    return Diffusion(1000)


# --------------------------------------------------------------------------- schedule


def test_linear_schedule_is_dits():
    betas = linear_betas(1000)
    assert betas.dtype == np.float64 and len(betas) == 1000
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    d = Diffusion(1000)
    assert torch.allclose(d.table("alphas_cumprod"),
                          torch.from_numpy(np.cumprod(1 - betas)))
    # ᾱ_T ≈ 4e-5: the last step is (almost) pure noise
    assert float(d.table("alphas_cumprod")[-1]) == pytest.approx(4.04e-5, rel=0.01)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_linear_schedule_rejects_bad_lengths(bad):
    with pytest.raises(ValueError, match="num_steps"):
        linear_betas(bad)


def test_space_timesteps_like_dit():
    kept = space_timesteps(1000, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, "250") == kept
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert len(space_timesteps(1000, "10,15,20")) == 45
    for bad in ("ddim7x", "abc", 0, 2000):
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)


def test_respacing_keeps_marginals(diffusion):
    spaced = diffusion.respace(25)
    kept = space_timesteps(1000, 25)
    assert spaced.num_steps == 25 and spaced.timestep_map == kept
    assert torch.allclose(spaced.table("alphas_cumprod"),
                          diffusion.table("alphas_cumprod")[kept])
    t = torch.arange(25)
    assert spaced.model_timesteps(t).tolist() == kept


# --------------------------------------------------------------------------- process


def test_q_sample_and_posterior_closed_form(diffusion, gen):
    x0 = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 999])
    ab = diffusion.table("alphas_cumprod")[t].reshape(-1, 1, 1, 1)
    xt = diffusion.q_sample(x0, t, noise)
    assert torch.allclose(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    # Bayes: q(x_{t-1}|x_t,x_0) ∝ N(x_{t-1}; √ᾱ_{t-1}x_0, 1−ᾱ_{t-1})·N(x_t; √α_t x_{t-1}, β_t)
    t = torch.tensor([1, 10, 999])
    xt = diffusion.q_sample(x0, t, noise)
    mean, var, _ = diffusion.q_posterior(x0, xt, t)
    beta = diffusion.table("betas")[t].reshape(-1, 1, 1, 1)
    ab_prev = diffusion.table("alphas_cumprod_prev")[t].reshape(-1, 1, 1, 1)
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    want_mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - beta).sqrt() * xt / beta) / precision
    assert torch.allclose(var.expand_as(x0), (1 / precision).expand_as(x0))
    assert torch.allclose(mean, want_mean)


def test_learned_range_interpolates_between_posterior_and_beta(diffusion):
    t = torch.tensor([0, 5, 500])
    like = torch.zeros(3, 1, 1, 1)
    hi = diffusion.model_log_variance(torch.ones(3, 1, 1, 1), t, like).flatten()
    lo = diffusion.model_log_variance(-torch.ones(3, 1, 1, 1), t, like).flatten()
    mid = diffusion.model_log_variance(torch.zeros(3, 1, 1, 1), t, like).flatten()
    assert torch.allclose(hi, torch.log(diffusion.table("betas")[t]).float())
    assert torch.allclose(lo, diffusion.table("posterior_log_variance_clipped")[t].float())
    assert torch.allclose(mid, (hi + lo) / 2)


def test_normal_kl_and_decoder_likelihood():
    m = torch.randn(5)
    assert torch.allclose(normal_kl(m, torch.zeros(5), m, torch.zeros(5)), torch.zeros(5))
    # KL(N(0,1) ‖ N(1, e)) = 0.5·(−1 + 1 + e^{-1} + e^{-1})
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0))
    assert float(kl) == pytest.approx(0.5 * (2 * math.exp(-1)), rel=1e-6)
    # the 256 bins of [-1, 1] carry (almost) all the probability
    centres = torch.linspace(-1, 1, 256)
    ll = discretized_gaussian_log_likelihood(centres, means=torch.full((256,), 0.1),
                                             log_scales=torch.full((256,), math.log(0.2)))
    assert float(ll.exp().sum()) == pytest.approx(1.0, abs=2e-3)


# --------------------------------------------------------------------------- loss


def _oracle(diffusion: Diffusion, x0: torch.Tensor, v: float | None = -1.0):
    """The exact ε (from the known x_0) and a fixed variance channel ``v``."""

    def model(xt, t_model, y):
        t = t_model  # a full process: model timesteps are step indices
        ab = diffusion.table("alphas_cumprod").to(xt.dtype)[t].reshape(-1, 1, 1, 1)
        eps = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
        return eps if v is None else torch.cat([eps, torch.full_like(eps, v)], dim=1)

    return model


def test_training_losses_of_an_oracle_vanish(diffusion, gen):
    x0 = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    t = torch.tensor([1, 50, 500, 999])
    terms = diffusion.training_losses(_oracle(diffusion, x0), x0, t, None, generator=gen)
    assert set(terms) >= {"loss", "mse", "vb", "output", "x_t", "noise"}
    assert terms["mse"].shape == (4,)
    assert float(terms["mse"].max()) < 1e-8
    assert float(terms["vb"].abs().max()) < 1e-5  # posterior variance = true one (t ≥ 1)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    fixed = diffusion.training_losses(_oracle(diffusion, x0, None), x0, t, None, generator=gen)
    assert "vb" not in fixed and float(fixed["loss"].max()) < 1e-8


def test_vb_trains_only_the_variance(diffusion, gen):
    x0 = torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1
    output = torch.randn(2, 6, 4, 4, generator=gen, requires_grad=True)
    xt = torch.randn(2, 3, 4, 4, generator=gen)
    noise = torch.randn(2, 3, 4, 4, generator=gen)
    terms = diffusion.losses_from_output(output, x0, xt, torch.tensor([0, 300]), noise)
    (grad,) = torch.autograd.grad(terms["vb"].sum(), output)
    assert grad[:, :3].abs().max() == 0 and grad[:, 3:].abs().max() > 0
    (grad,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert grad[:, 3:].abs().max() == 0


def test_output_channel_mismatch_is_an_error(diffusion):
    with pytest.raises(ValueError, match="channels"):
        diffusion.losses_from_output(torch.zeros(1, 5, 4, 4), torch.zeros(1, 3, 4, 4),
                                     torch.zeros(1, 3, 4, 4), torch.tensor([3]),
                                     torch.zeros(1, 3, 4, 4))


# --------------------------------------------------------------------------- samplers


def _point_mass_model(diffusion: Diffusion, target: torch.Tensor):
    """The optimal ε for data that is always ``target`` (any process: model timesteps)."""
    ac = diffusion.table("alphas_cumprod")

    def model(xt, t_model, y):
        ab = ac.to(xt.dtype)[t_model].reshape(-1, 1, 1, 1)
        eps = (xt - ab.sqrt() * target) / (1 - ab).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    return model


@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddim", 20), ("ddim", "ddim25")])
def test_samplers_reach_a_point_mass(diffusion, gen, sampler, steps):
    target = (torch.rand(1, 3, 6, 6, generator=gen) * 1.6 - 0.8)
    model = _point_mass_model(diffusion, target)
    g = torch.Generator().manual_seed(3)
    x = diffusion.sample(model, (4, 3, 6, 6), torch.zeros(4, dtype=torch.long), steps=steps,
                         sampler=sampler, generator=g, device="cpu")
    assert torch.allclose(x, target.expand_as(x), atol=1e-3)


def test_sampling_is_reproducible_and_checks_arguments(diffusion):
    model = _point_mass_model(diffusion, torch.zeros(1, 3, 4, 4))

    def draw(seed):
        return diffusion.sample(lambda x, t, y: model(x, t, y) + 0.1, (2, 3, 4, 4),
                                torch.zeros(2, dtype=torch.long), steps=10,
                                generator=torch.Generator().manual_seed(seed), device="cpu")

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    with pytest.raises(ValueError, match="sampler"):
        diffusion.sample(model, (1, 3, 4, 4), torch.zeros(1), sampler="euler", device="cpu")


def test_classifier_free_guidance(diffusion):
    null = 7
    calls = []

    def model(x, t, y):
        calls.append(y.clone())
        eps = y.float().reshape(-1, 1, 1, 1).expand(-1, 3, 2, 2)  # ε = the label
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    fn = diffusion.guided(model, 3.0, null, cfg_channels=None)
    out = fn(torch.zeros(2, 3, 2, 2), torch.tensor([5, 5]), torch.tensor([1, 2]))
    assert calls[-1].tolist() == [1, 2, null, null]  # one batched call, null labels last
    # ε = ε_u + s·(ε_c − ε_u) = 7 + 3·(y − 7)
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([7 + 3 * (1 - 7.0), 7 + 3 * (2 - 7.0)]))
    assert torch.all(out[:, 3:] == 0)
    two = diffusion.guided(model, 3.0, null, cfg_channels=2)(
        torch.zeros(1, 3, 2, 2), torch.tensor([5]), torch.tensor([1]))
    assert float(two[0, 2, 0, 0]) == 1.0  # DiT's quirk: channels past cfg_channels unguided
    assert diffusion.guided(model, 1.0, None, None) is model
    with pytest.raises(ValueError, match="null"):
        diffusion.guided(model, 2.0, None, None)


def test_sampling_a_dit(gen):
    from attnbench.models import build_dit

    model = build_dit("DiT-T/2", in_channels=3, input_size=8, seed=0).eval()
    d = Diffusion(1000)
    y = torch.tensor([1, 10])  # 10 = the null class of DiT-T's 10 classes
    x = d.sample(model, (2, 3, 8, 8), y, steps=5, cfg_scale=1.5, clip_denoised=True,
                 generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 8, 8) and x.abs().max() <= 1


def test_sampling_a_bf16_dit():
    from attnbench.models import build_dit

    model = build_dit("DiT-T/2", in_channels=3, input_size=8, seed=0).eval().to(torch.bfloat16)
    x = Diffusion(1000).sample(model, (1, 3, 8, 8), torch.tensor([1]), steps=3,
                               generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
