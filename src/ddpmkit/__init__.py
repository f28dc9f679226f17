"""ddpmkit: Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel, NeurIPS 2020).

Public API re-exports only, imported on first use (PEP 562): ``import ddpmkit.cli`` stays light,
so ``ddpm --help`` is quick and a Ctrl-C while torch loads reaches the CLI's handler.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "DiffusionConfig": "ddpmkit.diffusion",
    "GaussianDiffusion": "ddpmkit.diffusion",
    "LossType": "ddpmkit.diffusion",
    "MeanType": "ddpmkit.diffusion",
    "VarType": "ddpmkit.diffusion",
    "discretized_gaussian_log_likelihood": "ddpmkit.distributions",
    "normal_kl": "ddpmkit.distributions",
    "LoadedModel": "ddpmkit.models",
    "load_model": "ddpmkit.models",
    "load_unet": "ddpmkit.models",
    "UNET_PRESETS": "ddpmkit.nn",
    "UNet": "ddpmkit.nn",
    "UNetConfig": "ddpmkit.nn",
    "BETA_SCHEDULES": "ddpmkit.schedules",
    "get_named_beta_schedule": "ddpmkit.schedules",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ddpmkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
