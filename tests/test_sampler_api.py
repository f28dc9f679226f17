"""The sampler API (issue 13): the public respaced diffusion and its oracle models per
parameterization, timesteps as a count / improved-diffusion string / list (against improved-diffusion's
``space_timesteps`` re-implemented here from its published code), the public single steps, the
sampler contract's callback and boundary validation, and DDIM inversion against the closed-form
probability-flow map of a Gaussian."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from stand_ins import diffusers_ddpm_chain

from ddpmkit.chains import ddim_invert
from ddpmkit.diffusion import DiffusionConfig, GaussianDiffusion
from ddpmkit.respace import (
    SpacedDiffusion,
    improved_diffusion_timesteps,
    parse_timesteps,
    respace_diffusion,
    space_timesteps,
)
from ddpmkit.sampling import ddim_mean_variance, ddim_step, p_sample, sample, sample_ancestral, sample_ddim
from ddpmkit.seeds import sample_generators

SHAPE = (4, 2, 4, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


def make(T: int = 1000, mean_type: str = "eps", var_type: str = "fixedlarge") -> GaussianDiffusion:
    b0, b1 = 1e-4 * 1000 / T, min(0.02 * 1000 / T, 0.4)
    loss_type = "hybrid" if var_type.startswith("learned") else "mse"
    return DiffusionConfig(num_timesteps=T, beta_start=b0, beta_end=b1, mean_type=mean_type,
                           var_type=var_type, loss_type=loss_type).build()


# ---------------------------------------------------------------------------------- improved-diffusion
def reference_space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """improved-diffusion's ``respace.space_timesteps`` (openai/improved-diffusion,
    improved_diffusion/respace.py), re-implemented from its published code."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def test_improved_diffusion_strings_give_its_exact_picks() -> None:
    T = 1000
    assert parse_timesteps(T, "ddim50") == list(range(0, 1000, 20))
    for spec in ("ddim50", "ddim10", "ddim250", "10,15,20", "1,2,3", "7", "999", "1000", "300,1"):
        assert parse_timesteps(T, spec) == sorted(reference_space_timesteps(T, spec)), spec
    # every single-section count, ties included: the string form is improved-diffusion's
    ties = 0
    for S in range(1, T):
        ref = sorted(reference_space_timesteps(T, str(S)))
        assert improved_diffusion_timesteps(T, str(S)) == ref, S
        ties += space_timesteps(T, S) != ref  # the count keeps today's rounding
    assert ties > 0  # the two roundings differ at half-integer ties (measured: see the note)
    for bad, msg in (("ddim7x", "ddimN"), ("ddim999", "no integer stride"), ("a,b", "section counts"),
                     ("600,600", "cannot take")):
        with pytest.raises(ValueError, match=msg):
            parse_timesteps(T, bad)


def test_counts_lists_and_none() -> None:
    T = 20
    assert parse_timesteps(T, None) == list(range(T))
    assert parse_timesteps(T, 6) == [0, 4, 8, 11, 15, 19]  # round(i 19 / 5), ties to even
    assert parse_timesteps(T, [19, 0, 7]) == [0, 7, 19]  # any order, as diffusers' timesteps=[...]
    assert parse_timesteps(T, torch.tensor([3, 1])) == [1, 3]
    for bad in ([0, 0, 3], [20], [1.5, 3], [], True):
        with pytest.raises(ValueError, match="timestep"):
            parse_timesteps(T, bad)


class ToyEps:
    def __init__(self, T: int) -> None:
        g = torch.Generator().manual_seed(123)
        self.a, self.b = 0.5 + torch.rand(T, generator=g), 0.3 * torch.randn(T, generator=g)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.a[t].view(-1, 1, 1, 1), self.b[t].view(-1, 1, 1, 1)
        return torch.tanh(a * x + b)


@pytest.mark.parametrize("spec", [6, "6", "ddim5", "3,2", [0, 3, 7, 19]])
def test_every_timestep_form_matches_diffusers_custom_timesteps(spec) -> None:
    T = 20
    d, model = make(T), ToyEps(T)
    kept = parse_timesteps(T, spec)
    if isinstance(spec, str):
        assert kept == sorted(reference_space_timesteps(T, spec))
    ours = sample_ancestral(model, d, SHAPE, timesteps=spec, generator=torch.Generator().manual_seed(3))
    sched = DDPMScheduler(num_train_timesteps=T, beta_start=0.005, beta_end=0.4, beta_schedule="linear",
                          clip_sample=True, prediction_type="epsilon", variance_type="fixed_large")
    torch.testing.assert_close(ours, diffusers_ddpm_chain(sched, model, kept, SHAPE, 3), atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------- oracle models
class Oracle:
    """The perfect model of each parameterization for one known x0 (float64): it reads the
    *original* timestep t it is given, so a respaced index passed by mistake breaks it."""

    def __init__(self, d: GaussianDiffusion, x0: torch.Tensor, extra_channels: bool = False) -> None:
        self.d, self.x0, self.extra, self.seen = d, x0, extra_channels, set()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen |= set(t.tolist())
        d, x0 = self.d, self.x0
        ab = d.alphas_cumprod[t].view(-1, 1, 1, 1)
        if d.mean_type.value == "eps":
            out = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        elif d.mean_type.value == "x0":
            out = x0.expand_as(x_t)
        else:  # the mean of x_{t-1} of the full chain, eq. (7)
            out = d.posterior_mean_coef1[t].view(-1, 1, 1, 1) * x0 + d.posterior_mean_coef2[t].view(
                -1, 1, 1, 1) * x_t
        return torch.cat([out, torch.zeros_like(out)], 1) if self.extra else out


@pytest.mark.parametrize("mean_type", ["eps", "x0", "x_prev"])
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall", "learned_range"])
@pytest.mark.parametrize("spec", [50, "10,15,20", [0, 1, 500, 999]])
def test_oracle_pred_x0_is_exact_under_respacing(mean_type: str, var_type: str, spec) -> None:
    d = make(1000, mean_type, var_type)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1)
    model = Oracle(d, x0, extra_channels=var_type == "learned_range")
    spaced = respace_diffusion(d, spec)
    assert isinstance(spaced, SpacedDiffusion) and spaced.timesteps == tuple(parse_timesteps(1000, spec))
    S = spaced.num_timesteps
    i = torch.tensor([S - 1, S // 2, 1, 0])
    k = spaced.timestep_map[i]
    x_t = d.q_sample(x0, k, torch.randn(SHAPE, generator=g, dtype=torch.float64))
    p = spaced.p_mean_variance(model, x_t, i, clip_denoised=False)
    torch.testing.assert_close(p["pred_x0"], x0, atol=1e-9, rtol=0)
    mean, _, _ = spaced.q_posterior_mean_variance(x0, x_t, i)  # the jump k_i -> k_{i-1}
    torch.testing.assert_close(p["mean"], mean, atol=1e-9, rtol=0)
    assert model.seen <= set(spaced.timesteps)
    # training through the respaced diffusion: the oracle's L_simple is 0, the model sees k_i
    noise = (x_t - d.sqrt_alphas_cumprod[k].view(-1, 1, 1, 1) * x0) / d.sqrt_one_minus_alphas_cumprod[
        k].view(-1, 1, 1, 1)
    terms = spaced.training_losses(model, x0, i, noise)
    torch.testing.assert_close(terms["mse"], torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_the_bound_loop_through_a_spaced_diffusion_calls_the_model_with_kept_timesteps() -> None:
    d = make(100, "x_prev")
    x0 = torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    model = Oracle(d, x0)
    spaced = respace_diffusion(d, "ddim10")
    out = spaced.calc_bpd_loop(model, x0, clip_denoised=False, generator=torch.Generator().manual_seed(1))
    assert model.seen == set(range(0, 100, 10))
    torch.testing.assert_close(out["x0_mse"], torch.zeros(2, 10, dtype=torch.float64), atol=1e-18, rtol=0)


def test_raw_learned_variance_is_refused_under_respacing() -> None:
    d = make(100, "eps", "learned")
    with pytest.raises(ValueError, match="learned_range"):
        respace_diffusion(d, 10)
    with pytest.raises(ValueError, match="all 100 steps"):
        sample(ToyEps(100), d, SHAPE, steps=10)
    assert respace_diffusion(d, None).num_timesteps == 100  # the full chain is fine


class ToyXprev:
    """A nonlinear x_prev model (not an oracle)."""

    def __init__(self, d: GaussianDiffusion) -> None:
        self.d, self.eps = d, ToyEps(d.num_timesteps)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = self.d.predict_x0_from_eps(x, t, self.eps(x, t)).clamp(-1, 1)
        return self.d.q_posterior_mean_variance(x0, x, t)[0]


def test_ddim_and_respaced_ddpm_agree_on_x_prev_models() -> None:
    """DDIM with eta = 1 over kept steps is the respaced chain with sigma^2 = beta-tilde (eq. 7 of
    the respaced chain): on an x_prev model they agree only if respacing converts its output."""
    d = make(100, "x_prev", "fixedsmall")
    model = ToyXprev(d)
    for spec in (12, "ddim20", [0, 40, 41, 99]):
        a = sample_ancestral(model, d, SHAPE, timesteps=spec, generator=sample_generators(2, range(4)))
        b = sample_ddim(model, d, SHAPE, timesteps=spec, eta=1.0, generator=sample_generators(2, range(4)))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- single steps
def test_p_sample_is_algorithm_2_line_4() -> None:
    d, model = make(20), ToyEps(20)
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
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
    d, model = make(20), ToyEps(20)
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    p = d.p_mean_variance(model, x, torch.full((4,), 12))
    abar, abar_prev = d.alphas_cumprod[12], d.alphas_cumprod[5]
    sig2 = 0.49 * (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    ref = abar_prev.sqrt() * p["pred_x0"] + (1 - abar_prev - sig2).sqrt() * p["pred_eps"] + sig2.sqrt() * z
    torch.testing.assert_close(ddim_step(model, d, x, 12, 5, eta=0.7, noise=z)["sample"], ref.float())
    with pytest.raises(ValueError, match="pass noise"):
        ddim_step(model, d, x, 12, 5, eta=0.7)
    with pytest.raises(ValueError, match=r"^t_prev must be an int in \[-1, 11\] \(t - 1; -1 lands on x_0\), got 12$"):
        ddim_step(model, d, x, 12, 12)
    mean, _ = ddim_mean_variance(d, x, 12, 5, p["pred_x0"], p["pred_eps"], 0.0)
    assert torch.equal(ddim_step(model, d, x, 12, 5)["sample"], mean)


# ---------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("sampler,spec", [("ddpm", None), ("ddpm", "ddim4"), ("ddim", [2, 9, 17])])
def test_callback_sees_each_step(sampler: str, spec) -> None:
    d, model = make(20), ToyEps(20)
    seen = []
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    fn = sample_ancestral if sampler == "ddpm" else sample_ddim
    x0 = fn(model, d, SHAPE, timesteps=spec, x_T=x_T, generator=sample_generators(0, range(4)),
            callback=lambda step, t, x_t, pred_x0: seen.append((step, t, x_t, pred_x0)))
    kept = parse_timesteps(20, spec)
    assert [(s, t) for s, t, _, _ in seen] == list(enumerate(kept[::-1]))
    assert torch.equal(seen[0][2], x_T)
    torch.testing.assert_close(seen[-1][3], x0)  # the last step lands on its pred_x0


def test_samplers_validate_once_not_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The t range check (torch.aminmax: a device sync on a GPU) runs at the public boundary only."""
    d, model = make(20), ToyEps(20)
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    sample_ancestral(model, d, SHAPE, generator=torch.Generator().manual_seed(0))
    sample_ancestral(model, d, SHAPE, timesteps=5, generator=torch.Generator().manual_seed(0))
    sample_ddim(model, d, SHAPE, timesteps=5, eta=0.5, generator=torch.Generator().manual_seed(0))
    assert calls == []
    p_sample(model, d, torch.zeros(SHAPE), 3, noise=None)
    assert calls == [1]
    with pytest.raises(ValueError, match="eta must be a float >= 0"):
        sample_ddim(model, d, SHAPE, eta=-1.0)
    with pytest.raises(ValueError, match="x_T must have shape"):
        sample_ancestral(model, d, SHAPE, x_T=torch.zeros(2, 2))


# ---------------------------------------------------------------------------------- DDIM inversion
def test_ddim_inversion_against_the_gaussian_flow() -> None:
    """x0 ~ N(m, diag(s^2)) with its optimal eps-predictor. The probability-flow ODE that DDIM
    discretises maps x0 to x_k = sqrt(abar_k) m + sqrt(abar_k s^2 + 1 - abar_k) (x0 - m) / s, so
    the encoding must approach that map and eta = 0 sampling from it must give x0 back, both
    with errors that shrink as the steps do (measured at T = 1000, n = 4000: map error 0.0175,
    0.21, 0.95 and round trip 0.011, 0.11, 0.48 for all steps, ddim100, ddim20)."""
    T = 1000
    d = make(T)
    m = torch.tensor([0.3, -0.2], dtype=torch.float64)
    s2 = torch.tensor([0.04, 0.25], dtype=torch.float64)
    abar = d.alphas_cumprod

    def optimal_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = abar[t][:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * s2 + 1 - ab)

    x0 = m + s2.sqrt() * torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for spec, map_tol, rec_tol in ((None, 0.025, 0.015), ("ddim100", 0.3, 0.15), ("ddim20", 1.2, 0.6)):
        k = parse_timesteps(T, spec)[-1]
        x_T = ddim_invert(optimal_eps, d, x0, spec)
        flow = abar[k].sqrt() * m + (abar[k] * s2 + 1 - abar[k]).sqrt() * (x0 - m) / s2.sqrt()
        rec = sample_ddim(optimal_eps, d, x0.shape, timesteps=spec, x_T=x_T, clip_denoised=False)
        errors.append(((x_T - flow).abs().max().item(), (rec - x0).abs().max().item()))
        assert errors[-1][0] < map_tol and errors[-1][1] < rec_tol, (spec, errors[-1])
    assert errors[0] < errors[1] < errors[2]
