"""Our model folder's files, and safe weight files (the U-Net reads a folder: ``nn.unet.read_model_folder``).

A model folder holds ``config.json`` = {"format": "ddpmkit.model", "version": 1, "unet": {...},
"diffusion": {...} (optional)} and ``model.safetensors`` (the float32 state dict of ``UNet``).
Weights are only ever read from safetensors (no pickle runs); every problem with a file raises one
``ValueError`` (or ``FileNotFoundError``) that names the file and what is wrong.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from ddpmkit.checks import is_int
from ddpmkit.fileio import atomic_write_bytes, atomic_write_json, read_json_object

__all__ = [
    "CONFIG_NAME",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "WEIGHTS_NAME",
    "check_finite",
    "diffusion_section",
    "is_model_folder",
    "load_state_dict_into",
    "read_model_config",
    "read_safetensors",
    "save_model_folder",
]

MODEL_FORMAT = "ddpmkit.model"
MODEL_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    atomic_write_bytes(path, save_safetensors_bytes(tensors, metadata=metadata))




def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU. Never unpickles anything.

    Raises FileNotFoundError if missing, ValueError naming the file if it is truncated or corrupt.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None


def check_finite(state_dict: dict[str, torch.Tensor], source: Path | str) -> None:
    """ValueError naming ``source`` and the first tensor holding a NaN or an infinity."""
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{source}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf)")


def load_state_dict_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path | str) -> None:
    """Put ``state_dict`` into ``model`` after checking keys, shapes, dtypes and finiteness.

    A model built on the meta device (no init, no memory) takes the tensors as its parameters
    (as float32); any other model gets them copied in. Every mismatch is a ValueError naming
    ``source`` and the offending tensor(s).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        raise ValueError(f"{source}: weights do not match the U-Net config: " + "; ".join(parts))
    for key, ref in expected.items():
        value = state_dict[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the U-Net config expects "
                f"{tuple(ref.shape)}"
            )
        if not value.is_floating_point():
            raise ValueError(f"{source}: tensor {key!r} has dtype {value.dtype}, expected a float dtype")
    check_finite(state_dict, source)
    if any(ref.is_meta for ref in expected.values()):
        model.load_state_dict(
            # empty_like keeps each parameter's strides: the U-Net's conv weights are channels_last,
            # 1x1 kernels included, whose strides contiguous(memory_format=...) would not restore.
            {k: torch.empty_like(ref, device="cpu", dtype=torch.float32).copy_(state_dict[k])
             for k, ref in expected.items()},
            assign=True,
        )
        return
    with torch.no_grad():
        for key, ref in expected.items():
            ref.copy_(state_dict[key])


def save_model_folder(
    unet: nn.Module, path: str | Path, *, diffusion: dict[str, Any] | Any | None = None
) -> Path:
    """Write ``unet`` (a ``ddpmkit.nn.UNet``) as our model folder at ``path``; returns the path.

    diffusion: a DiffusionConfig (anything with ``to_dict()``), its dict, or None.
    Each file is written atomically (temporary file + rename). Non-finite weights are refused.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    if diffusion is not None and not isinstance(diffusion, dict):
        if not callable(getattr(diffusion, "to_dict", None)):
            raise ValueError(f"diffusion must be a dict or have to_dict(), got {type(diffusion).__name__}")
        diffusion = diffusion.to_dict()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet.state_dict().items()}
    check_finite(tensors, f"U-Net being saved to {path}")
    config: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "unet": unet.config.to_dict(),
    }
    if diffusion is not None:
        config["diffusion"] = diffusion
    _atomic_save_safetensors(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_json(path / CONFIG_NAME, config, sort_keys=False)
    return path


def is_model_folder(path: Path) -> bool:
    """True if ``path/config.json`` exists and declares format "ddpmkit.model"."""
    try:
        return read_json_object(path / CONFIG_NAME).get("format") == MODEL_FORMAT
    except (OSError, ValueError):  # no file, not JSON, not an object
        return False


def read_model_config(path: Path) -> dict[str, Any]:
    """``path/config.json`` of our model folder, its format and version checked (the U-Net that
    reads the rest is ``ddpmkit.nn.unet.read_model_folder``)."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model folder not found")
    config = read_json_object(path / CONFIG_NAME)
    if config.get("format") != MODEL_FORMAT:
        raise ValueError(
            f"{path / CONFIG_NAME}: format is {config.get('format')!r}, expected {MODEL_FORMAT!r}"
        )
    version = config.get("version")
    if (
        not is_int(version)
        or version > MODEL_FORMAT_VERSION
        or version < 1
    ):
        raise ValueError(
            f"{path / CONFIG_NAME}: unsupported version {version!r}; this ddpmkit reads version "
            f"{MODEL_FORMAT_VERSION}"
        )
    return config


def diffusion_section(config: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The folder's diffusion settings (a dict) or None; ``path`` names the folder in the error."""
    diffusion = config.get("diffusion")
    if diffusion is not None and not isinstance(diffusion, dict):
        raise ValueError(f"{path / CONFIG_NAME}: 'diffusion' must be a JSON object")
    return diffusion


def weights_sha256(net: torch.nn.Module) -> str:
    """SHA-256 over a network's state dict (names, dtypes, shapes, bytes): which weights made a
    result (a sample folder, a bits/dim evaluation)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
