"""Analytic-DPM's Gamma_t of a trained model, estimated once and kept beside its weights.

``model_gamma`` returns the estimate stored in the model's folder (``analytic_gamma.safetensors``:
the mean and standard error (T,) float64, and in its metadata the weights' SHA-256, the data, the
number of Monte-Carlo samples and the seed) when every one of those matches; otherwise it
estimates Gamma_t (``analytic.estimate_gamma``, on the first ``num_samples`` training images) and
writes the file again. A folder that cannot be written keeps the estimate in memory, with a
warning. The data a run trained on is its default.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors_bytes

from ddpmkit.analytic import GammaEstimate, estimate_gamma
from ddpmkit.checks import check_int
from ddpmkit.fileio import atomic_write_bytes, read_json_object

__all__ = ["GAMMA_NAME", "model_gamma", "training_data_of"]

GAMMA_NAME = "analytic_gamma.safetensors"
GAMMA_FORMAT = "ddpmkit.analytic_gamma"


def training_data_of(model_path: str | os.PathLike) -> str | None:
    """The ``data`` a training run directory's config.json names (None for any other folder)."""
    cfg = Path(model_path) / "config.json"
    if not (Path(model_path) / "checkpoints").is_dir() or not cfg.is_file():
        return None
    data = read_json_object(cfg).get("data")
    return "digits" if data is None else str(data)


def _read(path: Path, wanted: dict[str, str]) -> GammaEstimate | None:
    """The stored estimate if its metadata equals ``wanted``, else None (missing, torn or other)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if f.metadata() != wanted:
                return None
            mean, stderr = f.get_tensor("mean"), f.get_tensor("stderr")
    except (OSError, SafetensorError, KeyError):
        return None
    return GammaEstimate(mean=mean.numpy(), stderr=stderr.numpy(), num_samples=int(wanted["num_samples"]))


def model_gamma(net: torch.nn.Module, diffusion: Any, folder: str | os.PathLike, *, weights_sha256: str,
                data: str | None, num_samples: int = 200, seed: int = 0, device: Any = "cpu",
                progress: bool = False) -> GammaEstimate:
    """Gamma_t (T,) of ``net`` under ``diffusion`` (a GaussianDiffusion), read from or written to
    ``folder``/analytic_gamma.safetensors (see the module docstring). ``data``: the training data
    source (``data.open_source``'s SRC); None is a ValueError saying what to pass."""
    from ddpmkit.data import open_source
    from ddpmkit.logs import progress_bar

    num_samples = check_int(num_samples, "gamma_samples", low=2)
    if data is None:
        raise ValueError("Analytic-DPM needs Gamma_t from the model's training data: pass --gamma-data SRC "
                         "(only a training run directory names its own)")
    path = Path(folder) / GAMMA_NAME
    wanted = {"format": GAMMA_FORMAT, "version": "1", "weights_sha256": weights_sha256, "data": str(data),
              "num_samples": str(num_samples), "seed": str(seed),
              "num_timesteps": str(diffusion.num_timesteps)}
    found = _read(path, wanted)
    if found is not None:
        return found
    cfg = net.config
    ds = open_source(data, resolution=cfg.resolution, channels=cfg.in_channels, split="train")
    if len(ds) < num_samples:
        raise ValueError(f"--gamma-data {data}: {len(ds)} images, fewer than --gamma-samples {num_samples}")
    batches = (ds.get_batch(list(range(i, min(i + 256, num_samples)))) for i in range(0, num_samples, 256))
    with progress_bar(total=diffusion.num_timesteps, disable=not progress, desc="Gamma_t", unit="t") as bar:
        def predict_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return diffusion.p_mean_variance(net, x, t, clip_denoised=False, check=False)["pred_eps"]

        est = estimate_gamma(predict_eps, diffusion.alphas_cumprod, batches, num_samples=num_samples,
                             generator=torch.Generator().manual_seed(seed), device=device,
                             progress=lambda k: bar.update(1))
    tensors = {"mean": torch.from_numpy(est.mean), "stderr": torch.from_numpy(est.stderr)}
    try:
        atomic_write_bytes(path, save_safetensors_bytes(tensors, metadata=wanted))
    except (OSError, ValueError) as e:
        warnings.warn(f"{path}: could not keep Gamma_t beside the model ({e}); using it for this run only",
                      stacklevel=2)
    return est
