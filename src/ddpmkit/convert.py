"""`ddpm convert`'s work: resolve the source, map it (``ddpmkit.interop``), write the output folder.

The orchestration lives here, above ``interop`` (which maps state dicts, configs and folders only)
and above ``models`` (which resolves run directories), so nothing imports upward.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["convert_from_diffusers", "convert_from_tf", "convert_to_diffusers"]


def _check_out_dir(out_dir: str | os.PathLike) -> None:
    from ddpmkit.fileio import check_output_path

    out = check_output_path(out_dir, folder=True)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} exists and is not empty")


def _write_output(out_dir: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """``write(folder)`` into ``out_dir`` (must not exist or be empty) as one atomic folder write."""
    from ddpmkit.fileio import atomic_write_folder

    _check_out_dir(out_dir)
    atomic_write_folder(out_dir, write)


def convert_from_diffusers(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """A diffusers folder -> our model folder ``out_dir`` (must not exist or be empty), with the
    scheduler's settings as the folder's diffusion config (the paper's defaults if it has none)."""
    from ddpmkit.diffusion import DiffusionConfig
    from ddpmkit.interop.diffusers import load_diffusers

    _check_out_dir(out_dir)  # before the source is read
    unet, diffusion, _ = load_diffusers(src_dir)
    if diffusion is None:
        diffusion = DiffusionConfig()
    _write_output(out_dir, lambda tmp: unet.save(tmp, diffusion=diffusion.to_dict()))


def convert_to_diffusers(model_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Our model folder or a training run directory (its EMA weights) -> a diffusers DDPMPipeline
    folder ``out_dir`` (must not exist or be empty) that ``DDPMPipeline.from_pretrained`` loads."""
    from ddpmkit.interop.diffusers import write_diffusers_folder
    from ddpmkit.models import load_model

    _check_out_dir(out_dir)  # before the model is loaded
    loaded = load_model(model_path)
    _write_output(out_dir, lambda tmp: write_diffusers_folder(loaded.unet, loaded.diffusion, tmp))


def convert_from_tf(
    prefix: str | os.PathLike, out_dir: str | os.PathLike, *, ema: bool = True, resolution: int | None = None
) -> None:
    """The authors' TF checkpoint `prefix` -> our model folder `out_dir` (must not exist or be empty).

    ema=True (default) takes the ExponentialMovingAverage weights. The architecture is read off
    the variable shapes; `resolution` overrides the inferred image size.
    """
    from ddpmkit.interop.tf_checkpoint import unet_from_tf

    _check_out_dir(out_dir)  # before the checkpoint is read
    unet, diffusion = unet_from_tf(prefix, ema=ema, resolution=resolution)
    _write_output(out_dir, lambda tmp: unet.save(tmp, diffusion=diffusion.to_dict()))
