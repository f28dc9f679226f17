"""Timestep specs and the respaced diffusion: improved-diffusion's picks, diffusers' custom
timesteps, the exact oracle under respacing, the bound loop's timesteps, the learned variance refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from oracles import ImageOracle
from stand_ins import SHAPE4, ToyEps, diffusers_ddpm_chain, diffusion_of

from ddpmkit.diffusion import DiffusionConfig
from ddpmkit.respace import (
    SpacedDiffusion,
    improved_diffusion_timesteps,
    linspace_timesteps,
    logsnr_timesteps,
    parse_timesteps,
    quad_timesteps,
    respace_diffusion,
    space_timesteps,
)
from ddpmkit.sampling import sample, sample_ancestral

pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("spec", [6, "6", "ddim5", "3,2", [0, 3, 7, 19]])
def test_every_timestep_form_matches_diffusers_custom_timesteps(spec) -> None:
    T = 20
    d, model = diffusion_of(T), ToyEps(T, per_sample_mean=False)
    kept = parse_timesteps(T, spec)
    if isinstance(spec, str):
        assert kept == sorted(reference_space_timesteps(T, spec))
    ours = sample_ancestral(model, d, SHAPE4, timesteps=spec, generator=torch.Generator().manual_seed(3))
    sched = DDPMScheduler(num_train_timesteps=T, beta_start=0.005, beta_end=0.4, beta_schedule="linear",
                          clip_sample=True, prediction_type="epsilon", variance_type="fixed_large")
    torch.testing.assert_close(ours, diffusers_ddpm_chain(sched, model, kept, SHAPE4, 3), atol=2e-5, rtol=0)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "x_prev"])
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall", "learned_range"])
@pytest.mark.parametrize("spec", [50, "10,15,20", [0, 1, 500, 999]])
def test_oracle_pred_x0_is_exact_under_respacing(mean_type: str, var_type: str, spec) -> None:
    d = diffusion_of(1000, mean_type, var_type)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(SHAPE4, generator=g, dtype=torch.float64) * 2 - 1)
    model = ImageOracle.of(d, x0, extra_channels=var_type == "learned_range")
    spaced = respace_diffusion(d, spec)
    assert isinstance(spaced, SpacedDiffusion) and spaced.timesteps == tuple(parse_timesteps(1000, spec))
    S = spaced.num_timesteps
    i = torch.tensor([S - 1, S // 2, 1, 0])
    k = spaced.timestep_map[i]
    x_t = d.q_sample(x0, k, torch.randn(SHAPE4, generator=g, dtype=torch.float64))
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
    d = diffusion_of(100, "x_prev")
    x0 = torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    model = ImageOracle.of(d, x0)
    spaced = respace_diffusion(d, "ddim10")
    out = spaced.calc_bpd_loop(model, x0, clip_denoised=False, generator=torch.Generator().manual_seed(1))
    assert model.seen == set(range(0, 100, 10))
    torch.testing.assert_close(out["x0_mse"], torch.zeros(2, 10, dtype=torch.float64), atol=1e-18, rtol=0)


def test_raw_learned_variance_is_refused_under_respacing() -> None:
    d = diffusion_of(100, "eps", "learned")
    with pytest.raises(ValueError, match="learned_range"):
        respace_diffusion(d, 10)
    with pytest.raises(ValueError, match="all 100 steps"):
        sample(ToyEps(100, per_sample_mean=False), d, SHAPE4, steps=10)
    assert respace_diffusion(d, None).num_timesteps == 100  # the full chain is fine


T_PAPER = 1000


def test_step_choices():
    d = DiffusionConfig(num_timesteps=T_PAPER).build()
    assert linspace_timesteps(T_PAPER, 10) == [100, 200, 300, 400, 500, 599, 699, 799, 899, 999]
    ks = logsnr_timesteps(d.alphas_cumprod, 10)
    assert ks[-1] == T_PAPER - 1 and ks == sorted(set(ks))
    abar = d.alphas_cumprod.numpy()
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))
    steps = np.diff(lam[ks[::-1]])  # equal lambda steps, up to rounding to integer timesteps
    assert np.all(steps > 0) and steps.max() / steps.min() < 1.3, steps
    assert len(set(logsnr_timesteps(d.alphas_cumprod, T_PAPER - 1))) == T_PAPER - 1
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, 999\]"):
        linspace_timesteps(T_PAPER, T_PAPER)


def test_quad_is_ddims_selection_and_the_strings_reach_every_choice():
    """DDIM's code: seq = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(int); at T = 1000, S = 10
    that is the list below. Its duplicates at many steps move up (S = 100 keeps 100 distinct)."""
    assert quad_timesteps(T_PAPER, 10) == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    many = quad_timesteps(T_PAPER, 100)
    assert len(set(many)) == 100 and many == sorted(many) and many[-1] == 800
    d = DiffusionConfig(num_timesteps=T_PAPER).build()
    from ddpmkit.respace import diffusion_timesteps, parse_timesteps

    assert diffusion_timesteps(d, "quad10") == quad_timesteps(T_PAPER, 10)
    assert diffusion_timesteps(d, "linspace10") == linspace_timesteps(T_PAPER, 10)
    assert diffusion_timesteps(d, "logsnr10") == logsnr_timesteps(d.alphas_cumprod, 10)
    with pytest.raises(ValueError, match="logSNR spacing needs the diffusion's schedule"):
        parse_timesteps(T_PAPER, "logsnr10")
    with pytest.raises(ValueError, match=r"expected 'quadN'"):
        parse_timesteps(T_PAPER, "quadx")
