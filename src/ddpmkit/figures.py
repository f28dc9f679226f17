"""The paper's figure layouts: progressive generation, reconstructions, interpolations, shared x_t, Fig. 5.

The figure functions (``progressive_figure``, ``interpolation_figure``, ``reconstruction_figure``,
``shared_xt_figure``) take a model callable and a ``GaussianDiffusion``; they call the chains of
``ddpmkit.chains`` and lay out the results the way the paper's Figures 6-9 do, as uint8 images
for ``images.save_image_grid``, with the labels of each layout (``*_labels``).
``rate_distortion_figure`` draws Fig. 5 from ``evaluate.bpd.rate_distortion``'s result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpmkit.charts import ChartBackend, LinePanel, plot_line_panels
from ddpmkit.checks import check_int
from ddpmkit.enums import unknown_choice
from ddpmkit.images import to_uint8_nhwc
from ddpmkit.seeds import Stream, derive_seed, derived_generator

__all__ = [
    "interpolation_figure",
    "interpolation_labels",
    "progressive_figure",
    "progressive_labels",
    "rate_distortion_figure",
    "reconstruction_figure",
    "reconstruction_labels",
    "shared_xt_figure",
    "shared_xt_labels",
]

# Each returns the figure's grid as uint8 (rows * cols, H, W, C) in row-major order and the number
# of columns, ready for ``save_image_grid(images, path, nrow=cols)``.
Model = Any  # a callable model(x_t, t) -> Tensor


def _rows(rows: list[torch.Tensor]) -> tuple[np.ndarray, int]:
    """Rows of images, each (cols, C, H, W) float in [-1, 1] -> uint8 (rows * cols, H, W, C), cols."""
    cols = rows[0].shape[0]
    assert all(r.shape[0] == cols for r in rows)
    return to_uint8_nhwc(torch.cat([r.float().cpu() for r in rows])), cols


def progressive_figure(
    model: Model,
    diffusion: Any,
    shape: Sequence[int],
    *,
    num_snapshots: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    show: str = "both",
) -> tuple[np.ndarray, int]:
    """Fig. 6: for each of shape[0] samples, the chain's x_t (row 1) and predicted x_0 (row 2) at
    ``num_snapshots`` timesteps evenly spaced from T - 1 to 0 (left to right). ``show``: "both",
    "x0" or "xt". shape: (B, C, H, W). Returns (uint8 grid images, columns)."""
    from ddpmkit.chains import sample_progressive
    from ddpmkit.respace import space_timesteps
    from ddpmkit.seeds import sample_generators

    if show not in ("both", "x0", "xt"):
        raise unknown_choice("show", show, ("both", "x0", "xt"))
    T = diffusion.num_timesteps
    num_snapshots = check_int(num_snapshots, "num_snapshots", low=2, high=T)
    ts = space_timesteps(T, num_snapshots)
    out = sample_progressive(
        model, diffusion, shape, snapshot_ts=ts, generator=sample_generators(seed, range(shape[0])),
        device=device,
    )
    rows = []
    for b in range(shape[0]):
        if show in ("both", "xt"):
            rows.append(out["x_t"][:, b].clamp(-1, 1))  # (K, C, H, W), t decreasing
        if show in ("both", "x0"):
            rows.append(out["pred_x0"][:, b])
    return _rows(rows)


def progressive_labels(num_timesteps: int, num_snapshots: int, show: str = "both", *,
                       one_based: bool = False) -> tuple[list[str], list[str]]:
    """Column labels ("t = 999", ..., "t = 0"; the paper's "t = 1000", ..., "t = 1" when
    ``one_based``) and row labels ("x_t", "pred x_0") of ``progressive_figure``'s grid, for
    ``save_image_grid(..., col_labels=, row_labels=)``."""
    from ddpmkit.respace import space_timesteps

    ts = sorted(set(space_timesteps(num_timesteps, num_snapshots)), reverse=True)
    rows = {"both": ["x_t", "pred x_0"], "xt": ["x_t"], "x0": ["pred x_0"]}[show]
    return [f"t = {t + int(one_based)}" for t in ts], rows


def reconstruction_labels(ts: Sequence[int]) -> tuple[list[str], list[str]]:
    """Column labels of ``reconstruction_figure``'s grid: "data x_0", then for each t "t = ..."
    over "x_t" and over "decoded" (x_0 from the reverse chain started at that x_t); no row labels
    (a row is one data image)."""
    cols = ["data\nx_0"]
    for t in ts:
        cols += [f"t = {t}\nx_t", f"t = {t}\ndecoded"]
    return cols, []


def interpolation_labels(ts: Sequence[int], num_lambdas: int,
                         num_pairs: int = 1) -> tuple[list[str], list[str]]:
    """Column labels ("source\\nx_0", the lambdas 0 .. 1, "source\\nx'_0") and row labels ("t = ...",
    with the pair's number when there are several) of ``interpolation_figure``'s grid."""
    lambdas = [f"{i / (num_lambdas - 1):.2g}" for i in range(num_lambdas)]
    rows = [f"pair {b + 1}\nt = {t}" if num_pairs > 1 else f"t = {t}" for b in range(num_pairs) for t in ts]
    return ["source\nx_0", *lambdas, "source\nx'_0"], rows


def shared_xt_labels(ts: Sequence[int], num_samples: int) -> tuple[list[str], list[str]]:
    """Column labels ("x_t", then "x_0 (k)" for each draw from p(x_0 | x_t)) and row labels
    ("t = ...", decreasing, as ``sample_progressive`` orders them) of ``shared_xt_figure``'s grid."""
    cols = ["x_t", *[f"x_0 ({k + 1})" for k in range(num_samples)]]
    return cols, [f"t = {t}" for t in sorted(set(ts), reverse=True)]


def reconstruction_figure(
    model: Model, diffusion: Any, x0: torch.Tensor, ts: Sequence[int], *, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Reconstructions through the stochastic encoder q (Sec. 4.3): for each image of x0 (B, C, H, W)
    a row [x_0, then for each t in ``ts``: x_t, x_0 decoded from x_t]. Returns (grid images, cols)."""
    from ddpmkit.chains import reconstruct
    from ddpmkit.seeds import sample_generators

    rows = []
    for b in range(x0.shape[0]):
        row = [x0[b : b + 1]]
        for t in ts:
            x_t, rec = reconstruct(model, diffusion, x0[b : b + 1], t, generator=sample_generators(seed, [b]))
            row += [x_t.clamp(-1, 1), rec]
        rows.append(torch.cat(row))  # (1 + 2 len(ts), C, H, W)
    return _rows(rows)


def interpolation_figure(
    model: Model,
    diffusion: Any,
    x0_a: torch.Tensor,
    x0_b: torch.Tensor,
    ts: Sequence[int],
    *,
    num_lambdas: int = 11,
    seed: int = 0,
    encoder: str = "q",
    timesteps: Any = None,
) -> tuple[np.ndarray, int]:
    """Fig. 8-9: for each pair (x0_a[b], x0_b[b]) and each t in ``ts``, a row [source a, the
    decoded interpolations for lambda = 0, 1/(L-1), ..., 1, source b]. ``encoder`` "q" (the paper)
    or "ddim" (deterministic, over ``timesteps``; ``chains.interpolate``). Returns (grid images, cols)."""
    from ddpmkit.chains import interpolate

    num_lambdas = check_int(num_lambdas, "num_lambdas", low=2)
    lambdas = [i / (num_lambdas - 1) for i in range(num_lambdas)]
    rows = []
    for b in range(x0_a.shape[0]):
        for t in ts:
            g = derived_generator(seed, Stream.INTERPOLATION, b)  # the pair's encoder noise
            mix = interpolate(model, diffusion, x0_a[b : b + 1], x0_b[b : b + 1], t, lambdas, generator=g,
                              encoder=encoder, timesteps=timesteps)
            rows.append(torch.cat([x0_a[b : b + 1], mix[0].to(x0_a.device), x0_b[b : b + 1]]))
    return _rows(rows)


def shared_xt_figure(
    model: Model,
    diffusion: Any,
    shape: Sequence[int],
    ts: Sequence[int],
    *,
    num_samples: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, int]:
    """Fig. 7: one chain from x_T is stopped at each t in ``ts``; each row shows that x_t and then
    ``num_samples`` draws of x_0 ~ p_theta(x_0 | x_t) that share it. shape: (1, C, H, W)."""
    from ddpmkit.chains import sample_progressive, sample_shared_xt
    from ddpmkit.seeds import sample_generators

    if tuple(shape)[0] != 1:
        raise ValueError(f"shape must be (1, C, H, W): one chain, got {tuple(shape)}")
    out = sample_progressive(
        model, diffusion, shape, snapshot_ts=ts, generator=sample_generators(seed, [0]), device=device
    )
    rows = []
    for k, t in enumerate(out["t"]):
        x_t = out["x_t"][k]  # (1, C, H, W)
        gens = sample_generators(derive_seed(seed, Stream.SHARED_XT, k), range(num_samples))
        draws = sample_shared_xt(model, diffusion, x_t, t, num_samples, generator=gens)
        rows.append(torch.cat([x_t.clamp(-1, 1), draws]))
    return _rows(rows)




def rate_distortion_figure(rd: dict[str, Any], path: str | os.PathLike,
                           size: tuple[int, int] = (480, 360),
                           backend: ChartBackend | str = ChartBackend.AUTO) -> Path:
    """Fig. 5: distortion and rate against reverse-process steps (T - t), and distortion against
    rate, side by side in one figure of (3 * width, height) pixels (PNG; PDF/SVG with matplotlib)."""
    T = rd["num_timesteps"]
    steps = [T - 1 - t for t in range(T)]  # reverse-process steps taken when x_t (0-based) is reached
    panels = [
        LinePanel(series={"distortion": (steps, rd["distortion_rmse"])}, title="Distortion",
                  xlabel="reverse process steps (T - t)", ylabel="RMSE [0, 255]"),
        LinePanel(series={"rate": (steps, rd["rate"])}, title="Rate", xlabel="reverse process steps (T - t)",
                  ylabel="bits/dim"),
        LinePanel(series={"distortion vs rate": (rd["rate"], rd["distortion_rmse"])}, title="Rate-distortion",
                  xlabel="rate (bits/dim)", ylabel="RMSE [0, 255]"),
    ]
    return plot_line_panels(path, panels, size=size, backend=backend)
