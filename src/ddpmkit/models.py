"""Load a trained U-Net and its diffusion from wherever it lives.

``load_model(path)`` accepts
  - our model folder (``config.json`` with format "ddpmkit.model" + ``model.safetensors``),
  - a training run directory: its EMA weights ``RUN/model/`` (``ema=False``: ``RUN/model_raw/``),
  - a diffusers folder: ``unet/`` + ``scheduler/`` subfolders, or flat (``config.json`` of a
    UNet2DModel [+ ``scheduler_config.json``]).
Weights are only read from safetensors or through ``torch.load(weights_only=True)``; every problem
is a ``ValueError`` / ``FileNotFoundError`` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ddpmkit.diffusion import DiffusionConfig
from ddpmkit.nn import UNet, read_model_folder
from ddpmkit.nn.folder import CONFIG_NAME, is_model_folder

__all__ = ["LoadedModel", "load_model", "load_unet", "resolve_model_path"]

RUN_EMA_DIR = "model"
RUN_RAW_DIR = "model_raw"


@dataclass(frozen=True)
class LoadedModel:
    """A U-Net (eval mode, CPU, float32), its diffusion settings, and the folder it came from."""

    unet: UNet
    diffusion: DiffusionConfig
    source: str


def resolve_model_path(path: str | os.PathLike, *, ema: bool = True) -> tuple[str, Path]:
    """("ddpmkit" or "diffusers", the folder holding the weights) for ``path``.

    ema=False asks for a run directory's raw weights (RUN/model_raw); it is a ValueError for any
    other kind of folder, which holds one set of weights only.
    """
    from ddpmkit.interop.diffusers import is_diffusers_folder

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder or run directory")
    if not path.is_dir():
        raise NotADirectoryError(
            f"{path}: expected a folder (our model folder, a training run directory or a diffusers folder)"
        )
    run_sub = path / (RUN_EMA_DIR if ema else RUN_RAW_DIR)
    if is_model_folder(run_sub):
        return "ddpmkit", run_sub
    if not ema:
        raise ValueError(
            f"{path}: ema=False needs a training run directory holding {RUN_RAW_DIR}/ (our model folder)"
        )
    if is_model_folder(path):
        return "ddpmkit", path
    if is_diffusers_folder(path):
        return "diffusers", path
    if (path / RUN_RAW_DIR).is_dir() or (path / RUN_EMA_DIR).is_dir():
        raise ValueError(
            f"{path}: run directory has no readable {RUN_EMA_DIR}/{CONFIG_NAME} (our model folder)"
        )
    if (path / "checkpoints").is_dir() or _is_train_config(path / CONFIG_NAME):
        raise ValueError(_no_model_yet(path))
    if (path / CONFIG_NAME).is_file():
        raise ValueError(
            f"{path / CONFIG_NAME}: neither our model format ('format': 'ddpmkit.model') nor a diffusers "
            "UNet2DModel config"
        )
    raise ValueError(
        f"{path}: not a model folder: expected {CONFIG_NAME} + model.safetensors (ddpmkit), "
        f"{RUN_EMA_DIR}/ (a training run), or unet/ + scheduler/ (diffusers)"
    )


def _is_train_config(path: Path) -> bool:
    """A run directory's config.json (a TrainConfig: steps and unet, no model "format")."""
    from ddpmkit.fileio import read_json_object

    if not path.is_file():
        return False
    try:
        d = read_json_object(path)
    except ValueError:
        return False
    return "format" not in d and "steps" in d and "unet" in d


def _no_model_yet(run: Path) -> str:
    """A run still in progress (no model folder yet): which checkpoint resumes it."""
    from ddpmkit.checkpoint import latest_checkpoint

    last = latest_checkpoint(run)
    where = (f"its newest checkpoint is {last.relative_to(run)} (step {int(last.name.split('-')[1])})"
             if last is not None else "it has no checkpoint yet (the first one writes the model)")
    return (f"{run}: a training run with no model yet ({RUN_EMA_DIR}/ is written with each checkpoint); "
            f"{where}; `ddpm train --output-dir {run} --resume auto` finishes it once its trainer "
            "has stopped")


def load_model(path: str | os.PathLike, *, ema: bool = True) -> LoadedModel:
    """The U-Net (eval mode) and DiffusionConfig stored at ``path`` (see the module docstring).

    A folder without diffusion settings (a diffusers folder without a scheduler, our folder saved
    without ``diffusion=``) gets the paper's defaults, ``DiffusionConfig()``; a learned-variance
    U-Net without them is an error, since the defaults have a fixed variance.
    """
    from ddpmkit.interop.diffusers import load_diffusers

    kind, folder = resolve_model_path(path, ema=ema)
    if kind == "diffusers":
        unet, diffusion, folder = load_diffusers(folder)
    elif kind == "ddpmkit":
        unet, diffusion_dict = read_model_folder(folder)
        diffusion = None
        if diffusion_dict is not None:
            try:
                diffusion = DiffusionConfig.from_dict(diffusion_dict)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{folder / CONFIG_NAME}: bad 'diffusion' section: {err}") from None
    else:
        raise NotImplementedError(kind)
    if diffusion is None:
        if unet.config.learned_variance:
            raise ValueError(
                f"{folder}: a learned-variance U-Net needs its diffusion settings (var_type), and the "
                "folder has none"
            )
        diffusion = DiffusionConfig()
    return LoadedModel(unet=unet, diffusion=diffusion, source=str(folder))


def load_unet(path: str | os.PathLike, *, ema: bool = True) -> UNet:
    """Only the U-Net (eval mode) of ``load_model(path, ema=ema)``."""
    from ddpmkit.interop.diffusers import load_diffusers

    kind, folder = resolve_model_path(path, ema=ema)
    if kind == "diffusers":
        return load_diffusers(folder)[0]
    return read_model_folder(folder)[0]
