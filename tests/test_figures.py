"""The paper's figure layouts on a toy model, and the rate-distortion figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from stand_ins import LEGIBLE_T as T

from ddpmkit.diffusion import DiffusionConfig
from ddpmkit.evaluate.bpd import format_rate_distortion_table, rate_distortion
from ddpmkit.figures import (
    interpolation_figure,
    progressive_figure,
    progressive_labels,
    rate_distortion_figure,
    reconstruction_figure,
    shared_xt_figure,
)
from ddpmkit.images import to_uint8_nhwc


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the network: eps-shaped, depends on x and t."""
    return torch.tanh(x * (1 + t.view(-1, 1, 1, 1) / 10))


# ---------------------------------------------------------------------------------- the paper's figures
@pytest.fixture(scope="module")
def diffusion():
    return DiffusionConfig(num_timesteps=10, beta_start=0.01, beta_end=0.4).build()


def test_figure_layouts(diffusion) -> None:
    images, cols = progressive_figure(toy_eps, diffusion, (2, 1, 4, 4), num_snapshots=5)
    assert cols == 5 and images.shape == (2 * 2 * 5, 4, 4, 1) and images.dtype == np.uint8
    images, cols = progressive_figure(toy_eps, diffusion, (3, 3, 4, 4), num_snapshots=4, show="x0")
    assert cols == 4 and images.shape == (3 * 4, 4, 4, 3)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images, cols = reconstruction_figure(toy_eps, diffusion, x, [2, 9])
    assert cols == 1 + 2 * 2 and images.shape == (2 * 5, 4, 4, 3)
    np.testing.assert_array_equal(images[0], to_uint8_nhwc(x[:1])[0])  # the original comes first
    images, cols = interpolation_figure(toy_eps, diffusion, x[:1], x[1:], [3, 6, 9], num_lambdas=4)
    assert cols == 6 and images.shape == (3 * 6, 4, 4, 3)
    np.testing.assert_array_equal(images[5], to_uint8_nhwc(x[1:])[0])  # source b closes each row
    images, cols = shared_xt_figure(toy_eps, diffusion, (1, 3, 4, 4), [2, 9], num_samples=3)
    assert cols == 4 and images.shape == (2 * 4, 4, 4, 3)
    with pytest.raises(ValueError, match="unknown show 'all'; choose one of both, x0, xt$"):
        progressive_figure(toy_eps, diffusion, (1, 1, 4, 4), show="all")


def test_rate_distortion_from_the_bound_terms(diffusion, tmp_path) -> None:
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rd = rate_distortion(toy_eps, diffusion, x, seed=5)
    terms = diffusion.calc_bpd_loop(toy_eps, x, generator=torch.Generator().manual_seed(5))
    vb, prior = terms["vb"].double().mean(0), float(terms["prior_bpd"].double().mean())
    T = diffusion.num_timesteps
    for t in range(T):  # rate(t) = L_T + sum of the KL terms after t (reverse order: T-1 .. t+1)
        assert rd["rate"][t] == pytest.approx(prior + float(vb[t + 1 :].sum()), rel=1e-12, abs=1e-12)
        rmse = 127.5 * math.sqrt(float(terms["x0_mse"][:, t].double().mean()))
        assert rd["distortion_rmse"][t] == pytest.approx(rmse, rel=1e-12)
    assert all(a >= b for a, b in zip(rd["rate"], rd["rate"][1:], strict=False))  # KL terms >= 0
    assert rd["rate_bpd"] + rd["distortion_bpd"] == pytest.approx(rd["total_bpd"], rel=1e-6)  # float32 sum
    assert [r["reverse_time"] for r in rd["table"]] == list(range(10, 0, -1))
    assert rd["table"][0]["rate_bpd"] == rd["rate"][0] and rd["table"][-1]["rate_bpd"] == rd["rate"][T - 1]
    text = format_rate_distortion_table(rd)
    assert "reverse time" in text and len(text.splitlines()) == 12
    path = rate_distortion_figure(rd, tmp_path / "rd.png", size=(400, 300))
    assert Image.open(path).size == (1200, 300)


def test_progressive_labels_name_the_chain_timesteps_in_order():
    from ddpmkit.chains import sample_progressive

    diffusion = DiffusionConfig(num_timesteps=T, beta_start=0.01, beta_end=0.4).build()
    out = sample_progressive(lambda x, t: torch.zeros_like(x), diffusion, (1, 1, 4, 4),
                             snapshot_ts=__import__("ddpmkit.respace").respace.space_timesteps(T, 3),
                             generator=torch.Generator().manual_seed(0))
    cols, rows = progressive_labels(T, 3)
    assert cols == [f"t = {int(t)}" for t in out["t"]] and cols[0] == f"t = {T - 1}" and cols[-1] == "t = 0"
    assert rows == ["x_t", "pred x_0"] and progressive_labels(T, 3, "x0")[1] == ["pred x_0"]


def test_figure_labels_match_the_figures_layout():
    from ddpmkit.chains import sample_progressive
    from ddpmkit.figures import (
        interpolation_figure,
        interpolation_labels,
        reconstruction_figure,
        reconstruction_labels,
        shared_xt_figure,
        shared_xt_labels,
    )

    diffusion = DiffusionConfig(num_timesteps=T, beta_start=0.01, beta_end=0.4).build()
    eps = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images, cols = reconstruction_figure(eps, diffusion, x, [1, 4])
    labels, rows = reconstruction_labels([1, 4])
    assert len(labels) == cols and rows == []
    assert labels == ["data\nx_0", "t = 1\nx_t", "t = 1\ndecoded", "t = 4\nx_t", "t = 4\ndecoded"]
    images, cols = interpolation_figure(eps, diffusion, x[:1], x[1:], [2, 5], num_lambdas=3)
    labels, rows = interpolation_labels([2, 5], 3)
    assert labels == ["source\nx_0", "0", "0.5", "1", "source\nx'_0"] and len(labels) == cols
    assert rows == ["t = 2", "t = 5"] and len(rows) == images.shape[0] // cols
    assert interpolation_labels([2], 3, 2)[1] == ["pair 1\nt = 2", "pair 2\nt = 2"]
    images, cols = shared_xt_figure(eps, diffusion, (1, 1, 4, 4), [1, 5, 3], num_samples=2)
    labels, rows = shared_xt_labels([1, 5, 3], 2)
    out = sample_progressive(eps, diffusion, (1, 1, 4, 4), snapshot_ts=[1, 5, 3])
    assert labels == ["x_t", "x_0 (1)", "x_0 (2)"] and len(labels) == cols
    assert rows == [f"t = {int(t)}" for t in out["t"]] == ["t = 5", "t = 3", "t = 1"]
