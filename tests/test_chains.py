"""The paper's Sec. 4.3 chains (ddpmkit.chains): progressive generation, interpolation, shared x_t,
reconstruction and the reverse chain from a given x_t (and DDIM inversion against the Gaussian flow)."""

from __future__ import annotations

import pytest
import torch
from oracles import gaussian_eps
from stand_ins import SHAPE, T_SMALL, ToyEps, diffusion_of, make_diffusion

from ddpmkit.chains import (
    ddim_invert,
    interpolate,
    reconstruct,
    sample_from_xt,
    sample_progressive,
    sample_shared_xt,
)
from ddpmkit.diffusion import DiffusionConfig
from ddpmkit.respace import (
    parse_timesteps,
)
from ddpmkit.sampling import p_sample, sample_ancestral, sample_ddim
from ddpmkit.seeds import draw_standard_normal, sample_generators

pytestmark = pytest.mark.usefixtures("one_thread")


def test_progressive_snapshots_and_final_sample() -> None:
    d, model = make_diffusion(), ToyEps(T_SMALL)
    gens = sample_generators(0, range(8))
    out = sample_progressive(model, d, SHAPE, snapshot_ts=[0, 10, 19], generator=gens)
    assert out["t"] == [19, 10, 0]
    assert out["x_t"].shape == out["pred_x0"].shape == (3, *SHAPE)
    x_T = draw_standard_normal(SHAPE, sample_generators(0, range(8)), device="cpu", dtype=torch.float32)
    assert torch.equal(out["x_t"][0], x_T)
    ref = sample_ancestral(model, d, SHAPE, generator=sample_generators(0, range(8)))
    assert torch.equal(out["sample"], ref)
    torch.testing.assert_close(out["pred_x0"][-1], out["sample"])  # x_0 = the prediction at t = 0
    with pytest.raises(ValueError, match=r"snapshot t must be an int in \[0, 19\]"):
        sample_progressive(model, d, SHAPE, snapshot_ts=[20])


def test_interpolation_shares_noise_across_lambdas() -> None:
    d, model = make_diffusion(), ToyEps(T_SMALL)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 2, 4, 4, generator=g) * 2 - 1
    b = torch.rand(2, 2, 4, 4, generator=g) * 2 - 1
    same = interpolate(model, d, a, a, 10, [0.0, 0.3, 1.0], generator=torch.Generator().manual_seed(1))
    assert same.shape == (2, 3, 2, 4, 4)
    torch.testing.assert_close(same[:, 1], same[:, 0], atol=1e-5, rtol=0)  # (1-l) x + l x = x
    torch.testing.assert_close(same[:, 2], same[:, 0], atol=1e-5, rtol=0)
    mix = interpolate(model, d, a, b, 10, [0.0, 0.5, 1.0], generator=torch.Generator().manual_seed(1))
    assert (mix[:, 0] - mix[:, 2]).abs().max() > 0.1
    # lambda = 0 decodes x_t = q(a) with the encoder noise shared with b: check the encoding
    g1 = torch.Generator().manual_seed(1)
    noise = torch.randn(a.shape, generator=g1)
    x_t = d.q_sample(a, torch.full((2,), 10), noise)
    chain = sample_generators(int(torch.randint(0, 2**62, (1,), generator=g1)), range(2))
    torch.testing.assert_close(mix[:, 0], sample_from_xt(model, d, x_t, 10, generator=chain))


def test_shared_xt_and_reconstruction() -> None:
    d, model = make_diffusion(), ToyEps(T_SMALL)
    x_t = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    draws = sample_shared_xt(model, d, x_t, 12, 5, generator=sample_generators(0, range(5)))
    assert draws.shape == (5, 2, 4, 4) and (draws[0] - draws[1]).abs().max() > 1e-3
    last = sample_shared_xt(model, d, x_t, 0, 3, generator=sample_generators(0, range(3)))
    assert torch.equal(last[0], last[1])  # from t = 0 the step adds no noise
    with pytest.raises(ValueError, match="batch of one"):
        sample_shared_xt(model, d, x_t.repeat(2, 1, 1, 1), 3, 2)
    x0 = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    enc, rec = reconstruct(model, d, x0, 5, generator=torch.Generator().manual_seed(3))
    assert enc.shape == rec.shape == x0.shape
    enc2, rec2 = reconstruct(model, d, x0, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(rec, rec2) and torch.equal(enc, enc2)


def test_the_reverse_chain_from_x_T_is_algorithm_2_step_by_step():
    """The reverse chain from x_T (``sample_from_xt``, its callback seeing each step)
    visits t = T-1 .. 0, each x_t is ``p_sample`` of the one before with the stream's next draw, and
    its x_0 is sample_ancestral's for the same noise streams."""
    diffusion = DiffusionConfig(num_timesteps=6).build()
    model = lambda x, t: 0.1 * x  # noqa: E731 - a toy eps model
    shape = (3, 1, 2, 2)
    want = sample_ancestral(model, diffusion, shape, generator=sample_generators(4, range(3)))
    gens = sample_generators(4, range(3))
    x_T = draw_standard_normal(shape, gens, device="cpu", dtype=torch.float32)
    seen = []
    x0 = sample_from_xt(model, diffusion, x_T, 5, generator=gens,
                        callback=lambda step, t, x_t, pred_x0: seen.append((t, x_t)))
    assert [t for t, _ in seen] == [5, 4, 3, 2, 1, 0]
    assert torch.equal(seen[0][1], x_T)
    replay = sample_generators(4, range(3))
    draw_standard_normal(shape, replay, device="cpu", dtype=torch.float32)  # x_T
    for (t, x_t), nxt in zip(seen, [x for _, x in seen[1:]] + [x0], strict=True):
        z = draw_standard_normal(shape, replay, device="cpu", dtype=torch.float32) if t > 0 else None
        assert torch.equal(p_sample(model, diffusion, x_t, t, noise=z)["sample"], nxt)
    torch.testing.assert_close(x0, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- DDIM inversion
def test_ddim_inversion_against_the_gaussian_flow() -> None:
    """x0 ~ N(m, diag(s^2)) with its optimal eps-predictor. The probability-flow ODE that DDIM
    discretises maps x0 to x_k = sqrt(abar_k) m + sqrt(abar_k s^2 + 1 - abar_k) (x0 - m) / s, so
    the encoding must approach that map and eta = 0 sampling from it must give x0 back, both
    with errors that shrink as the steps do (measured at T = 1000, n = 4000: map error 0.0175,
    0.21, 0.95 and round trip 0.011, 0.11, 0.48 for all steps, ddim100, ddim20)."""
    T = 1000
    d = diffusion_of(T)
    m = torch.tensor([0.3, -0.2], dtype=torch.float64)
    s2 = torch.tensor([0.04, 0.25], dtype=torch.float64)
    abar = d.alphas_cumprod

    optimal_eps = gaussian_eps(abar, m, s2)

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
