"""Beta schedules against the formulas of the authors' get_beta_schedule (re-derived in NumPy) and
Nichol & Dhariwal's cosine alpha_bar."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpmkit.schedules import BETA_SCHEDULES, get_named_beta_schedule

T = 1000
B0, B1 = 1e-4, 0.02


def _reference(name: str, n: int) -> np.ndarray:
    """The released code's definitions, written out independently in NumPy."""
    if name == "linear":
        return np.linspace(B0, B1, n, dtype=np.float64)
    if name == "quad":
        return np.linspace(B0**0.5, B1**0.5, n, dtype=np.float64) ** 2
    if name == "const":
        return B1 * np.ones(n, dtype=np.float64)
    if name == "jsd":
        return 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    if name in ("warmup10", "warmup50"):
        frac = 0.1 if name == "warmup10" else 0.5
        betas = B1 * np.ones(n, dtype=np.float64)
        w = int(n * frac)
        betas[:w] = np.linspace(B0, B1, w, dtype=np.float64)
        return betas
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["linear", "quad", "const", "jsd", "warmup10", "warmup50"])
@pytest.mark.parametrize("n", [T, 37])
def test_released_code_schedules(name: str, n: int) -> None:
    betas = get_named_beta_schedule(name, n, beta_start=B0, beta_end=B1)
    assert betas.dtype == torch.float64 and betas.shape == (n,)
    np.testing.assert_allclose(betas.numpy(), _reference(name, n), rtol=1e-14, atol=0)


def test_paper_linear_schedule_endpoints() -> None:
    betas = get_named_beta_schedule("linear", T)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-15)
    # abar_T for the paper's schedule is about 4.0e-5: x_T is almost pure noise (L_T ~ 0)
    abar_T = float(torch.prod(1 - betas))
    assert abar_T == pytest.approx(4.0358e-05, rel=1e-4)


def test_warmup_shape() -> None:
    betas = get_named_beta_schedule("warmup10", T, beta_start=B0, beta_end=B1)
    assert betas[:100].diff().gt(0).all() and betas[99].item() == pytest.approx(B1)
    assert bool((betas[100:] == B1).all())


@pytest.mark.parametrize("n", [1000, 4000, 50])
def test_cosine_matches_alpha_bar(n: int) -> None:
    s = 0.008

    def f(tau: np.ndarray) -> np.ndarray:
        return np.cos((tau + s) / (1 + s) * np.pi / 2) ** 2

    betas = get_named_beta_schedule("cosine", n).numpy()
    tau = np.arange(n + 1) / n
    abar = f(tau) / f(np.zeros(1))  # alpha_bar_t = f(t) / f(0)
    expected = np.minimum(1 - abar[1:] / abar[:-1], 0.999)
    # 1 - ratio cancels: agreement to a few ulp of 1 (1e-15 absolute)
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=1e-15)
    assert betas.max() == pytest.approx(0.999)  # the last beta is clipped
    # Away from the clip, prod(1 - beta) reproduces alpha_bar(t) = f(t)/f(0)
    np.testing.assert_allclose(np.cumprod(1 - betas)[: n // 2], abar[1 : n // 2 + 1], rtol=1e-10)


def test_cosine_first_beta_is_small() -> None:
    # Nichol & Dhariwal chose s so that sqrt(beta_1) is slightly smaller than the pixel bin 2/255
    beta1 = get_named_beta_schedule("cosine", 1000)[0].item()
    assert math.sqrt(beta1) < 2 / 255
    assert beta1 == pytest.approx(
        1 - math.cos((1e-3 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2,
        rel=1e-12,
    )


def test_registry_is_complete() -> None:
    expected = ["linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine"]
    assert sorted(BETA_SCHEDULES) == sorted(expected)


def test_unknown_schedule_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown beta schedule 'sigmoid'") as e:
        get_named_beta_schedule("sigmoid", T)
    for name in BETA_SCHEDULES:
        assert name in str(e.value)


@pytest.mark.parametrize("n", [0, 1, -5, 10.0, True])
def test_bad_num_timesteps(n: object) -> None:
    with pytest.raises(ValueError, match="num_timesteps must be an int >= 2"):
        get_named_beta_schedule("linear", n)  # type: ignore[arg-type]


def test_betas_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        get_named_beta_schedule("linear", T, beta_start=0.0, beta_end=0.02)
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        get_named_beta_schedule("const", T, beta_end=1.5)
