"""GaussianDiffusion against closed forms, Bayes' rule, the authors' conventions and HF diffusers.

The bound (calc_bpd_loop) against the single-image oracle (tests/oracles.py) is at the end.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from oracles import ImageOracle

from ddpmkit.diffusion import DiffusionConfig, GaussianDiffusion, LossType, MeanType, VarType, mean_flat
from ddpmkit.schedules import get_named_beta_schedule

T = 1000


LN2 = math.log(2.0)


def _np_schedule(n: int = T) -> dict[str, np.ndarray]:
    """The paper's linear schedule and the quantities of eq. (4) and (7), in NumPy float64."""
    betas = np.linspace(1e-4, 0.02, n, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    return {"betas": betas, "abar": abar, "abar_prev": abar_prev, "pv": betas * (1 - abar_prev) / (1 - abar)}


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return DiffusionConfig(var_type=VarType.FIXED_SMALL).build()


# ---------------------------------------------------------------- eq. (4): q(x_t | x_0) by sampling
N_SAMPLES = 200_000


N_CHAIN = 50_000


Z = 5.0  # every statistical bound below is a 5-sigma bound: two-sided p ~ 6e-7 per quantity


def _assert_moments(x: torch.Tensor, mean: torch.Tensor, var: float) -> None:
    """x: (N, D) samples of N(mean, var I). Sample mean within Z * sqrt(var / N); sample covariance
    within Z * var * sqrt(2 / N) on the diagonal and Z * var / sqrt(N) off it."""
    n = x.shape[0]
    emp_mean = x.mean(0)
    assert (emp_mean - mean).abs().max().item() < Z * math.sqrt(var / n)
    cov = torch.cov(x.T)
    d = torch.diagonal(cov)
    assert (d - var).abs().max().item() < Z * var * math.sqrt(2 / n)
    off = cov - torch.diag(d)
    assert off.abs().max().item() < Z * var / math.sqrt(n)


@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_q_sample_moments_match_closed_form(diffusion: GaussianDiffusion, t: int) -> None:
    ref = _np_schedule()
    g = torch.Generator().manual_seed(100 + t)
    x0 = torch.tensor([0.9, -0.4, 0.0, 1.0], dtype=torch.float64)  # D = 4
    x0_batch = x0.expand(N_SAMPLES, 4)
    x_t = diffusion.q_sample(x0_batch, torch.full((N_SAMPLES,), t), generator=g)
    _assert_moments(x_t, math.sqrt(ref["abar"][t]) * x0, 1 - ref["abar"][t])
    # and the marginal is Gaussian, not only its first two moments (KS test, p > 1e-4)
    z = (x_t[:, 0] - math.sqrt(ref["abar"][t]) * 0.9) / math.sqrt(1 - ref["abar"][t])
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-4


def test_q_mean_variance_closed_form(diffusion: GaussianDiffusion) -> None:
    ref = _np_schedule()
    x0 = torch.randn(7, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 5, 100, 500, 998, 999])
    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    ab = torch.from_numpy(ref["abar"])[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, ab.sqrt() * x0, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(var, (1 - ab).expand_as(x0), rtol=1e-13, atol=0)
    torch.testing.assert_close(log_var, (1 - ab).log().expand_as(x0), rtol=1e-13, atol=1e-15)
    # in float32 the variance is 1 - abar_t rounded once (computed in float64): no cancellation at small t
    _, var32, _ = diffusion.q_mean_variance(x0.float(), t)
    torch.testing.assert_close(var32, (1 - ab).float().expand_as(x0), rtol=0, atol=0)


def test_q_sample_is_the_reparameterization(diffusion: GaussianDiffusion) -> None:
    ref = _np_schedule()
    x0, eps = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 3, 77, 600, 999])
    ab = torch.from_numpy(ref["abar"])[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion.q_sample(x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


# ---------------------------------------------------------------- eq. (2) chained = eq. (4)
def test_chained_transitions_exact_recursion() -> None:
    """Composing x_s = sqrt(alpha_s) x_{s-1} + sqrt(beta_s) eps_s: the mean factor is prod sqrt(alpha_s)
    and the variance obeys v_s = alpha_s v_{s-1} + beta_s; both give abar_t in closed form."""
    d = DiffusionConfig(schedule="cosine", num_timesteps=400).build()
    scale, v = 1.0, 0.0
    for s in range(d.num_timesteps):
        a = float(d.alphas[s])
        scale, v = scale * math.sqrt(a), a * v + (1 - a)
        assert scale == pytest.approx(float(d.sqrt_alphas_cumprod[s]), rel=1e-12)
        assert v == pytest.approx(1 - float(d.alphas_cumprod[s]), rel=1e-10, abs=1e-15)


@pytest.mark.parametrize("t", [1, 20, 100, pytest.param(999, marks=pytest.mark.slow)])
def test_chained_transitions_sample_the_same_distribution(diffusion: GaussianDiffusion, t: int) -> None:
    betas = diffusion.betas
    g = torch.Generator().manual_seed(7 + t)
    x0 = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    x = x0.expand(N_CHAIN, 3).clone()
    for s in range(t + 1):  # q(x_s | x_{s-1}) = N(sqrt(1 - beta_s) x_{s-1}, beta_s I), eq. (2)
        x = torch.sqrt(1 - betas[s]) * x + torch.sqrt(betas[s]) * torch.randn(
            x.shape, generator=g, dtype=x.dtype
        )
    ab = float(diffusion.alphas_cumprod[t])
    _assert_moments(x, math.sqrt(ab) * x0, 1 - ab)
    direct = diffusion.q_sample(x0.expand(N_CHAIN, 3), torch.full((N_CHAIN,), t), generator=g)
    # the two samplers draw from one distribution: two-sample KS test per coordinate
    for j in range(3):
        assert scipy.stats.ks_2samp(x[:, j].numpy(), direct[:, j].numpy()).pvalue > 1e-4


# ---------------------------------------------------------------- eq. (6)-(7): the posterior
def test_posterior_equals_bayes_rule_by_completing_the_square(diffusion: GaussianDiffusion) -> None:
    """q(x_{t-1}|x_t,x_0) is proportional to q(x_t|x_{t-1}) q(x_{t-1}|x_0). As a function of y = x_{t-1}
    the log of the product is -y^2 / 2 * (alpha_t/beta_t + 1/(1-abar_{t-1}))
    + y * (sqrt(alpha_t) x_t / beta_t + sqrt(abar_{t-1}) x_0 / (1 - abar_{t-1})) + const."""
    ref = _np_schedule()
    rng = np.random.default_rng(0)
    for _ in range(200):
        t = int(rng.integers(1, T))
        x0, x_t = rng.normal(size=2)
        a, b, ab_prev = 1 - ref["betas"][t], ref["betas"][t], ref["abar_prev"][t]
        precision = a / b + 1 / (1 - ab_prev)
        linear = math.sqrt(a) * x_t / b + math.sqrt(ab_prev) * x0 / (1 - ab_prev)
        mean, var, _ = diffusion.q_posterior_mean_variance(
            torch.tensor([[x0]], dtype=torch.float64),
            torch.tensor([[x_t]], dtype=torch.float64),
            torch.tensor([t]),
        )
        assert mean.item() == pytest.approx(linear / precision, rel=1e-11, abs=1e-13)
        assert var.item() == pytest.approx(1 / precision, rel=1e-11)


def test_posterior_matches_a_quadratic_fit_of_the_log_product(diffusion: GaussianDiffusion) -> None:
    """Numerically: evaluate log q(x_t|y) + log q(y|x_0) on a grid of y with scipy and fit a parabola."""
    ref = _np_schedule()
    for t, x0, x_t in [(1, 0.3, -0.2), (50, -0.9, 0.4), (500, 0.1, 1.7), (999, 1.0, -0.5)]:
        a, b, ab_prev = 1 - ref["betas"][t], ref["betas"][t], ref["abar_prev"][t]
        mean, var, log_var = diffusion.q_posterior_mean_variance(
            torch.tensor([[x0]], dtype=torch.float64),
            torch.tensor([[x_t]], dtype=torch.float64),
            torch.tensor([t]),
        )
        y = mean.item() + math.sqrt(var.item()) * np.linspace(-3, 3, 61)
        logp = scipy.stats.norm.logpdf(x_t, math.sqrt(a) * y, math.sqrt(b)) + scipy.stats.norm.logpdf(
            y, math.sqrt(ab_prev) * x0, math.sqrt(1 - ab_prev)
        )
        c2, c1, _ = np.polyfit(y - mean.item(), logp, 2)
        assert -1 / (2 * c2) == pytest.approx(var.item(), rel=1e-7)  # variance
        assert c1 == pytest.approx(0.0, abs=1e-6 / math.sqrt(var.item()))  # the vertex is at the mean
        assert log_var.item() == pytest.approx(math.log(var.item()), rel=1e-12)


def test_posterior_at_first_step_is_x0(diffusion: GaussianDiffusion) -> None:
    """For the paper's t = 1 (index 0), x_0 is given, so q(x_0 | x_1, x_0) is a point mass at x_0."""
    x0, x_t = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, torch.zeros(3, dtype=torch.int64))
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)  # coef1 = beta_1 / (1 - (1 - beta_1))
    assert bool((var == 0).all())
    # the log is clipped to log beta-tilde at the paper's t = 2 (authors' code)
    torch.testing.assert_close(log_var, torch.full_like(x0, math.log(_np_schedule()["pv"][1])))


# ---------------------------------------------------------------- the authors' conventions
def test_variance_conventions_of_the_released_code() -> None:
    ref = _np_schedule()
    pv, betas = ref["pv"], ref["betas"]
    large = DiffusionConfig(var_type="fixedlarge").build()
    small = DiffusionConfig(var_type="fixedsmall").build()
    # fixedlarge: np.log(np.append(posterior_variance[1], betas[1:]))
    np.testing.assert_allclose(
        large.model_log_variance_fixed.numpy(), np.log(np.append(pv[1], betas[1:])), rtol=1e-13
    )
    np.testing.assert_allclose(large.model_variance_fixed.numpy(), np.append(pv[1], betas[1:]), rtol=1e-13)
    # fixedsmall: posterior variance, log clipped: log(append(posterior_variance[1], posterior_variance[1:]))
    np.testing.assert_allclose(small.model_variance_fixed.numpy(), pv, rtol=1e-13)
    np.testing.assert_allclose(
        small.posterior_log_variance_clipped.numpy(), np.log(np.append(pv[1], pv[1:])), rtol=1e-13
    )
    coef1 = betas * np.sqrt(ref["abar_prev"]) / (1 - ref["abar"])
    coef2 = (1 - ref["abar_prev"]) * np.sqrt(1 - betas) / (1 - ref["abar"])
    np.testing.assert_allclose(small.posterior_mean_coef1.numpy(), coef1, rtol=1e-13)
    np.testing.assert_allclose(small.posterior_mean_coef2.numpy(), coef2, rtol=1e-13)
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"):
        assert getattr(small, name).dtype == torch.float64 and getattr(small, name).device.type == "cpu"


def test_learned_range_interpolates_between_log_beta_tilde_and_log_beta() -> None:
    d = DiffusionConfig(var_type="learned_range").build()
    assert d.model_output_channels(3) == 6
    x_t = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 400, 999])
    for v, frac in [(-1.0, 0.0), (1.0, 1.0), (0.0, 0.5), (-0.5, 0.25)]:
        out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], dim=1)
        p = d.p_mean_variance_from_output(out, x_t, t)
        expected = frac * d.log_betas[t] + (1 - frac) * d.posterior_log_variance_clipped[t]
        torch.testing.assert_close(p["log_variance"], expected.view(-1, 1, 1, 1).expand_as(x_t))
        torch.testing.assert_close(p["variance"], p["log_variance"].exp())
    learned = DiffusionConfig(var_type="learned").build()
    out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, -3.0)], dim=1)
    assert bool((learned.p_mean_variance_from_output(out, x_t, t)["log_variance"] == -3.0).all())


@pytest.mark.parametrize("mean_type", list(MeanType))
def test_mean_parameterizations_agree(mean_type: MeanType) -> None:
    """The three parameterizations of mu_theta describe one Gaussian when they encode the same x_0:
    eps (eq. 11), x_0 (through eq. 7) and x_prev (the posterior mean itself)."""
    d = GaussianDiffusion(betas=DiffusionConfig().betas(), mean_type=mean_type)
    ref = GaussianDiffusion(betas=DiffusionConfig().betas(), mean_type=MeanType.EPS)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64) * 1.6 - 0.8
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 300, 700, 999])
    x_t = d.q_sample(x0, t, eps)
    output = {MeanType.EPS: eps, MeanType.X0: x0, MeanType.X_PREV: d.q_posterior_mean_variance(x0, x_t, t)[0]}
    p = d.p_mean_variance(lambda x, s: output[mean_type], x_t, t, clip_denoised=False)
    torch.testing.assert_close(p["pred_x0"], x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(p["pred_eps"], eps, rtol=1e-7, atol=1e-7)
    # eq. (11): mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
    b, ab = ref.betas[t].view(-1, 1, 1, 1), ref.alphas_cumprod[t].view(-1, 1, 1, 1)
    mu11 = (x_t - b / (1 - ab).sqrt() * eps) / (1 - b).sqrt()
    torch.testing.assert_close(p["mean"], mu11, rtol=1e-10, atol=1e-10)


def test_clip_denoised_clamps_pred_x0() -> None:
    d = DiffusionConfig().build()
    x_t = torch.full((2, 1, 2, 2), 3.0, dtype=torch.float64)
    t = torch.tensor([5, 900])
    eps = torch.zeros_like(x_t)
    clipped = d.p_mean_variance(lambda x, s: eps, x_t, t, clip_denoised=True)
    free = d.p_mean_variance(lambda x, s: eps, x_t, t, clip_denoised=False)
    assert bool((clipped["pred_x0"] == 1.0).all()) and bool((free["pred_x0"] > 3.0).all())
    expected = d.q_posterior_mean_variance(torch.ones_like(x_t), x_t, t)[0]
    torch.testing.assert_close(clipped["mean"], expected)


# ---------------------------------------------------------------- HF diffusers' DDPMScheduler
DIFFUSERS_VAR = {"fixed_small": "fixedsmall", "fixed_large": "fixedlarge"}


STEP_TS = [0, 1, 2, 17, 500, 998, 999]


def _scheduler(variance_type: str, float64: bool = False):  # -> diffusers.DDPMScheduler
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type=variance_type,
        clip_sample=True,
        prediction_type="epsilon",
    )
    if float64:  # diffusers' own step code, run on float64 copies of its tables
        sched.betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        sched.alphas = 1.0 - sched.betas
        sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


def _step_both(ours: GaussianDiffusion, sched, x_t: torch.Tensor, eps: torch.Tensor, t: int):  # noqa: ANN202
    """Our p_mean_variance and diffusers' step at t; returns (ours, pred_x0, mean) with diffusers' mean
    recovered from prev_sample = mean + sigma_t z by redrawing z from the same seed (no noise at t = 0)."""
    p = ours.p_mean_variance(lambda x, s: eps, x_t, torch.full((x_t.shape[0],), t), clip_denoised=True)
    out = sched.step(eps, t, x_t, generator=torch.Generator().manual_seed(t))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t), dtype=x_t.dtype)
    mean = out.prev_sample if t == 0 else out.prev_sample - torch.exp(0.5 * p["log_variance"]) * z
    return p, out.pred_original_sample, mean


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_against_diffusers_float32(variance_type: str) -> None:
    """The stock scheduler works in float32. A product of t + 1 factors carries a relative error up to
    ~(t + 1) eps32 and 1 - abar amplifies it by 1 / (1 - abar); x_0 = x_t / sqrt(abar) - ... amplifies
    rounding by 1 / sqrt(abar). The bounds below are exactly float32 precision, so conditioned."""
    sched, ours = _scheduler(variance_type), DiffusionConfig(var_type=DIFFUSERS_VAR[variance_type]).build()
    eps32, steps = torch.finfo(torch.float32).eps, torch.arange(1, T + 1, dtype=torch.float64)
    abar, abar_prev = ours.alphas_cumprod, ours.alphas_cumprod_prev
    assert bool(((sched.alphas_cumprod.double() - abar).abs() <= 2 * steps * eps32 * abar).all())
    their_var = torch.stack([sched._get_variance(t) for t in range(T)]).double()
    rel = ((their_var - ours.model_variance_fixed) / ours.model_variance_fixed).abs()[1:]
    cond = steps * eps32 * (1 / (1 - abar_prev) + 1 / (1 - abar))  # (T,)
    assert bool((rel <= 2 * cond[1:]).all())
    assert rel[100:].max().item() < 1e-4
    if variance_type == "fixed_large":
        # intentional: the released code (and we) use beta-tilde_2 at t = 1; diffusers uses beta_1
        # (1 - (1 - 1e-4) in float32 = 1.00017e-4)
        assert their_var[0].item() == pytest.approx(1e-4, rel=1e-3)
        assert ours.model_variance_fixed[0].item() == pytest.approx(
            float(ours.posterior_variance[1]), rel=1e-14
        )
    g = torch.Generator().manual_seed(11)
    x_t = 1.5 * torch.randn(4, 3, 8, 8, generator=g)  # large enough that some pred_x0 get clipped
    eps = torch.randn(4, 3, 8, 8, generator=g)
    scale = (x_t.abs() + eps.abs()).double()
    for t in STEP_TS:
        p, their_x0, their_mean = _step_both(ours, sched, x_t, eps, t)
        x0_err = (p["pred_x0"] - their_x0).abs().double()
        assert bool((x0_err <= 16 * eps32 * float(ours.sqrt_recip_alphas_cumprod[t]) * scale).all()), t
        mean_err = (p["mean"] - their_mean).abs().double()
        assert bool((mean_err <= 4 * cond[t] * (scale + 1) + 8 * eps32 * scale).all()), t
    assert bool((their_x0.abs() == 1).any())  # clipping was exercised


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_against_diffusers_step_code_in_float64(variance_type: str) -> None:
    """The same comparison with diffusers' step code fed float64 tables and inputs: agreement to 1e-12,
    which shows that the float32 differences above are diffusers' float32 rounding only."""
    sched, ours = (
        _scheduler(variance_type, float64=True),
        DiffusionConfig(var_type=DIFFUSERS_VAR[variance_type]).build(),
    )
    torch.testing.assert_close(sched.alphas_cumprod, ours.alphas_cumprod, rtol=1e-15, atol=0)
    their_var = torch.stack([sched._get_variance(t) for t in range(1, T)])
    torch.testing.assert_close(their_var, ours.model_variance_fixed[1:], rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(12)
    x_t = 1.5 * torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    for t in STEP_TS:
        p, their_x0, their_mean = _step_both(ours, sched, x_t, eps, t)
        torch.testing.assert_close(p["pred_x0"], their_x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p["mean"], their_mean, rtol=1e-11, atol=1e-11)
    assert bool((their_x0.abs() == 1).any())


def test_against_diffusers_learned_range_in_float64() -> None:
    """learned_range: the model's second half v in [-1, 1] interpolates the log-variance; diffusers'
    step (float64 tables) adds exp(log_var / 2) z, so its mean and our mean and log-variance agree."""
    sched = _scheduler("learned_range", float64=True)
    ours = DiffusionConfig(var_type="learned_range", loss_type="hybrid").build()
    g = torch.Generator().manual_seed(13)
    x_t = 1.5 * torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    out = torch.cat(
        [
            torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64),
            torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1,
        ],
        dim=1,
    )  # (eps, v)
    for t in STEP_TS[1:]:  # at t = 0 diffusers takes log(1e-20) as the lower end; we clip to beta-tilde_2
        p, their_x0, their_mean = _step_both(ours, sched, x_t, out, t)
        torch.testing.assert_close(p["pred_x0"], their_x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p["mean"], their_mean, rtol=1e-11, atol=1e-11)
        their_log_var = sched._get_variance(t, predicted_variance=out[:, 3:])
        torch.testing.assert_close(p["log_variance"], their_log_var, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- training losses
class _TwoPartModel(torch.nn.Module):
    """out = [a * x_t, b * x_t + c]: separate parameters for the mean part and the variance part."""

    def __init__(self, learned: bool) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.tensor(-0.2, dtype=torch.float64))
        self.learned = learned

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mean_part = self.a * x
        return torch.cat([mean_part, self.b * x + self.c], 1) if self.learned else mean_part


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(5, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    return x0, torch.tensor([0, 1, 50, 500, 999]), torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("mean_type", list(MeanType))
def test_mse_loss_is_l_simple(mean_type: MeanType) -> None:
    d = DiffusionConfig(mean_type=mean_type, loss_type="mse").build()
    x0, t, noise = _batch()
    model = _TwoPartModel(learned=False)
    terms = d.training_losses(model, x0, t, noise)
    x_t = d.q_sample(x0, t, noise)
    target = {
        MeanType.EPS: noise,
        MeanType.X0: x0,
        MeanType.X_PREV: d.q_posterior_mean_variance(x0, x_t, t)[0],
    }[mean_type]
    expected = ((target - model(x_t, t)) ** 2).mean(dim=(1, 2, 3))  # eq. (14), per example
    torch.testing.assert_close(terms["loss"], expected.detach(), rtol=1e-12, atol=1e-12)
    assert terms["loss"].shape == (5,) and set(terms) == {"loss", "mse"}


@pytest.mark.parametrize("loss_type", ["kl", "rescaled_kl"])
def test_kl_losses_are_the_bound_terms(loss_type: str) -> None:
    d = DiffusionConfig(var_type="learned_range", loss_type=loss_type).build()
    x0, t, noise = _batch(1)
    model = _TwoPartModel(learned=True)
    terms = d.training_losses(model, x0, t, noise)
    x_t = d.q_sample(x0, t, noise)
    p = d.p_mean_variance(model, x_t, t, clip_denoised=False)
    # independent restatement of one term: Gaussian KL for t > 0 (bits/dim) ...
    true_mean, _, true_logvar = d.q_posterior_mean_variance(x0, x_t, t)
    kl = (
        torch.distributions.kl_divergence(
            torch.distributions.Normal(true_mean, (0.5 * true_logvar).exp()),
            torch.distributions.Normal(p["mean"], (0.5 * p["log_variance"]).exp()),
        ).mean(dim=(1, 2, 3))
        / LN2
    )
    scale = T if loss_type == "rescaled_kl" else 1
    torch.testing.assert_close(terms["loss"][1:], scale * kl[1:].detach(), rtol=1e-9, atol=1e-12)
    # ... and the decoder NLL at t = 0 (eq. 13), by scipy
    m, s = p["mean"][0].detach().numpy(), (0.5 * p["log_variance"][0]).exp().detach().numpy()
    xv = x0[0].numpy()
    hi = np.where(xv > 0.999, np.inf, xv + 1 / 255)
    lo = np.where(xv < -0.999, -np.inf, xv - 1 / 255)
    nll = -np.log(scipy.stats.norm.cdf(hi, m, s) - scipy.stats.norm.cdf(lo, m, s)).mean() / LN2
    assert terms["loss"][0].item() == pytest.approx(scale * nll, rel=1e-9)
    terms["loss"].sum().backward()
    assert model.a.grad.abs() > 0 and model.b.grad.abs() > 0


@pytest.mark.parametrize("var_type", ["learned", "learned_range", "fixedlarge"])
def test_hybrid_loss_stops_the_gradient_on_the_mean(var_type: str) -> None:
    d = DiffusionConfig(var_type=var_type, loss_type="hybrid", num_timesteps=T).build()
    x0, t, noise = _batch(2)
    learned = var_type != "fixedlarge"
    model = _TwoPartModel(learned=learned)
    terms = d.training_losses(model, x0, t, noise)
    x_t = d.q_sample(x0, t, noise)
    # the value: L_simple + lambda * T * L_t (lambda = 0.001 as in Nichol & Dhariwal)
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * T * terms["vb"])
    kl_ref = DiffusionConfig(var_type=var_type, loss_type="kl").build().training_losses(model, x0, t, noise)
    torch.testing.assert_close(terms["vb"], kl_ref["loss"])
    # the gradient: the mean parameter a gets exactly the gradient of L_simple
    (grad_a_total,) = torch.autograd.grad(terms["loss"].sum(), model.a, retain_graph=True)
    mse = ((noise - model(x_t, t)[:, :2]) ** 2).mean(dim=(1, 2, 3)).sum()
    (grad_a_mse,) = torch.autograd.grad(mse, model.a)
    torch.testing.assert_close(grad_a_total, grad_a_mse, rtol=1e-12, atol=1e-14)
    if learned:  # and the variance parameters only that of the bound term
        (grad_b,) = torch.autograd.grad(terms["vb"].sum(), model.b)
        assert grad_b.abs() > 0


def test_mse_with_learned_variance_is_refused() -> None:
    d = DiffusionConfig(var_type="learned_range", loss_type="mse").build()
    x0, t, noise = _batch()
    with pytest.raises(ValueError, match="expected loss_type 'hybrid'"):
        d.training_losses(_TwoPartModel(learned=True), x0, t, noise)


def test_training_losses_float32_and_generator() -> None:
    d = DiffusionConfig().build()
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 999])
    a = d.training_losses(lambda x, s: torch.zeros_like(x), x0, t, generator=torch.Generator().manual_seed(5))
    b = d.training_losses(lambda x, s: torch.zeros_like(x), x0, t, generator=torch.Generator().manual_seed(5))
    assert a["loss"].dtype == torch.float32
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)
    assert 0.7 < a["loss"].mean().item() < 1.3  # E|eps|^2 = 1 per dimension


# ---------------------------------------------------------------- calc_bpd_loop mechanics
def test_calc_bpd_loop_chunking_is_exact_and_consistent(capsys: pytest.CaptureFixture[str]) -> None:
    d = DiffusionConfig(num_timesteps=40, var_type="fixedlarge").build()
    x0 = torch.linspace(-1, 1, 256)[
        torch.randint(0, 256, (3, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    ]

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.3 * x + 0.01 * t.view(-1, 1, 1, 1)

    runs = {
        k: d.calc_bpd_loop(model, x0, t_chunk=k, generator=torch.Generator().manual_seed(9))
        for k in (None, 1, 7, 40, 100)
    }
    for k in (1, 7, 40, 100):
        for key in runs[None]:
            torch.testing.assert_close(runs[k][key], runs[None][key], rtol=1e-5, atol=1e-6)
    r = runs[7]
    assert r["vb"].shape == r["mse"].shape == r["x0_mse"].shape == (3, 40)
    torch.testing.assert_close(r["total_bpd"], r["prior_bpd"] + r["vb"].sum(1))
    # the prior term: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) in bits/dim
    ab = float(d.alphas_cumprod[-1])
    prior = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x0.double() ** 2)
    torch.testing.assert_close(r["prior_bpd"].double(), mean_flat(prior) / LN2, rtol=1e-5, atol=1e-7)
    d.calc_bpd_loop(model, x0, t_chunk=16, progress=True)
    assert "bits/dim" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input
def test_bad_inputs_raise_value_errors(diffusion: GaussianDiffusion) -> None:
    x = torch.zeros(2, 3, 4, 4)
    t = torch.tensor([0, 5])
    cases = [
        (lambda: diffusion.q_sample(x.long(), t), "x0 must be a floating-point tensor"),
        (lambda: diffusion.q_sample(x.numpy(), t), "x0 must be a torch.Tensor"),
        (lambda: diffusion.q_sample(x, t.float()), r"t must be an integer \(int64\) tensor"),
        (lambda: diffusion.q_sample(x, 3), r"t must be a \(B,\) int64 torch.Tensor"),
        (lambda: diffusion.q_sample(x, torch.tensor([0, 1, 2])), r"t must have shape \(B,\) = \(2,\)"),
        (
            lambda: diffusion.q_sample(x, torch.tensor([0, T])),
            r"t must lie in \[0, 999\].*got values in \[0, 1000\]",
        ),
        (lambda: diffusion.q_sample(x, torch.tensor([-1, 3])), r"t must lie in \[0, 999\]"),
        (
            lambda: diffusion.q_sample(x, t, torch.zeros(2, 3, 4)),
            r"noise must have the shape of x0 \(2, 3, 4, 4\)",
        ),
        (lambda: diffusion.q_posterior_mean_variance(x[:1], x, t), r"x0 must have the shape of x_t"),
        (lambda: diffusion.predict_x0_from_eps(x, t, x[:, :1]), "eps must have the shape of x_t"),
        (
            lambda: diffusion.p_mean_variance(lambda a, b: a[:, :2], x, t),
            r"model output must have shape \(2, 3, 4, 4\) for var_type 'fixedsmall', got \(2, 2, 4, 4\)",
        ),
        (lambda: diffusion.p_mean_variance(lambda a, b: a, x[0, 0, 0], t[:1]), "x_t must have shape"),
        (
            lambda: diffusion.training_losses(lambda a, b: a.long(), x, t),
            "model output must be a floating-point",
        ),
        (lambda: diffusion.calc_bpd_loop(lambda a, b: a, x, t_chunk=0), "t_chunk must be a positive int"),
        (lambda: diffusion.calc_bpd_loop(lambda a, b: a, x + 255.0), r"x0 must be data scaled to \[-1, 1\]"),
        (lambda: GaussianDiffusion(betas=[0.1, 1.5]), r"betas must lie in \(0, 1\]"),
        (lambda: GaussianDiffusion(betas=[0.1]), "length T >= 2"),
        (
            lambda: GaussianDiffusion(betas=[0.1, 0.2], var_type="fixed_small"),
            r"unknown var_type 'fixed_small'; "
            r"choose one of fixedlarge, fixedsmall, learned, learned_range$",
        ),
        (
            lambda: GaussianDiffusion(betas=[0.1, 0.2], mean_type="v"),
            r"unknown mean_type 'v'; choose one of",
        ),
        (
            lambda: GaussianDiffusion(betas=[0.1, 0.2], loss_type="l1"),
            r"unknown loss_type 'l1'; choose one of",
        ),
        (
            lambda: DiffusionConfig(schedule="sigmoid"),
            r"unknown beta schedule 'sigmoid'; choose one of const, ",
        ),
        (lambda: DiffusionConfig(num_timesteps=1), "num_timesteps must be an int >= 2"),
        (lambda: DiffusionConfig(hybrid_lambda=-1.0), "hybrid_lambda must be >= 0"),
        (lambda: DiffusionConfig(beta_end=2.0), r"gives betas outside \(0, 1\]"),
        (
            lambda: DiffusionConfig.from_dict({"schedule": "linear", "steps": 10}),
            r"unknown diffusion config keys \['steps'\]",
        ),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()


def test_config_round_trip_and_build() -> None:
    cfg = DiffusionConfig(
        schedule="cosine",
        num_timesteps=100,
        mean_type="x0",
        var_type="learned_range",
        loss_type="hybrid",
        hybrid_lambda=0.01,
        decoder_cdf="tanh",
    )
    d = cfg.to_dict()
    assert d["mean_type"] == "x0" and d["var_type"] == "learned_range" and d["decoder_cdf"] == "tanh"
    assert isinstance(cfg.loss_type, LossType) and cfg.loss_type is LossType.HYBRID
    import json

    assert DiffusionConfig.from_dict(json.loads(json.dumps(d))) == cfg
    diff = cfg.build()
    assert diff.num_timesteps == 100 and diff.var_type is VarType.LEARNED_RANGE and diff.hybrid_lambda == 0.01
    assert DiffusionConfig.from_dict({}) == DiffusionConfig()
    default = DiffusionConfig().build()  # the paper's CIFAR-10 setting
    assert (default.mean_type, default.var_type, default.loss_type) == (
        MeanType.EPS,
        VarType.FIXED_LARGE,
        LossType.MSE,
    )
    with pytest.raises(TypeError):
        DiffusionConfig("linear")  # keyword-only


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_eq12_kl_is_the_weighted_eps_error(var_type: str) -> None:
    """eq. (8)-(12): with mu_theta from eq. (11), L_{t-1} = C_t + w_t E||eps - eps_theta||^2 per dimension,
    w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) and C_t = KL of the variances alone. Checked for an
    arbitrary (non-optimal) eps model on every t >= 1 through calc_bpd_loop's vb and mse columns."""
    ref = _np_schedule()
    betas, abar, pv = ref["betas"], ref["abar"], ref["pv"]
    sigma2 = np.append(pv[1], pv[1:]) if var_type == "fixedsmall" else np.append(pv[1], betas[1:])
    d = DiffusionConfig(var_type=var_type).build()
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.8 * x + 1e-3 * t.view(-1, 1, 1, 1))

    out = d.calc_bpd_loop(model, x0, clip_denoised=False, t_chunk=500, generator=g)
    w = betas**2 / (2 * sigma2 * (1 - betas) * (1 - abar))
    with np.errstate(divide="ignore"):
        c = 0.5 * (np.log(sigma2 / pv) + pv / sigma2 - 1)
    expected = (c[1:] + w[1:] * out["mse"][:, 1:].numpy()) / LN2  # (B, T - 1) bits/dim
    np.testing.assert_allclose(out["vb"][:, 1:].numpy(), expected, rtol=1e-8, atol=1e-12)
    if var_type == "fixedsmall":
        assert np.all(c[1:] == 0) and out["mse"][:, 1:].min() > 0.01


def test_a_huge_num_timesteps_is_refused_before_the_schedule_is_built(monkeypatch):
    # T = 10^9 would allocate 8 GB in betas() alone; the refusal must come first.
    from ddpmkit.diffusion import DiffusionConfig

    def built(self):
        raise AssertionError("the schedule was built before the size check")

    monkeypatch.setattr(DiffusionConfig, "betas", built)
    expected = r"num_timesteps=1,000,000,000 needs at least ~\d.*GiB.*limit is 1,000,000"
    with pytest.raises(ValueError, match=expected):
        DiffusionConfig(num_timesteps=10**9)


BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)


ABAR = np.cumprod(1.0 - BETAS)


ABAR_PREV = np.append(1.0, ABAR[:-1])


BETA_TILDE = BETAS * (1.0 - ABAR_PREV) / (1.0 - ABAR)


def _image() -> np.ndarray:
    """x*: (1, 3, 4, 4) on the 256-level grid, with both edge values present."""
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, size=(1, 3, 4, 4))
    levels.flat[:3] = [0, 255, 0]
    levels.flat[-2:] = [255, 128]
    return levels / 127.5 - 1.0


def _analytic(x_star: np.ndarray, sigma2: np.ndarray) -> dict[str, np.ndarray | float]:
    """The closed-form terms in bits/dim for the model variances sigma2: (T,)."""
    ab_T = ABAR[-1]
    prior = np.mean(0.5 * (-1.0 - np.log(1.0 - ab_T) + (1.0 - ab_T) + ab_T * x_star**2)) / LN2
    bt, s2 = BETA_TILDE[1:], sigma2[1:]
    kl = 0.5 * (np.log(s2 / bt) + bt / s2 - 1.0) / LN2  # (T - 1,): t = 1 .. T - 1 (0-based)
    h = (1.0 / 255.0) / math.sqrt(sigma2[0])
    edge = np.abs(x_star) > 0.999
    log_mass = np.where(
        edge, scipy.stats.norm.logcdf(h), np.log(scipy.stats.norm.cdf(h) - scipy.stats.norm.cdf(-h))
    )
    decoder = -np.mean(log_mass) / LN2
    vb = np.append(decoder, kl)  # (T,)
    return {"prior": prior, "vb": vb, "total": prior + vb.sum()}


CASES = {
    # name: (var_type, v for learned_range, model variances sigma_t^2 (T,))
    "fixedsmall": (VarType.FIXED_SMALL, None, np.append(BETA_TILDE[1], BETA_TILDE[1:])),
    "fixedlarge": (VarType.FIXED_LARGE, None, np.append(BETA_TILDE[1], BETAS[1:])),
    # learned_range at its ends: v = -1 is beta-tilde (clipped), v = +1 is beta (also at t = 1)
    "learned_range_low": (VarType.LEARNED_RANGE, -1.0, np.append(BETA_TILDE[1], BETA_TILDE[1:])),
    "learned_range_high": (VarType.LEARNED_RANGE, 1.0, BETAS),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mean_type", list(MeanType))
@pytest.mark.parametrize("clip_denoised", [True, False])
def test_every_term_of_the_bound_matches_the_oracle(
    case: str, mean_type: MeanType, clip_denoised: bool
) -> None:
    var_type, v, sigma2 = CASES[case]
    x_star_np = _image()
    expected = _analytic(x_star_np, sigma2)
    x_star = torch.from_numpy(x_star_np)  # float64
    diffusion = GaussianDiffusion(
        betas=get_named_beta_schedule("linear", T), mean_type=mean_type, var_type=var_type
    )
    x0 = x_star.expand(2, -1, -1, -1)  # two copies see different noise; the terms must not depend on it
    out = diffusion.calc_bpd_loop(
        ImageOracle.of_betas(BETAS, mean_type, x_star, v),
        x0,
        clip_denoised=clip_denoised,
        t_chunk=250,
        generator=torch.Generator().manual_seed(0),
    )
    for b in range(2):
        assert out["prior_bpd"][b].item() == pytest.approx(expected["prior"], rel=1e-12)
        # the decoder L_0 and each KL L_1 .. L_{T-1}
        np.testing.assert_allclose(out["vb"][b, 0].item(), expected["vb"][0], rtol=1e-9)
        np.testing.assert_allclose(out["vb"][b, 1:].numpy(), expected["vb"][1:], rtol=1e-6, atol=1e-11)
        assert out["total_bpd"][b].item() == pytest.approx(expected["total"], rel=1e-9)
        # the oracle recovers x* and the noise
        assert out["x0_mse"][b].max().item() < 1e-20
        assert out["mse"][b].max().item() < 1e-20


def test_oracle_values_are_what_the_paper_setting_gives() -> None:
    """The numbers themselves, for the record: with the released fixedlarge choice the KL terms carry
    the whole bound, with fixedsmall they vanish; the decoder is the same for both."""
    x_star = _image()
    small = _analytic(x_star, CASES["fixedsmall"][2])
    large = _analytic(x_star, CASES["fixedlarge"][2])
    assert np.all(small["vb"][1:] == 0.0)
    assert large["vb"][1:].min() > 0
    assert small["vb"][0] == large["vb"][0]
    assert small["prior"] < 1e-4  # abar_T ~ 4e-5: L_T is negligible, as Sec. 3.1 assumes
    # the fixedlarge KL sum (0.486 bits/dim) is the price of sigma_t^2 = beta_t for a point-mass data set,
    # mostly paid at small t where beta_t / beta-tilde_t is largest
    assert 0.48 < large["vb"][1:].sum() < 0.49
    assert large["vb"][1] > large["vb"][10] > large["vb"][100] > large["vb"][999]


def test_oracle_float32_is_close() -> None:
    """The same check in float32 (the dtype of training and evaluation): total within 5e-5 bits/dim
    (measured 5e-6), every term within 1e-5 (measured 7e-7)."""
    x_star_np = _image()
    sigma2 = CASES["fixedlarge"][2]
    expected = _analytic(x_star_np, sigma2)
    x_star = torch.from_numpy(x_star_np).float()
    diffusion = GaussianDiffusion(betas=get_named_beta_schedule("linear", T), var_type="fixedlarge")
    out = diffusion.calc_bpd_loop(
        ImageOracle.of_betas(BETAS, MeanType.EPS, x_star, None), x_star, t_chunk=500,
        generator=torch.Generator().manual_seed(1),
    )
    assert out["total_bpd"].dtype == torch.float32
    assert out["total_bpd"].item() == pytest.approx(expected["total"], abs=5e-5)
    np.testing.assert_allclose(out["vb"][0].numpy(), expected["vb"], rtol=0, atol=1e-5)


def test_calc_bpd_loop_draws_each_timesteps_noise_from_the_stream():
    d = DiffusionConfig(num_timesteps=4).build()
    seen = []

    def model(x_t, t):  # records its input; predicts eps = 0
        seen.append((x_t.clone(), t.clone()))
        return torch.zeros_like(x_t)

    x0 = torch.linspace(-1, 1, 2 * 1 * 2 * 2, dtype=torch.float64).view(2, 1, 2, 2)
    d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    for x_t, t in seen:  # t = 0, 1, 2, 3 in order, one draw of x0's shape each, float32 then cast
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float32).double()
        torch.testing.assert_close(x_t, d.q_sample(x0, t, noise=eps), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_calc_bpd_loop_gives_the_cpu_numbers_on_cuda():
    d = DiffusionConfig(num_timesteps=10).build()
    x0 = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)

    def model(x_t, t):
        return 0.1 * x_t

    cpu = d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(1))
    gpu = d.calc_bpd_loop(model, x0.cuda(), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gpu["total_bpd"].cpu(), cpu["total_bpd"], rtol=1e-5, atol=1e-5)
