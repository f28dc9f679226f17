"""The authors' TensorFlow checkpoints (github.com/hojonathanho/diffusion) -> our model folder.

The authors' U-Net (`diffusion_tf/models/unet.py`, scope `model/`) names its variables

    temb/dense{0,1}/{W,b}                   conv_in/{W,b}                norm_out/{gamma,beta}
    down_i/block_j/{norm1,norm2}/{gamma,beta}, {conv1,conv2}/{W,b}, temb_proj/{W,b}, nin_shortcut/{W,b}
    down_i/attn_j/norm/{gamma,beta}, {q,k,v,proj_out}/{W,b}      down_i/downsample/conv/{W,b}
    mid/block_1, mid/attn_1, mid/block_2
    up_i/block_j (j <= num_res_blocks), up_i/attn_j, up_i/upsample/conv
    conv_out/{W,b}

with `<name>/ExponentialMovingAverage` beside each for the EMA weights (and optimizer slots
`<name>/Adam`, `<name>/Adam_1`, which are ignored). Layouts: conv W is [kh, kw, in, out], dense and
nin ("network in network", a 1x1 layer) W is [in, out].

The conversion maps these names onto the diffusers `UNet2DModel` names (the mapping of
released_models.md) and loads them with `unet_from_diffusers_state_dict`, so one mapping onto our
U-Net serves both the diffusers folders and these checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ddpmkit.interop.tf_bundle import TFCheckpointReader

if TYPE_CHECKING:
    from ddpmkit.diffusion import DiffusionConfig
    from ddpmkit.nn import UNet

__all__ = [
    "TFCheckpointReader",
    "TFUNetLayout",
    "unet_from_tf",
    "diffusers_state_dict_from_tf",
    "infer_tf_unet_layout",
    "read_tf_unet_variables",
]

TF_MODEL_SCOPE = "model/"
EMA_SUFFIX = "/ExponentialMovingAverage"
_OPTIMIZER_SLOTS = ("Adam", "Adam_1", "Momentum", "RMSProp", "RMSProp_1", "Adagrad")
# The authors' models all attend at 16x16 (attn_resolutions=(16,)); without attention in the
# down path, the resolution follows from the number of levels of their released models.
_AUTHORS_ATTN_RESOLUTION = 16
_RESOLUTION_BY_LEVELS = {4: 32, 6: 256}


def read_tf_unet_variables(reader: TFCheckpointReader, *, ema: bool = True) -> dict[str, np.ndarray]:
    """The U-Net's variables, keyed by their name under `model/` (e.g. "conv_in/W").

    ema=True takes each variable's `ExponentialMovingAverage` shadow (the weights behind the
    paper's sample quality); ValueError lists the variables without one. Optimizer slots and
    variables outside `model/` (global_step, beta1_power, ...) are ignored.
    """
    raw, shadows = set(), set()
    for key in reader.keys():
        if not key.startswith(TF_MODEL_SCOPE) or key.rsplit("/", 1)[-1] in _OPTIMIZER_SLOTS:
            continue
        name = key[len(TF_MODEL_SCOPE) :]
        (shadows if name.endswith(EMA_SUFFIX) else raw).add(name.removesuffix(EMA_SUFFIX))
    names = shadows if ema else raw  # an EMA-only export (shadows without raw values) converts too
    if not names:
        kind = "ExponentialMovingAverage shadows" if ema and raw else "variables"
        hint = "; convert with --no-ema for the raw weights" if ema and raw else ""
        where = f"TF checkpoint {reader.prefix}"
        raise ValueError(f"{where} has no {kind} under the scope {TF_MODEL_SCOPE!r}{hint}")
    if ema and raw - shadows:
        missing = sorted(raw - shadows)
        raise ValueError(
            f"TF checkpoint {reader.prefix} has no ExponentialMovingAverage shadow for "
            f"{len(missing)} variable(s): {_preview(missing)}; convert with --no-ema for the raw weights"
        )
    suffix = EMA_SUFFIX if ema else ""
    return {name: reader.read(TF_MODEL_SCOPE + name + suffix) for name in sorted(names)}


@dataclass(frozen=True)
class TFUNetLayout:
    """The hyperparameters of the authors' `unet.model` that its variables determine."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]  # indices of the levels with attention (0 = full resolution)
    in_channels: int
    out_channels: int  # of the network's output (2x in_channels for learned variances)

    def resolution(self, override: int | None = None) -> int:
        """The image size: given, or 16 * 2^(first attention level), or by the number of levels."""
        if override is not None:
            return override
        if self.attn_levels:
            return _AUTHORS_ATTN_RESOLUTION * 2 ** self.attn_levels[0]
        if len(self.ch_mult) in _RESOLUTION_BY_LEVELS:
            return _RESOLUTION_BY_LEVELS[len(self.ch_mult)]
        raise ValueError(
            f"cannot infer the image resolution of a U-Net with {len(self.ch_mult)} levels and no "
            "attention; pass resolution="
        )


def _shape(shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise ValueError(f"the TF checkpoint has no variable {TF_MODEL_SCOPE}{name}, which the U-Net needs")
    return shapes[name]


def _count(shapes: dict[str, tuple[int, ...]], fmt: str) -> int:
    n = 0
    while any(k.startswith(fmt.format(n) + "/") for k in shapes):
        n += 1
    return n


def infer_tf_unet_layout(shapes: dict[str, tuple[int, ...]]) -> TFUNetLayout:
    """Read ch, ch_mult, num_res_blocks, the attention levels and the channel counts off the shapes
    of the variables (names under `model/`)."""
    conv_in = _shape(shapes, "conv_in/W")  # [3, 3, in, ch]
    ch = conv_in[3]
    levels = _count(shapes, "down_{}")
    num_res_blocks = _count(shapes, "down_0/block_{}")
    if levels == 0 or num_res_blocks == 0:
        raise ValueError("the TF checkpoint has no down_0/block_0: not the authors' U-Net")
    ch_mult = []
    for i in range(levels):
        out_ch = _shape(shapes, f"down_{i}/block_0/conv1/W")[3]
        if out_ch % ch:
            raise ValueError(f"down_{i} has {out_ch} channels, not a multiple of ch={ch}")
        ch_mult.append(out_ch // ch)
    attn_levels = tuple(i for i in range(levels) if f"down_{i}/attn_0/q/W" in shapes)
    return TFUNetLayout(
        ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, attn_levels=attn_levels,
        in_channels=conv_in[2], out_channels=_shape(shapes, "conv_out/W")[3],
    )


# --------------------------------------------------------------------------- names and layouts

# kinds of layer: how W becomes the PyTorch weight
_CONV, _DENSE, _NIN_CONV, _NIN_LINEAR, _NORM = "conv", "dense", "nin_conv", "nin_linear", "norm"
_NORM_PARAMS = (("gamma", "weight"), ("beta", "bias"))  # TF name -> torch name
_WEIGHT_PARAMS = (("W", "weight"), ("b", "bias"))


def _resnet_layers(tf: str, hf: str, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str, str]]:
    layers = [
        (f"{tf}/norm1", f"{hf}.norm1", _NORM), (f"{tf}/conv1", f"{hf}.conv1", _CONV),
        (f"{tf}/temb_proj", f"{hf}.time_emb_proj", _DENSE), (f"{tf}/norm2", f"{hf}.norm2", _NORM),
        (f"{tf}/conv2", f"{hf}.conv2", _CONV),
    ]
    conv1 = shapes.get(f"{tf}/conv1/W")
    if conv1 is not None and conv1[2] != conv1[3]:  # the channel count changes: a 1x1 shortcut
        layers.append((f"{tf}/nin_shortcut", f"{hf}.conv_shortcut", _NIN_CONV))
    return layers


def _attn_layers(tf: str, hf: str) -> list[tuple[str, str, str]]:
    return [
        (f"{tf}/norm", f"{hf}.group_norm", _NORM), (f"{tf}/q", f"{hf}.to_q", _NIN_LINEAR),
        (f"{tf}/k", f"{hf}.to_k", _NIN_LINEAR), (f"{tf}/v", f"{hf}.to_v", _NIN_LINEAR),
        (f"{tf}/proj_out", f"{hf}.to_out.0", _NIN_LINEAR),
    ]


def tf_to_diffusers_layers(
    layout: TFUNetLayout, shapes: dict[str, tuple[int, ...]]
) -> list[tuple[str, str, str]]:
    """(TF layer scope, diffusers module name, kind) for every layer of the U-Net `layout`."""
    levels = len(layout.ch_mult)
    layers = [
        ("temb/dense0", "time_embedding.linear_1", _DENSE),
        ("temb/dense1", "time_embedding.linear_2", _DENSE),
        ("conv_in", "conv_in", _CONV),
    ]
    for i in range(levels):
        for j in range(layout.num_res_blocks):
            layers += _resnet_layers(f"down_{i}/block_{j}", f"down_blocks.{i}.resnets.{j}", shapes)
            if i in layout.attn_levels:
                layers += _attn_layers(f"down_{i}/attn_{j}", f"down_blocks.{i}.attentions.{j}")
        if i != levels - 1:
            layers.append((f"down_{i}/downsample/conv", f"down_blocks.{i}.downsamplers.0.conv", _CONV))
    layers += _resnet_layers("mid/block_1", "mid_block.resnets.0", shapes)
    layers += _attn_layers("mid/attn_1", "mid_block.attentions.0")
    layers += _resnet_layers("mid/block_2", "mid_block.resnets.1", shapes)
    for i in range(levels):
        up = levels - 1 - i  # diffusers counts the up path from the lowest resolution
        for j in range(layout.num_res_blocks + 1):
            layers += _resnet_layers(f"up_{i}/block_{j}", f"up_blocks.{up}.resnets.{j}", shapes)
            if i in layout.attn_levels:
                layers += _attn_layers(f"up_{i}/attn_{j}", f"up_blocks.{up}.attentions.{j}")
        if i != 0:
            layers.append((f"up_{i}/upsample/conv", f"up_blocks.{up}.upsamplers.0.conv", _CONV))
    layers += [("norm_out", "conv_norm_out", _NORM), ("conv_out", "conv_out", _CONV)]
    return layers


def _to_torch_weight(w: np.ndarray, kind: str) -> np.ndarray:
    if kind == _CONV:
        return w.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> (out, in, kh, kw)
    if kind in (_DENSE, _NIN_LINEAR):
        return w.T  # [in, out] -> (out, in)
    if kind == _NIN_CONV:
        return w.T[:, :, None, None]  # [in, out] -> (out, in, 1, 1)
    raise NotImplementedError(kind)


def diffusers_state_dict_from_tf(
    variables: dict[str, np.ndarray], layout: TFUNetLayout
) -> dict[str, torch.Tensor]:
    """Rename and re-lay the TF variables (names under `model/`) as a diffusers UNet2DModel state dict.

    ValueError lists the variables the layout needs but the checkpoint lacks, and those the layout
    does not know.
    """
    shapes = {name: tuple(v.shape) for name, v in variables.items()}
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for tf_scope, hf_name, kind in tf_to_diffusers_layers(layout, shapes):
        params = _NORM_PARAMS if kind == _NORM else _WEIGHT_PARAMS
        for tf_param, hf_param in params:
            tf_name = f"{tf_scope}/{tf_param}"
            if tf_name not in variables:
                missing.append(TF_MODEL_SCOPE + tf_name)
                continue
            used.add(tf_name)
            value = variables[tf_name]
            if tf_param == "W":
                value = _to_torch_weight(value, kind)
            state[f"{hf_name}.{hf_param}"] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    unknown = sorted(TF_MODEL_SCOPE + name for name in set(variables) - used)
    if missing or unknown:
        parts = [f"missing {len(missing)}: {_preview(missing)}"] if missing else []
        parts += [f"unknown {len(unknown)}: {_preview(unknown)}"] if unknown else []
        raise ValueError(
            f"the TF checkpoint does not match the authors' U-Net (ch={layout.ch}, ch_mult={layout.ch_mult}, "
            f"num_res_blocks={layout.num_res_blocks}): " + "; ".join(parts)
        )
    return state


def _preview(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def diffusers_unet_config(layout: TFUNetLayout, resolution: int) -> dict:
    """The diffusers UNet2DModel config.json of the authors' architecture `layout`."""
    levels = len(layout.ch_mult)
    attn = [i in layout.attn_levels for i in range(levels)]
    return {
        "_class_name": "UNet2DModel", "sample_size": resolution,
        "in_channels": layout.in_channels, "out_channels": layout.out_channels,
        "block_out_channels": [layout.ch * m for m in layout.ch_mult],
        "layers_per_block": layout.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_scale_factor": 1, "add_attention": True, "attention_head_dim": None,
        "norm_num_groups": 32, "norm_eps": 1e-6, "act_fn": "silu",
        "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
        "downsample_padding": 0, "downsample_type": "conv", "upsample_type": "conv",
        "resnet_time_scale_shift": "default", "center_input_sample": False,
        "dropout": 0.1 if resolution == 32 else 0.0,  # the authors' runs: CIFAR-10 0.1, 256x256 0.0
    }


def authors_diffusion_config(resolution: int, learned_variance: bool):
    """The diffusion of the authors' runs: linear betas 1e-4..0.02, T = 1000, eps prediction;
    reverse variances fixedlarge (beta_t) for CIFAR-10 (run_cifar.py), fixedsmall (the posterior
    variance) for the 256x256 models (run_celebahq.py, run_lsun.py use diffusion_utils.py)."""
    from ddpmkit.diffusion import DiffusionConfig, MeanType, VarType

    if learned_variance:
        var_type = VarType.LEARNED
    else:
        var_type = VarType.FIXED_LARGE if resolution <= 32 else VarType.FIXED_SMALL
    return DiffusionConfig(
        schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02,
        mean_type=MeanType.EPS, var_type=var_type,
    )


def unet_from_tf(
    prefix: str | os.PathLike, *, ema: bool = True, resolution: int | None = None
) -> tuple[UNet, DiffusionConfig]:
    """The authors' TF checkpoint `prefix` -> (our U-Net, the diffusion of the authors' run).

    ema=True (default) takes the ExponentialMovingAverage weights. The architecture is read off
    the variable shapes; `resolution` overrides the inferred image size.
    """
    reader = TFCheckpointReader(prefix)
    variables = read_tf_unet_variables(reader, ema=ema)
    layout = infer_tf_unet_layout({name: tuple(v.shape) for name, v in variables.items()})
    res = layout.resolution(resolution)
    state = diffusers_state_dict_from_tf(variables, layout)
    from ddpmkit.interop.diffusers import unet_from_diffusers_state_dict

    learned = layout.out_channels == 2 * layout.in_channels
    unet = unet_from_diffusers_state_dict(
        state, diffusers_unet_config(layout, res), learned_variance=learned,
        source=f"TF checkpoint {reader.prefix}",
    )
    return unet, authors_diffusion_config(res, learned)
