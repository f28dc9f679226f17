"""Weights in and out of the Hugging Face diffusers layout that the released DDPM models use.

The released models: google/ddpm-cifar10-32, -celebahq-256, -church-256, -bedroom-256, -cat-256.

A diffusers folder holds ``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors`` (older
snapshots: ``.bin``, a pickle, read here with ``torch.load(weights_only=True)`` so that no code
runs) and ``scheduler/scheduler_config.json``; some snapshots keep them flat at the top level.

Our ``UNet`` uses the diffusers parameter names except for three renames (``_DIFFUSERS_TO_OURS``);
the 2022-era attention names (query / key / value / proj_attn) are read too. Every config field
is checked: a ``UNet2DModel`` or ``DDPMScheduler`` setting that the paper's network or our
diffusion cannot express raises a ValueError naming the field. This module never needs diffusers
installed.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes

from ddpmkit.checks import is_int
from ddpmkit.diffusion import DiffusionConfig, LossType, MeanType, VarType
from ddpmkit.fileio import atomic_write_bytes, atomic_write_json, read_json_object
from ddpmkit.nn import UNet, UNetConfig
from ddpmkit.nn.folder import (
    check_finite,
    load_state_dict_into,
    read_safetensors,
)
from ddpmkit.schedules import BETA_SCHEDULES

__all__ = [
    "diffusers_config_from_unet",
    "diffusers_state_dict_from_unet",
    "diffusion_config_from_scheduler",
    "find_diffusers_folder",
    "is_diffusers_folder",
    "load_diffusers",
    "read_diffusers_weights",
    "scheduler_config_from_diffusion",
    "unet_config_from_diffusers",
    "unet_from_diffusers_state_dict",
]

DIFFUSERS_VERSION = "0.25.0"  # the oldest diffusers whose UNet2DModel reads what we write
UNET_CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"

# UNet2DModel.__init__ defaults: a field missing from a config.json takes these (diffusers 0.25-0.42).
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}  # fmt: skip

# DDPMScheduler.__init__ defaults.
DDPM_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True,
    "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
    "steps_offset": 0, "rescale_betas_zero_snr": False,
}  # fmt: skip
# Sampling-time knobs of DDPMScheduler that do not change the model or its diffusion; our samplers
# take their own arguments (clip_denoised, respacing). Old snapshots also carry the last three.
_SCHEDULER_SAMPLING_ONLY = {
    "clip_sample", "clip_sample_range", "sample_max_value", "dynamic_thresholding_ratio",
    "timestep_spacing", "steps_offset", "tensor_format", "timestep_values", "set_alpha_to_one",
}  # fmt: skip

_BETA_SCHEDULE_TO_OURS = {"linear": "linear", "scaled_linear": "quad", "squaredcos_cap_v2": "cosine"}
_VARIANCE_TO_OURS = {
    "fixed_large": VarType.FIXED_LARGE,
    "fixed_small": VarType.FIXED_SMALL,
    "learned": VarType.LEARNED,
    "learned_range": VarType.LEARNED_RANGE,
}
_PREDICTION_TO_OURS = {"epsilon": MeanType.EPS, "sample": MeanType.X0}

# diffusers key fragment -> ours (applied in order); the inverse maps back.
_DIFFUSERS_TO_OURS = (
    (".downsamplers.0.", ".downsample."),
    (".upsamplers.0.", ".upsample."),
    (".to_out.0.", ".to_out."),
)
_LEGACY_ATTN = re.compile(r"\.attentions\.(\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}


# ----------------------------------------------------------------------------------------------
# config.json (UNet2DModel) <-> UNetConfig


def _unsupported(source: str, field: str, value: Any, expected: str) -> ValueError:
    return ValueError(
        f"{source}: diffusers field {field!r} = {value!r} cannot be expressed by the paper's U-Net "
        f"(ddpmkit); expected {expected}"
    )


def _same(value: Any, allowed: Any) -> bool:
    """Equality that tells bools from numbers and lets 1 == 1.0 (and 1e-6 ~ 1e-6 in float)."""
    if isinstance(value, bool) or isinstance(allowed, bool) or value is None or allowed is None:
        return value is allowed
    if isinstance(value, (int, float)) and isinstance(allowed, (int, float)):
        return math.isclose(value, allowed, rel_tol=1e-9)
    return type(value) is type(allowed) and value == allowed


def _check_equal(cfg: dict[str, Any], field: str, allowed: tuple[Any, ...], source: str) -> None:
    if not any(_same(cfg[field], a) for a in allowed):
        raise _unsupported(source, field, cfg[field], " or ".join(repr(a) for a in allowed))


def _level_attention(cfg: dict[str, Any], levels: int, source: str) -> list[bool]:
    """Which levels carry attention, from down_block_types and up_block_types (must agree)."""
    down, up = cfg["down_block_types"], cfg["up_block_types"]
    for field, blocks, kinds in (
        ("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
        ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D")),
    ):
        if not isinstance(blocks, (list, tuple)) or len(blocks) != levels:
            raise _unsupported(source, field, blocks, f"a list of {levels} block types (one per level)")
        bad = [b for b in blocks if b not in kinds]
        if bad:
            raise _unsupported(source, field, blocks, f"only {kinds[0]!r} and {kinds[1]!r}")
    attn = [b == "AttnDownBlock2D" for b in down]
    if [b == "AttnUpBlock2D" for b in reversed(up)] != attn:
        raise _unsupported(
            source, "up_block_types", up, f"attention at the same levels as down_block_types {down}, reversed"
        )
    return attn


def unet_config_from_diffusers(
    config: dict[str, Any], *, learned_variance: bool = False, source: str = "diffusers config"
) -> UNetConfig:
    """The UNetConfig of a diffusers ``UNet2DModel`` config.json dict.

    learned_variance: the net's out_channels hold [output, variance] halves (the scheduler's
    variance_type is "learned" or "learned_range"); our out_channels is then half of diffusers'.
    Raises ValueError naming the first field our U-Net cannot express, or an unknown field.
    """
    cfg = _unet2d_fields(config, source)
    ch, channels = _block_channels(cfg, source)
    levels = len(channels)
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        raise _unsupported(source, "time_embedding_dim", cfg["time_embedding_dim"], f"None or {4 * ch}")
    attn = _level_attention(cfg, levels, source)
    head_dim = cfg["attention_head_dim"]
    attn_channels = {channels[i] for i in range(levels) if attn[i]} | {channels[-1]}
    if head_dim is not None and attn_channels != {head_dim}:
        raise _unsupported(
            source,
            "attention_head_dim",
            head_dim,
            f"None (one head per attention layer) or {sorted(attn_channels)}",
        )
    size = _sample_size(cfg, source)
    out_channels = cfg["out_channels"]
    if learned_variance and (not isinstance(out_channels, int) or out_channels % 2):
        raise _unsupported(source, "out_channels", out_channels, "an even count (mean and variance halves)")
    try:
        return UNetConfig(
            resolution=size,
            in_channels=cfg["in_channels"],
            out_channels=out_channels // 2 if learned_variance else out_channels,
            ch=ch,
            ch_mult=tuple(c // ch for c in channels),
            num_res_blocks=cfg["layers_per_block"],
            attn_resolutions=tuple(size // 2**i for i in range(levels) if attn[i]),
            dropout=cfg["dropout"],
            learned_variance=learned_variance,
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def _unet2d_fields(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The UNet2DModel config with diffusers' defaults filled in; fields fixed in our U-Net checked."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _unsupported(source, "_class_name", config["_class_name"], "'UNet2DModel'")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET2D_DEFAULTS)
    if unknown:
        raise ValueError(
            f"{source}: unknown UNet2DModel field(s) {unknown}; ddpmkit cannot tell what they do"
        )
    cfg = {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}

    for field, allowed in (
        ("center_input_sample", (False,)), ("time_embedding_type", ("positional",)), ("freq_shift", (1,)),
        ("flip_sin_to_cos", (False,)), ("mid_block_type", ("UNetMidBlock2D",)),
        ("mid_block_scale_factor", (1,)), ("downsample_padding", (0,)), ("downsample_type", ("conv",)),
        ("upsample_type", ("conv",)),
        ("act_fn", ("silu", "swish")), ("norm_num_groups", (32,)), ("attn_norm_num_groups", (None, 32)),
        ("norm_eps", (1e-6,)), ("resnet_time_scale_shift", ("default",)), ("add_attention", (True,)),
        ("class_embed_type", (None,)), ("num_class_embeds", (None,)),
    ):  # fmt: skip
        _check_equal(cfg, field, allowed, source)
    return cfg


def _block_channels(cfg: dict[str, Any], source: str) -> tuple[int, list[int]]:
    """(ch, the channels of each level): block_out_channels, positive multiples of the first."""
    channels = cfg["block_out_channels"]
    if (
        not isinstance(channels, (list, tuple)) or not channels
        or not all(is_int(c) and c > 0 for c in channels)
        or any(c % channels[0] for c in channels)
    ):  # fmt: skip
        raise _unsupported(
            source, "block_out_channels", channels, "positive multiples of the first entry (ch)"
        )
    return channels[0], list(channels)


def _sample_size(cfg: dict[str, Any], source: str) -> int:
    """sample_size as one int (a square [s, s] too)."""
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not is_int(size) or size < 1:
        raise _unsupported(source, "sample_size", cfg["sample_size"], "a positive int (square images)")
    return size


def diffusers_config_from_unet(config: UNetConfig) -> dict[str, Any]:
    """The diffusers ``UNet2DModel`` config.json of our UNetConfig (every field explicit)."""
    attn = [r in config.attn_resolutions for r in config.level_resolutions]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": config.resolution,
        "in_channels": config.in_channels,
        "out_channels": config.model_out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 0,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": config.dropout,
        "act_fn": "silu",
        "attention_head_dim": None,
        "norm_num_groups": 32,
        "attn_norm_num_groups": None,
        "norm_eps": 1e-6,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None,
        "num_train_timesteps": None,
    }


# ----------------------------------------------------------------------------------------------
# scheduler_config.json (DDPMScheduler) <-> DiffusionConfig


def _schedule_from_trained_betas(cfg: dict[str, Any], source: str) -> str:
    """The name of our schedule that reproduces ``trained_betas`` (rtol 1e-5), else ValueError."""
    betas = cfg["trained_betas"]
    try:
        given = torch.tensor(betas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise _unsupported(source, "trained_betas", "...", "a list of numbers") from None
    if given.ndim != 1 or given.numel() != cfg["num_train_timesteps"]:
        raise _unsupported(source, "trained_betas", f"<{given.numel()} values>", "num_train_timesteps values")
    for name in BETA_SCHEDULES:
        try:
            ours = DiffusionConfig(
                schedule=name,
                num_timesteps=given.numel(),
                beta_start=cfg["beta_start"],
                beta_end=cfg["beta_end"],
            ).betas()
        except ValueError:
            continue
        if torch.allclose(ours, given, rtol=1e-5, atol=1e-12):
            return name
    raise _unsupported(
        source,
        "trained_betas",
        f"<{given.numel()} values>",
        f"betas of one of our schedules {sorted(BETA_SCHEDULES)}",
    )


def diffusion_config_from_scheduler(
    config: dict[str, Any], *, source: str = "scheduler config"
) -> DiffusionConfig:
    """Our DiffusionConfig for a diffusers ``DDPMScheduler`` scheduler_config.json dict.

    beta_schedule linear -> linear, scaled_linear -> quad, squaredcos_cap_v2 -> cosine; explicit
    ``trained_betas`` are accepted when one of our schedules reproduces them. variance_type
    fixed_large / fixed_small / learned / learned_range; prediction_type epsilon / sample. Learned
    variances get the hybrid loss (L_simple + lambda L_vlb) for further training, the others MSE.
    Sampling-only knobs (clip_sample, timestep_spacing, ...) are ignored. Anything else that our
    diffusion cannot express raises a ValueError naming the field.
    """
    cfg = _scheduler_fields(config, source)
    T = cfg["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise _unsupported(source, "num_train_timesteps", T, "an int >= 2")
    schedule = _schedule_name(cfg, source)
    if cfg["variance_type"] not in _VARIANCE_TO_OURS:
        raise _unsupported(
            source, "variance_type", cfg["variance_type"], " or ".join(map(repr, _VARIANCE_TO_OURS))
        )
    if cfg["prediction_type"] not in _PREDICTION_TO_OURS:
        raise _unsupported(
            source, "prediction_type", cfg["prediction_type"], " or ".join(map(repr, _PREDICTION_TO_OURS))
        )
    var_type = _VARIANCE_TO_OURS[cfg["variance_type"]]
    learned = var_type.is_learned
    return DiffusionConfig(
        schedule=schedule,
        num_timesteps=T,
        beta_start=float(cfg["beta_start"]),
        beta_end=float(cfg["beta_end"]),
        mean_type=_PREDICTION_TO_OURS[cfg["prediction_type"]],
        var_type=var_type,
        loss_type=LossType.HYBRID if learned else LossType.MSE,
    )


def _scheduler_fields(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The DDPMScheduler config with diffusers' defaults filled in (and the old predict_epsilon read)."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object")
    if config.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
        raise _unsupported(source, "_class_name", config["_class_name"], "'DDPMScheduler'")
    known = set(DDPM_SCHEDULER_DEFAULTS) | _SCHEDULER_SAMPLING_ONLY | {"predict_epsilon"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(
            f"{source}: unknown DDPMScheduler field(s) {unknown}; ddpmkit cannot tell what they do"
        )
    cfg = {**DDPM_SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if "predict_epsilon" in config:  # diffusers < 0.10 spelled prediction_type this way
        cfg["prediction_type"] = "epsilon" if config["predict_epsilon"] else "sample"
    _check_equal(cfg, "thresholding", (False,), source)
    _check_equal(cfg, "rescale_betas_zero_snr", (False,), source)
    return cfg


def _schedule_name(cfg: dict[str, Any], source: str) -> str:
    """Our schedule's name (beta_start and beta_end checked): beta_schedule's, or the one that
    reproduces trained_betas."""
    for field in ("beta_start", "beta_end"):
        value = cfg[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise _unsupported(source, field, value, "a number in (0, 1]")
    if cfg["trained_betas"] is not None:
        schedule = _schedule_from_trained_betas(cfg, source)
    elif cfg["beta_schedule"] in _BETA_SCHEDULE_TO_OURS:
        schedule = _BETA_SCHEDULE_TO_OURS[cfg["beta_schedule"]]
    else:
        raise _unsupported(
            source, "beta_schedule", cfg["beta_schedule"], " or ".join(map(repr, _BETA_SCHEDULE_TO_OURS))
        )
    return schedule


def scheduler_config_from_diffusion(diffusion: DiffusionConfig) -> dict[str, Any]:
    """The diffusers ``DDPMScheduler`` scheduler_config.json for our DiffusionConfig.

    Schedules without a diffusers name (const, jsd, warmup10, warmup50) go out as ``trained_betas``.
    Raises ValueError for mean_type x_prev, which DDPMScheduler cannot express.
    """
    ours_to_prediction = {v: k for k, v in _PREDICTION_TO_OURS.items()}
    if diffusion.mean_type not in ours_to_prediction:
        raise ValueError(
            f"mean_type {diffusion.mean_type.value!r} has no diffusers DDPMScheduler prediction_type; "
            f"expected one of {[m.value for m in ours_to_prediction]}"
        )
    schedule_names = {v: k for k, v in _BETA_SCHEDULE_TO_OURS.items()}
    trained = None if diffusion.schedule in schedule_names else diffusion.betas().tolist()
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": diffusion.num_timesteps,
        "beta_start": diffusion.beta_start,
        "beta_end": diffusion.beta_end,
        "beta_schedule": schedule_names.get(diffusion.schedule, "linear"),
        "trained_betas": trained,
        "variance_type": {v: k for k, v in _VARIANCE_TO_OURS.items()}[diffusion.var_type],
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": ours_to_prediction[diffusion.mean_type],
        "thresholding": False,
    }


# ----------------------------------------------------------------------------------------------
# weights


def _diffusers_key_to_ours(key: str) -> str:
    m = _LEGACY_ATTN.search(key)
    if m:  # the 2022 AttentionBlock names, as in the first google/ddpm-* uploads
        key = key[: m.start()] + f".attentions.{m.group(1)}.{_LEGACY_ATTN_NAMES[m.group(2)]}.{m.group(3)}"
    for theirs, ours in _DIFFUSERS_TO_OURS:
        key = key.replace(theirs, ours)
    return key


def _our_key_to_diffusers(key: str) -> str:
    for theirs, ours in _DIFFUSERS_TO_OURS:
        key = key.replace(ours, theirs)
    return key


def unet_from_diffusers_state_dict(
    state_dict: dict[str, torch.Tensor],
    unet_config_dict: dict[str, Any],
    *,
    learned_variance: bool = False,
    source: str = "diffusers weights",
) -> UNet:
    """Our UNet (eval mode) holding a diffusers ``UNet2DModel`` state dict.

    unet_config_dict: the UNet2DModel config.json dict; learned_variance as in
    ``unet_config_from_diffusers``. Keys, shapes and finiteness are checked (ValueError naming
    ``source`` and the tensor).
    """
    config = unet_config_from_diffusers(unet_config_dict, learned_variance=learned_variance, source=source)
    with torch.device("meta"):  # no init work: every tensor comes from the state dict
        unet = UNet(config=config)
    expected = unet.state_dict()
    ours: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        new = _diffusers_key_to_ours(key)
        if new in expected and expected[new].ndim == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # a 1x1 conv stored for a channel-wise dense layer
        ours[new] = value
    load_state_dict_into(unet, ours, source)
    return unet.eval()


def diffusers_state_dict_from_unet(unet: UNet) -> dict[str, torch.Tensor]:
    """Our UNet's weights under the diffusers ``UNet2DModel`` names, float32, contiguous, CPU."""
    return {
        _our_key_to_diffusers(k): v.detach().to("cpu", torch.float32).contiguous()
        for k, v in unet.state_dict().items()
    }


def _unpickling_reason(err: Exception) -> str:
    """The specific line of torch's weights-only refusal (e.g. "unsupported GLOBAL posix.system"),
    without its advice to retry with weights_only=False."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
    return (specific or lines or [type(err).__name__])[0]


def read_diffusers_weights(folder: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict in a diffusers unet folder: ``diffusion_pytorch_model.safetensors``, else the
    legacy ``.bin`` through ``torch.load(weights_only=True)`` (a pickle that would run code is
    refused). Returns (state_dict, the file read). Errors name the file and the problem."""
    folder = Path(folder)
    st, binary = folder / SAFETENSORS_NAME, folder / BIN_NAME
    if st.is_file():
        return read_safetensors(st), st
    if binary.is_file():
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{binary}: refused: the pickle holds something other than plain tensors, and loading "
                f"it could run code ({_unpickling_reason(err)}); nothing was executed"
            ) from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as err:
            raise ValueError(
                f"{binary}: not a readable PyTorch weights file (truncated or corrupt?): {err}"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError(f"{binary}: expected a dict of named tensors, got {type(state).__name__}")
        return state, binary
    if any(folder.glob("*.index.json")):
        raise ValueError(
            f"{folder}: sharded diffusers weights are not supported; expected {SAFETENSORS_NAME}"
        )
    raise FileNotFoundError(f"{folder}: no weights file; expected {SAFETENSORS_NAME} or {BIN_NAME}")


# ----------------------------------------------------------------------------------------------
# folders


def is_diffusers_folder(path: Path) -> bool:
    """True if ``path`` is a diffusers pipeline folder (``unet/config.json``) or a flat UNet2DModel folder."""
    if (path / "unet" / UNET_CONFIG_NAME).is_file():
        return True
    try:
        return read_json_object(path / UNET_CONFIG_NAME).get("_class_name") == "UNet2DModel"
    except (OSError, ValueError):  # no file, not JSON, not an object
        return False


def find_diffusers_folder(path: str | Path) -> tuple[Path, Path | None]:
    """(the unet folder, the scheduler_config.json or None) of a diffusers folder.

    Accepts a pipeline folder (unet/ + scheduler/), a flat folder (config.json [+
    scheduler_config.json]), or the unet/ subfolder itself (its sibling scheduler/ is used).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: diffusers folder not found")
    if (path / "unet" / UNET_CONFIG_NAME).is_file():
        unet_dir = path / "unet"
        candidates = [path / "scheduler" / SCHEDULER_CONFIG_NAME, path / SCHEDULER_CONFIG_NAME]
    elif (path / UNET_CONFIG_NAME).is_file():
        unet_dir = path
        candidates = [path / SCHEDULER_CONFIG_NAME, path.parent / "scheduler" / SCHEDULER_CONFIG_NAME]
    else:
        raise FileNotFoundError(
            f"{path}: not a diffusers folder; expected unet/{UNET_CONFIG_NAME} or {UNET_CONFIG_NAME}"
        )
    scheduler = next((c for c in candidates if c.is_file()), None)
    return unet_dir, scheduler


def load_diffusers(path: str | Path) -> tuple[UNet, DiffusionConfig | None, Path]:
    """Load a diffusers folder: (our UNet in eval mode, the DiffusionConfig from its scheduler or
    None when the folder has no scheduler_config.json, the unet folder)."""
    unet_dir, scheduler_path = find_diffusers_folder(path)
    diffusion = None
    if scheduler_path is not None:
        scheduler = read_json_object(scheduler_path)
        diffusion = diffusion_config_from_scheduler(scheduler, source=str(scheduler_path))
    learned = diffusion is not None and diffusion.var_type.is_learned
    config_path = unet_dir / UNET_CONFIG_NAME
    unet_config = read_json_object(config_path)
    unet_config_from_diffusers(unet_config, learned_variance=learned, source=str(config_path))  # fail early
    state_dict, weights_path = read_diffusers_weights(unet_dir)
    unet = unet_from_diffusers_state_dict(
        state_dict, unet_config, learned_variance=learned, source=str(weights_path)
    )
    return unet, diffusion, unet_dir


def write_diffusers_folder(unet: UNet, diffusion: DiffusionConfig, out_dir: str | Path) -> Path:
    """Write ``out_dir``/unet (config.json + diffusion_pytorch_model.safetensors),
    ``out_dir``/scheduler/scheduler_config.json and model_index.json (a DDPMPipeline)."""
    out = Path(out_dir)
    scheduler = scheduler_config_from_diffusion(diffusion)  # raises before anything is written
    if unet.config.learned_variance != diffusion.var_type.is_learned:
        raise ValueError(
            f"the U-Net's learned_variance={unet.config.learned_variance} does not match the diffusion's "
            f"var_type {diffusion.var_type.value!r}"
        )
    tensors = diffusers_state_dict_from_unet(unet)
    check_finite(tensors, "U-Net being exported")
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    weights = save_safetensors_bytes(tensors, metadata={"format": "pt"})
    atomic_write_bytes(out / "unet" / SAFETENSORS_NAME, weights)
    _write_json(out / "unet" / UNET_CONFIG_NAME, diffusers_config_from_unet(unet.config))
    _write_json(out / "scheduler" / SCHEDULER_CONFIG_NAME, scheduler)
    _write_json(
        out / "model_index.json",
        {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
        },
    )
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data, sort_keys=False)
