"""Memorization (App. D): nearest training digits of samples, and how many samples are near-copies.

Distances are Euclidean, in pixel space ([0, 1] per pixel) and in the shipped digits classifier's
64-dimensional feature space. A near-copy is closer to its nearest training digit than the 5%
quantile of the training digits' distances to their nearest *other* training digit, a rule fixed
before any model; held-out real digits give the same fraction for comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["feature_space", "memorization_stage", "near_copy_fraction", "near_copy_threshold",
           "nearest_neighbours", "pixel_space"]


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray, k: int = 1,
                       exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean k nearest rows of ``reference`` (M, D) for each row of ``queries`` (N, D).

    ``exclude_self`` (queries is reference): a point is not its own neighbour. Returns
    (distances (N, k) float64, indices (N, k) int64), nearest first."""
    q, r = np.asarray(queries, np.float64), np.asarray(reference, np.float64)
    d2 = (q * q).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2.0 * q @ r.T  # (N, M)
    d2 = np.maximum(d2, 0.0)
    if exclude_self:
        np.fill_diagonal(d2, np.inf)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.sqrt(np.take_along_axis(d2, idx, 1)), idx


def near_copy_fraction(queries: np.ndarray, reference: np.ndarray, threshold: float) -> float:
    """The fraction of rows of ``queries`` whose nearest row of ``reference`` is closer than ``threshold``."""
    d, _ = nearest_neighbours(queries, reference, 1)
    return float((d[:, 0] < threshold).mean())


def near_copy_threshold(train: np.ndarray, quantile: float = 0.05) -> float:
    """The rule for "near-copy": closer than the ``quantile`` of the training digits' distances to
    their nearest *other* training digit (the same rule in every space; fixed before any model)."""
    d, _ = nearest_neighbours(train, train, 1, exclude_self=True)
    return float(np.quantile(d[:, 0], quantile))


def pixel_space(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 (N, 8, 8, 1) digits as (N, 64) float64 rows in [0, 1]."""
    return images_uint8.reshape(images_uint8.shape[0], -1).astype(np.float64) / 255.0  # (N, 64)


@torch.no_grad()
def feature_space(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 (N, 8, 8, 1) digits as the digits classifier's (N, 64) float64 features."""
    from ddpmkit.evaluate.digits_metric import digits_features_logits

    return digits_features_logits(images_uint8)[0]  # (N, 64)


def memorization_stage(samples_npz: Path, out: Path, panel_rows: int = 8, k: int = 3) -> dict[str, Any]:
    """Near-copy fractions and median NN distances of the samples in ``samples_npz`` and of the
    held-out digits, in both spaces, and the panel: each row a sample and its ``k`` nearest training
    digits in pixel space, then in feature space (OUT/figures/nearest_neighbours.png)."""
    from ddpmkit.data import load_digits_uint8
    from ddpmkit.images import save_image_grid

    samples = np.load(samples_npz)["arr_0"]  # (N, 8, 8, 1)
    train_u8, test_u8 = load_digits_uint8("train")[0], load_digits_uint8("test")[0]
    result: dict[str, Any] = {"num_samples": int(samples.shape[0]), "num_test": int(test_u8.shape[0]),
                              "quantile": 0.05}
    tiles = [samples[:panel_rows]]
    for space, embed in (("pixel", pixel_space), ("feature", feature_space)):
        tr, s, te = embed(train_u8), embed(samples), embed(test_u8)
        thr = near_copy_threshold(tr, result["quantile"])
        d, idx = nearest_neighbours(s, tr, k)
        result[space] = {"threshold": thr, "samples_near_copy": near_copy_fraction(s, tr, thr),
                         "heldout_near_copy": near_copy_fraction(te, tr, thr),
                         "samples_median_nn_distance": float(np.median(d[:, 0])),
                         "heldout_median_nn_distance": float(np.median(nearest_neighbours(te, tr, 1)[0]))}
        tiles += [train_u8[idx[:panel_rows, j]] for j in range(k)]
    rows = np.stack(tiles, 1).reshape(-1, 8, 8, 1)  # per row: sample, k pixel NNs, k feature NNs
    labels = ["sample", *[f"{space}\nNN {j + 1}" for space in ("pixel", "feature") for j in range(k)]]
    result["panel"] = str(save_image_grid(rows, out / "figures" / "nearest_neighbours.png",
                                          nrow=1 + 2 * k, scale=8, col_labels=labels).relative_to(out))
    return result

