"""Samplers: noise streams, Algorithm 2 / respaced / DDIM against diffusers' schedulers and closed
forms, the toy Gaussian whose optimal denoiser is known, and the speed wrappers (the figures' chains:
tests/test_chains.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from stand_ins import (
    SHAPE,
    SHAPE4,
    T_SMALL,
    ToyEps,
    beta_range,
    diffusers_ddpm_chain,
    diffusion_of,
    make_diffusion,
)

from ddpmkit.accel import prepare_model
from ddpmkit.diffusion import DiffusionConfig, GaussianDiffusion
from ddpmkit.respace import (
    parse_timesteps,
    respace_diffusion,
    space_timesteps,
)
from ddpmkit.sampling import ddim_mean_variance, ddim_step, p_sample, sample, sample_ancestral, sample_ddim
from ddpmkit.seeds import draw_standard_normal, sample_generators, sample_seed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_unet() -> torch.nn.Module:
    from ddpmkit.nn import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(config=UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1,),
                                 num_res_blocks=1, attn_resolutions=()))
    with torch.no_grad():  # move off the near-zero output init so samples are not trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


# ---------------------------------------------------------------------------------- noise streams
def test_sample_seeds_are_stable_and_distinct() -> None:
    seeds = {sample_seed(s, i) for s in range(5) for i in range(200)}
    assert len(seeds) == 1000
    assert sample_seed(3, 7) == sample_seed(3, 7)
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        sample_seed(-1, 0)


def test_per_sample_noise_does_not_depend_on_the_batch() -> None:
    z8 = draw_standard_normal((8, 3, 2, 2), sample_generators(5, range(8)), device="cpu", dtype=torch.float32)
    z1 = torch.cat([
        draw_standard_normal((1, 3, 2, 2), sample_generators(5, [i]), device="cpu", dtype=torch.float32)
        for i in range(8)
    ])
    assert torch.equal(z8, z1)
    ref = torch.randn((3, 2, 2), generator=torch.Generator().manual_seed(sample_seed(5, 6)))
    assert torch.equal(z8[6], ref)
    with pytest.raises(ValueError, match="one generator per sample"):
        draw_standard_normal((3, 2), sample_generators(0, range(2)), device="cpu", dtype=torch.float32)


def test_same_seed_same_samples_other_seed_other_samples() -> None:
    d, model = make_diffusion(), ToyEps(T_SMALL)
    a = sample_ancestral(model, d, SHAPE, generator=sample_generators(0, range(8)))
    b = sample_ancestral(model, d, SHAPE, generator=sample_generators(0, range(8)))
    c = sample_ancestral(model, d, SHAPE, generator=sample_generators(1, range(8)))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", None, 0.0), ("ddpm", 7, 0.0), ("ddim", 5, 0.5)])
def test_batch_size_one_and_eight_give_the_same_samples(sampler: str, steps: int | None, eta: float) -> None:
    d, model = make_diffusion(), ToyEps(T_SMALL)
    kw = dict(sampler=sampler, steps=steps, eta=eta)
    x8 = sample(model, d, SHAPE, generator=sample_generators(4, range(8)), **kw)
    x1 = torch.cat([sample(model, d, (1, *SHAPE[1:]), generator=sample_generators(4, [i]), **kw)
                    for i in range(8)])
    assert torch.equal(x8, x1)


def test_batch_size_with_the_unet(tiny_unet: torch.nn.Module) -> None:
    # the per-sample noise is identical; batched convolutions may differ in the last float bits
    d = make_diffusion(T=6)
    x8 = sample_ancestral(tiny_unet, d, (4, 1, 8, 8), generator=sample_generators(2, range(4)))
    x1 = torch.cat([sample_ancestral(tiny_unet, d, (1, 1, 8, 8), generator=sample_generators(2, [i]))
                    for i in range(4)])
    torch.testing.assert_close(x8, x1, atol=1e-5, rtol=0)
    assert x8.std() > 0.1


# ---------------------------------------------------------------------------------- against diffusers
def _diffusers_config(d: GaussianDiffusion, T: int) -> dict:
    b0, b1 = beta_range(T)
    return dict(num_train_timesteps=T, beta_start=b0, beta_end=b1,
                beta_schedule="linear", clip_sample=True, prediction_type="epsilon")


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_algorithm_2_matches_diffusers_ddpm_scheduler(var_type: str) -> None:
    T = T_SMALL
    d, model = make_diffusion(var_type), ToyEps(T)
    ours = sample_ancestral(model, d, SHAPE, generator=torch.Generator().manual_seed(7))
    sched = DDPMScheduler(**_diffusers_config(d, T), variance_type=var_type.replace("fixed", "fixed_"))
    sched.set_timesteps(T)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SHAPE, generator=g)  # x_T first, then one draw per step t > 0: our order too
    for t in sched.timesteps:
        eps = model(x, torch.full((SHAPE[0],), int(t)))
        x = sched.step(eps, t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=0)


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_respaced_ddpm_matches_diffusers_custom_timesteps(var_type: str) -> None:
    T, S = T_SMALL, 6
    d, model = make_diffusion(var_type), ToyEps(T)
    kept = space_timesteps(T, S)
    assert kept == [0, 4, 8, 11, 15, 19]
    ours = sample_ancestral(model, d, SHAPE, timesteps=S, generator=torch.Generator().manual_seed(3))
    sched = DDPMScheduler(**_diffusers_config(d, T), variance_type=var_type.replace("fixed", "fixed_"))
    torch.testing.assert_close(ours, diffusers_ddpm_chain(sched, model, kept, SHAPE, 3), atol=2e-5, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_all_steps_matches_diffusers_ddim_scheduler(eta: float) -> None:
    T = T_SMALL
    d, model = make_diffusion(), ToyEps(T)
    ours = sample_ddim(model, d, SHAPE, eta=eta, generator=torch.Generator().manual_seed(11))
    sched = DDIMScheduler(**_diffusers_config(d, T), set_alpha_to_one=True, timestep_spacing="linspace")
    sched.set_timesteps(T)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(SHAPE, generator=g)
    for t in sched.timesteps:
        eps = model(x, torch.full((SHAPE[0],), int(t)))
        # diffusers draws (unused) noise at the last step too, after ours ends: no effect on x_0
        x = sched.step(eps, t, x, eta=eta, use_clipped_model_output=True, generator=g).prev_sample
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=0)


def test_ddim_strided_step_matches_diffusers() -> None:
    T, S, eta = 20, 5, 0.7
    d, model = make_diffusion(), ToyEps(T)
    sched = DDIMScheduler(**_diffusers_config(d, T), set_alpha_to_one=True, timestep_spacing="leading")
    sched.set_timesteps(S)  # timesteps 16, 12, 8, 4, 0: each step goes back T // S = 4
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for t in (16, 12, 4):
        tt = torch.full((SHAPE[0],), t)
        p = d.p_mean_variance(model, x, tt, clip_denoised=True)
        mean, var = ddim_mean_variance(d, x, t, t - 4, p["pred_x0"], p["pred_eps"], eta)
        ref = sched.step(model(x, tt), t, x, eta=eta, use_clipped_model_output=True, variance_noise=z)
        torch.testing.assert_close(mean + math.sqrt(var) * z, ref.prev_sample, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- DDIM on the formulas
def test_ddim_eta_one_all_steps_is_the_ancestral_step() -> None:
    """sigma^2(eta=1, t -> t-1) = beta-tilde_t (eq. 7), and the DDIM mean is mu-tilde_t(x_t, x0)."""
    d = make_diffusion("fixedsmall", T=50)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    x0 = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64).clamp(-1, 1)
    for t in range(1, 50):
        tt = torch.full((4,), t)
        eps = d.predict_eps_from_x0(x_t, tt, x0)
        mean, var = ddim_mean_variance(d, x_t, t, t - 1, x0, eps, eta=1.0)
        post_mean, post_var, _ = d.q_posterior_mean_variance(x0, x_t, tt)
        torch.testing.assert_close(mean, post_mean, atol=1e-12, rtol=1e-10)
        b, ab, ab_prev = d.betas[t], d.alphas_cumprod[t], d.alphas_cumprod[t - 1]
        assert var == pytest.approx(float(b * (1 - ab_prev) / (1 - ab)), rel=1e-12)
        assert var == pytest.approx(float(post_var[0, 0, 0, 0]), rel=1e-12)
    mean, var = ddim_mean_variance(d, x_t, 0, -1, x0, eps, eta=1.0)  # the last step lands on x0
    assert var == 0.0
    torch.testing.assert_close(mean, x0)


def test_ddim_eta_one_all_steps_equals_ancestral_sampling_with_beta_tilde() -> None:
    d, model = make_diffusion("fixedsmall"), ToyEps(T_SMALL)
    a = sample_ancestral(model, d, SHAPE, generator=sample_generators(9, range(8)))
    b = sample_ddim(model, d, SHAPE, eta=1.0, generator=sample_generators(9, range(8)))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_ddim_eta_zero_is_deterministic_given_x_T() -> None:
    d, model = make_diffusion(), ToyEps(T_SMALL)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    state = g1.get_state()
    a = sample_ddim(model, d, SHAPE, timesteps=7, eta=0.0, x_T=x_T, generator=g1)
    b = sample_ddim(model, d, SHAPE, timesteps=7, eta=0.0, x_T=x_T, generator=g2)
    assert torch.equal(a, b)
    assert torch.equal(g1.get_state(), state)  # no noise drawn at all
    c = sample_ddim(model, d, SHAPE, timesteps=7, eta=0.5, x_T=x_T, generator=g1)
    assert (a - c).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- respacing
def test_space_timesteps_and_respaced_coefficients() -> None:
    assert space_timesteps(1000, 1000) == list(range(1000))
    ks = space_timesteps(1000, 50)
    assert len(ks) == 50 and ks[0] == 0 and ks[-1] == 999
    assert set(np.diff(ks).tolist()) <= {20, 21}
    assert space_timesteps(10, 1) == [9]
    d = make_diffusion(T=1000)
    spaced = respace_diffusion(d, ks)
    torch.testing.assert_close(spaced.alphas_cumprod, d.alphas_cumprod[ks], rtol=1e-12, atol=0)
    assert spaced.num_timesteps == 50 and spaced.var_type is d.var_type
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match=r"steps must be an int in \[1, 1000\]"):
            space_timesteps(1000, bad)


def test_respaced_with_all_steps_is_algorithm_2() -> None:
    d, model = make_diffusion(), ToyEps(T_SMALL)
    a = sample_ancestral(model, d, SHAPE, generator=sample_generators(1, range(8)))
    b = sample_ancestral(model, d, SHAPE, timesteps=T_SMALL, generator=sample_generators(1, range(8)))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_sample_rejects_bad_arguments() -> None:
    d, model = make_diffusion(), ToyEps(T_SMALL)
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        sample(model, d, SHAPE, sampler="plms")
    with pytest.raises(ValueError, match=r"steps must be an int in \[2, 20\]"):
        sample(model, d, SHAPE, sampler="ddpm", steps=21)
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, 20\]"):
        sample(model, d, SHAPE, sampler="ddim", steps=21)
    with pytest.raises(ValueError, match="eta must be a float >= 0"):
        sample(model, d, SHAPE, sampler="ddim", eta=-0.1)
    with pytest.raises(ValueError, match="shape must be"):
        sample_ancestral(model, d, (0, 2, 4, 4))


# ---------------------------------------------------------------------------------- the toy Gaussian
@pytest.mark.parametrize(
    "T,var_type,n,discretisation_tol",
    [
        (1000, "fixedlarge", 20_000, 0.005),
        (200, "fixedsmall", 20_000, 0.08),
        pytest.param(1000, "fixedlarge", 100_000, 0.005, marks=pytest.mark.slow),
        pytest.param(1000, "fixedsmall", 100_000, 0.02, marks=pytest.mark.slow),
    ],
)
def test_algorithm_2_reproduces_a_gaussian_with_its_optimal_denoiser(
    T: int, var_type: str, n: int, discretisation_tol: float
) -> None:
    """x0 ~ N(m, diag(s^2)) in 2-D, the paper's linear schedule (betas 1e-4 .. 0.02 at T = 1000,
    x 1000 / T for fewer steps). The optimal
    eps-predictor is E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar); with
    it, Algorithm 2 (no clipping) is a linear-Gaussian chain whose output moments follow a
    recursion. Checks: (a) the moments of n samples agree with that recursion within 5 standard
    errors (sd of the mean sqrt(v/n), of the variance v sqrt(2/(n-1))); (b) the recursion's moments
    equal the data's up to the chain's discretisation error (mean within 0.001; variance within
    0.5% / 2% at T = 1000 for sigma^2 = beta / beta-tilde (measured 0.3% / 1.6%), within 8% at
    T = 200 for beta-tilde (measured 6.8%)); so (c) the samples' moments match the data's within 5 standard
    errors plus that error."""
    d = DiffusionConfig(num_timesteps=T, beta_start=0.1 / T, beta_end=20.0 / T, var_type=var_type).build()
    m = torch.tensor([1.5, -0.5], dtype=torch.float64)
    s2 = torch.tensor([0.25, 4.0], dtype=torch.float64)
    abar = d.alphas_cumprod

    def optimal_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = abar[t].to(x.dtype)[:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * m.to(x.dtype)) / (ab * s2.to(x.dtype) + 1 - ab)

    x = sample_ancestral(optimal_eps, d, (n, 2), generator=torch.Generator().manual_seed(0),
                         clip_denoised=False).double()
    # exact moments of the chain: x_{t-1} = A_t x_t + B_t + sigma_t z
    mu, var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        ab, c = abar[t], (1 - abar[t]).sqrt() / (abar[t] * s2 + 1 - abar[t])
        P = (1 - (1 - ab).sqrt() * c) / ab.sqrt()  # pred_x0 = P x + Q
        Q = (1 - ab).sqrt() * c * m
        A = d.posterior_mean_coef1[t] * P + d.posterior_mean_coef2[t]
        B = d.posterior_mean_coef1[t] * Q
        sig2 = d.model_variance_fixed[t] if t > 0 else torch.zeros((), dtype=torch.float64)
        mu, var = A * mu + B, A**2 * var + sig2
    se_mean, se_var = (var / n).sqrt(), var * math.sqrt(2 / (n - 1))
    assert ((x.mean(0) - mu).abs() < 5 * se_mean).all(), (x.mean(0), mu, se_mean)
    assert ((x.var(0) - var).abs() < 5 * se_var).all(), (x.var(0), var, se_var)
    torch.testing.assert_close(mu, m, rtol=0, atol=1e-3)
    torch.testing.assert_close(var, s2, rtol=discretisation_tol, atol=0)
    assert ((x.mean(0) - m).abs() < 5 * se_mean + 1e-3).all()
    assert ((x.var(0) / s2 - 1).abs() < 5 * se_var / s2 + discretisation_tol).all()


# ---------------------------------------------------------------------------------- speed options
def test_prepare_model_default_path_keeps_the_numbers(tiny_unet: torch.nn.Module) -> None:
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 3, 5, 9])
    with torch.inference_mode():
        ref = tiny_unet(x, t)
        assert torch.equal(prepare_model(tiny_unet, device="cpu")(x, t), ref)
        fast = prepare_model(tiny_unet, device="cpu", bf16=True, channels_last=True)(x, t)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        prepare_model(tiny_unet, device="cpu", cuda_graphs=True)


class ToyXprev:
    """A nonlinear x_prev model (not an oracle)."""

    def __init__(self, d: GaussianDiffusion) -> None:
        self.d, self.eps = d, ToyEps(d.num_timesteps, per_sample_mean=False)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = self.d.predict_x0_from_eps(x, t, self.eps(x, t)).clamp(-1, 1)
        return self.d.q_posterior_mean_variance(x0, x, t)[0]


def test_ddim_and_respaced_ddpm_agree_on_x_prev_models() -> None:
    """DDIM with eta = 1 over kept steps is the respaced chain with sigma^2 = beta-tilde (eq. 7 of
    the respaced chain): on an x_prev model they agree only if respacing converts its output."""
    d = diffusion_of(100, "x_prev", "fixedsmall")
    model = ToyXprev(d)
    for spec in (12, "ddim20", [0, 40, 41, 99]):
        a = sample_ancestral(model, d, SHAPE4, timesteps=spec, generator=sample_generators(2, range(4)))
        b = sample_ddim(model, d, SHAPE4, timesteps=spec, eta=1.0, generator=sample_generators(2, range(4)))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- single steps
def test_p_sample_is_algorithm_2_line_4() -> None:
    d, model = diffusion_of(20), ToyEps(20, per_sample_mean=False)
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(SHAPE4, generator=g), torch.randn(SHAPE4, generator=g)
    t = torch.tensor([7, 0, 19, 3])
    out = p_sample(model, d, x, t, noise=z)
    p = d.p_mean_variance(model, x, t)
    sigma = torch.exp(0.5 * p["log_variance"]) * (t != 0).view(-1, 1, 1, 1)
    torch.testing.assert_close(out["sample"], p["mean"] + sigma * z)
    assert torch.equal(out["sample"][1], p["mean"][1])  # no noise at the paper's t = 1
    assert torch.equal(p_sample(model, d, x, 5, noise=None)["sample"], d.p_mean_variance(
        model, x, torch.full((4,), 5))["mean"])
    with pytest.raises(ValueError, match=r"t must lie in \[0, 19\]"):
        p_sample(model, d, x, 20, noise=z)
    with pytest.raises(ValueError, match="noise must have the shape"):
        p_sample(model, d, x, 3, noise=z[:2])


def test_ddim_step_is_eq_12() -> None:
    d, model = diffusion_of(20), ToyEps(20, per_sample_mean=False)
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(SHAPE4, generator=g), torch.randn(SHAPE4, generator=g)
    p = d.p_mean_variance(model, x, torch.full((4,), 12))
    abar, abar_prev = d.alphas_cumprod[12], d.alphas_cumprod[5]
    sig2 = 0.49 * (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    ref = abar_prev.sqrt() * p["pred_x0"] + (1 - abar_prev - sig2).sqrt() * p["pred_eps"] + sig2.sqrt() * z
    torch.testing.assert_close(ddim_step(model, d, x, 12, 5, eta=0.7, noise=z)["sample"], ref.float())
    with pytest.raises(ValueError, match="pass noise"):
        ddim_step(model, d, x, 12, 5, eta=0.7)
    t_prev_message = r"^t_prev must be an int in \[-1, 11\] \(t - 1; -1 lands on x_0\), got 12$"
    with pytest.raises(ValueError, match=t_prev_message):
        ddim_step(model, d, x, 12, 12)
    mean, _ = ddim_mean_variance(d, x, 12, 5, p["pred_x0"], p["pred_eps"], 0.0)
    assert torch.equal(ddim_step(model, d, x, 12, 5)["sample"], mean)


# ---------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("sampler,spec", [("ddpm", None), ("ddpm", "ddim4"), ("ddim", [2, 9, 17])])
def test_callback_sees_each_step(sampler: str, spec) -> None:
    d, model = diffusion_of(20), ToyEps(20, per_sample_mean=False)
    seen = []
    x_T = torch.randn(SHAPE4, generator=torch.Generator().manual_seed(5))
    fn = sample_ancestral if sampler == "ddpm" else sample_ddim
    x0 = fn(model, d, SHAPE4, timesteps=spec, x_T=x_T, generator=sample_generators(0, range(4)),
            callback=lambda step, t, x_t, pred_x0: seen.append((step, t, x_t, pred_x0)))
    kept = parse_timesteps(20, spec)
    assert [(s, t) for s, t, _, _ in seen] == list(enumerate(kept[::-1]))
    assert torch.equal(seen[0][2], x_T)
    torch.testing.assert_close(seen[-1][3], x0)  # the last step lands on its pred_x0


def test_samplers_validate_once_not_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The t range check (torch.aminmax: a device sync on a GPU) runs at the public boundary only."""
    d, model = diffusion_of(20), ToyEps(20, per_sample_mean=False)
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    sample_ancestral(model, d, SHAPE4, generator=torch.Generator().manual_seed(0))
    sample_ancestral(model, d, SHAPE4, timesteps=5, generator=torch.Generator().manual_seed(0))
    sample_ddim(model, d, SHAPE4, timesteps=5, eta=0.5, generator=torch.Generator().manual_seed(0))
    assert calls == []
    p_sample(model, d, torch.zeros(SHAPE4), 3, noise=None)
    assert calls == [1]
    with pytest.raises(ValueError, match="eta must be a float >= 0"):
        sample_ddim(model, d, SHAPE4, eta=-1.0)
    with pytest.raises(ValueError, match="x_T must have shape"):
        sample_ancestral(model, d, SHAPE4, x_T=torch.zeros(2, 2))
