"""The paper's U-Net (App. B), its config and presets, read from and saved as our model folder.

As the authors' ``diffusion_tf/models/unet.py``; the folder's files are ``nn.folder``'s.

Layout (levels i = 0..L-1 at resolutions R, R/2, ..., R/2^(L-1); channels ch * ch_mult[i]):

    conv_in -> down_blocks[i]: num_res_blocks x (ResBlock [+ AttnBlock]) [+ Downsample]
            -> mid_block: ResBlock, AttnBlock, ResBlock
            -> up_blocks[j] (j = 0 is the deepest level): (num_res_blocks + 1) x
               (ResBlock on concat(h, skip) [+ AttnBlock]) [+ Upsample]
            -> GroupNorm -> swish -> conv_out

Every ResBlock receives the time embedding; attention sits at the levels whose resolution is in
``attn_resolutions``. With ``learned_variance`` the output has 2 * out_channels channels: the mean
(or eps / x0) part first, then the variance interpolation v (Nichol & Dhariwal) or log-variance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpmkit.checks import check_int
from ddpmkit.enums import unknown_choice
from ddpmkit.nn.folder import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    diffusion_section,
    load_state_dict_into,
    read_model_config,
    read_safetensors,
    save_model_folder,
)
from ddpmkit.nn.layers import (
    GROUPNORM_GROUPS,
    NEAR_ZERO_INIT_SCALE,
    AttnBlock,
    Downsample,
    ResBlock,
    TimeEmbedding,
    Upsample,
    conv3x3,
    group_norm,
)

__all__ = ["UNET_PRESETS", "UNet", "UNetConfig", "read_model_folder"]


# Far above any published DDPM (the paper: ch 128, 2 res blocks, 4-6 levels, 256 px), far below a
# size that takes minutes to build or exhausts memory.
# The resolution is left to the memory bound (training.fit.check_fits): it sizes activations, not weights.
MAX_SIZES = {"resolution": 2**62, "in_channels": 64, "out_channels": 64, "ch": 16384, "num_res_blocks": 64,
             "levels": 12}


def _positive_int(name: str, value: Any) -> int:
    return check_int(value, f"UNetConfig.{name}", low=1)


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"UNetConfig.{name} must be a sequence of positive ints, got {value!r}")
    return tuple(_positive_int(name, v) for v in value)


@dataclass(frozen=True)
class UNetConfig:
    """The U-Net's hyperparameters (App. B). JSON-able through ``to_dict`` / ``from_dict``.

    resolution: image side R; must be divisible by 2^(len(ch_mult) - 1).
    ch * ch_mult[i]: channels at level i, each a multiple of 32 (GroupNorm(32)).
    attn_resolutions: the level resolutions R / 2^i that get self-attention.
    learned_variance: the output has 2 * out_channels channels.
    """

    resolution: int
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    learned_variance: bool = False

    def __post_init__(self) -> None:
        for name in ("resolution", "in_channels", "out_channels", "ch", "num_res_blocks"):
            _positive_int(name, getattr(self, name))
            if getattr(self, name) > MAX_SIZES[name]:  # before a file's number builds (or allocates) a net
                raise ValueError(f"UNetConfig.{name} must be at most {MAX_SIZES[name]:,}, got "
                                 f"{getattr(self, name):,}")
        # Normalise lists (from JSON) to tuples; the dataclass is frozen, hence object.__setattr__.
        object.__setattr__(self, "ch_mult", _int_tuple("ch_mult", self.ch_mult))
        object.__setattr__(self, "attn_resolutions", _int_tuple("attn_resolutions", self.attn_resolutions))
        if not 1 <= len(self.ch_mult) <= MAX_SIZES["levels"]:
            raise ValueError(f"UNetConfig.ch_mult must have 1 to {MAX_SIZES['levels']} levels, got "
                             f"{len(self.ch_mult)}")
        if self.ch * max(self.ch_mult) > MAX_SIZES["ch"]:
            raise ValueError(f"UNetConfig: ch * ch_mult[i] must be at most {MAX_SIZES['ch']:,} channels, "
                             f"got {self.ch * max(self.ch_mult):,}")
        for mult in self.ch_mult:
            if (self.ch * mult) % GROUPNORM_GROUPS:
                raise ValueError(
                    f"UNetConfig: every level's channels ch * ch_mult[i] must be a multiple of "
                    f"{GROUPNORM_GROUPS} (GroupNorm groups); got ch={self.ch}, ch_mult={self.ch_mult}"
                )
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(
                f"UNetConfig.resolution {self.resolution} must be divisible by 2^(levels-1) = "
                f"{2 ** (len(self.ch_mult) - 1)} for ch_mult={self.ch_mult}"
            )
        unknown = sorted(set(self.attn_resolutions) - set(self.level_resolutions))
        if unknown:
            raise ValueError(
                f"UNetConfig.attn_resolutions {unknown} match no level; the levels' resolutions are "
                f"{list(self.level_resolutions)}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"UNetConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if not isinstance(self.learned_variance, bool):
            raise ValueError(f"UNetConfig.learned_variance must be a bool, got {self.learned_variance!r}")

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """The resolution of each level: R, R/2, ..., R/2^(L-1)."""
        return tuple(self.resolution // 2**i for i in range(len(self.ch_mult)))

    @property
    def model_out_channels(self) -> int:
        """Channels of the network output: out_channels, doubled with a learned variance."""
        return 2 * self.out_channels if self.learned_variance else self.out_channels

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a U-Net config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown U-Net config field(s) {unknown}; expected some of {sorted(names)}")
        if "resolution" not in d:
            raise ValueError("U-Net config is missing the field 'resolution'")
        return cls(**d)

    def replace(self, **overrides: Any) -> UNetConfig:
        """A copy with some fields changed (validated like a new config)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown U-Net config field(s) {unknown}; expected some of {sorted(names)}")
        return dataclasses.replace(self, **overrides)


_PAPER_256 = UNetConfig(
    resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0
)

UNET_PRESETS: dict[str, UNetConfig] = {
    # run_cifar.py: 35,746,307 parameters.
    "cifar10": UNetConfig(
        resolution=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
    ),
    # run_celebahq.py / run_lsun.py share one network: 113,673,219 parameters.
    "celebahq256": _PAPER_256,
    "lsun256": _PAPER_256,
    # 8x8 grayscale digits on a CPU: levels 8x8 and 4x4, 64 ch, one res block per level, attention
    # only in the middle block; trains in minutes (the `digits` training preset, config.py).
    "digits": UNetConfig(
        resolution=8,
        in_channels=1,
        out_channels=1,
        ch=64,
        ch_mult=(1, 1),
        num_res_blocks=1,
        attn_resolutions=(),
        dropout=0.0,
    ),
}


class _DownLevel(nn.Module):
    def __init__(self, *, in_ch: int, out_ch: int, temb_ch: int, cfg: UNetConfig, attn: bool, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(in_ch=in_ch if j == 0 else out_ch, out_ch=out_ch, temb_ch=temb_ch, dropout=cfg.dropout)
            for j in range(cfg.num_res_blocks)
        )
        self.attentions = nn.ModuleList(AttnBlock(out_ch) for _ in range(cfg.num_res_blocks) if attn)
        self.downsample = Downsample(out_ch) if down else None


class _UpLevel(nn.Module):
    def __init__(
        self, *, in_chs: list[int], out_ch: int, temb_ch: int, cfg: UNetConfig, attn: bool, up: bool
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(in_ch=c, out_ch=out_ch, temb_ch=temb_ch, dropout=cfg.dropout) for c in in_chs
        )
        self.attentions = nn.ModuleList(AttnBlock(out_ch) for _ in in_chs if attn)
        self.upsample = Upsample(out_ch) if up else None


class _MidBlock(nn.Module):
    def __init__(self, *, channels: int, temb_ch: int, dropout: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(in_ch=channels, out_ch=channels, temb_ch=temb_ch, dropout=dropout) for _ in range(2)
        )
        self.attentions = nn.ModuleList([AttnBlock(channels)])


class UNet(nn.Module):
    """The paper's U-Net: ``unet(x, t)`` with x (B, in_channels, H, W), t (B,) int64
    -> (B, model_out_channels, H, W). H and W must be divisible by 2^(levels-1)."""

    def __init__(self, *, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise ValueError(f"UNet(config=...) expects a UNetConfig, got {type(config).__name__}")
        self.config = config
        ch, levels = config.ch, len(config.ch_mult)
        temb_ch = 4 * ch
        self.conv_in = conv3x3(config.in_channels, ch)
        self.time_embedding = TimeEmbedding(ch)

        skip_chs = [ch]  # channels of each stored skip activation, in push order
        cur = ch
        self.down_blocks = nn.ModuleList()
        for i, mult in enumerate(config.ch_mult):
            out_ch = ch * mult
            attn = config.level_resolutions[i] in config.attn_resolutions
            level = _DownLevel(
                in_ch=cur, out_ch=out_ch, temb_ch=temb_ch, cfg=config, attn=attn, down=i != levels - 1
            )
            self.down_blocks.append(level)
            cur = out_ch
            skip_chs += [out_ch] * config.num_res_blocks + ([out_ch] if i != levels - 1 else [])

        self.mid_block = _MidBlock(channels=cur, temb_ch=temb_ch, dropout=config.dropout)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            out_ch = ch * config.ch_mult[i]
            in_chs = []
            for _ in range(config.num_res_blocks + 1):
                in_chs.append(cur + skip_chs.pop())
                cur = out_ch
            attn = config.level_resolutions[i] in config.attn_resolutions
            self.up_blocks.append(
                _UpLevel(in_chs=in_chs, out_ch=out_ch, temb_ch=temb_ch, cfg=config, attn=attn, up=i != 0)
            )
        assert not skip_chs, "every skip activation is consumed"

        self.conv_norm_out = group_norm(cur)
        self.conv_out = conv3x3(cur, config.model_out_channels, scale=NEAR_ZERO_INIT_SCALE)
        # Speed (benchmarks/NOTES.md): conv weights in the activations' NHWC layout, so that no conv
        # reorders its weight on every call; state dicts and saved files stay contiguous.
        self.to(memory_format=torch.channels_last)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> UNet:
        """The preset ``name`` (one of ``UNET_PRESETS``), with some config fields overridden."""
        if name not in UNET_PRESETS:
            raise unknown_choice("U-Net preset", name, sorted(UNET_PRESETS))
        return cls(config=UNET_PRESETS[name].replace(**overrides) if overrides else UNET_PRESETS[name])

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        factor = 2 ** (len(cfg.ch_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"H and W must be divisible by {factor}, got {tuple(x.shape[2:])}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) float; t: (B,) int64 in [0, T) -> (B, model_out_channels, H, W)."""
        t = self._check_inputs(x, t)
        temb = self.time_embedding(t)  # (B, 4ch)
        # Speed (benchmarks/NOTES.md): activations are NHWC (channels_last) end to end, which the
        # oneDNN / cuDNN convs, GroupNorm and the attention's (B, HW, C) views take without copies;
        # the output comes back in the input's layout.
        nchw_in = x.is_contiguous()
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))  # (B, ch, H, W)
        hs = [h]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = resnet(h, temb)
                if len(level.attentions):
                    h = level.attentions[j](h)
                hs.append(h)
            if level.downsample is not None:
                h = level.downsample(h)  # (B, C, H/2, W/2)
                hs.append(h)
        mid = self.mid_block
        h = mid.resnets[1](mid.attentions[0](mid.resnets[0](h, temb)), temb)
        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                h = resnet(torch.cat([h, hs.pop()], dim=1), temb)  # skip concatenated on channels
                if len(level.attentions):
                    h = level.attentions[j](h)
            if level.upsample is not None:
                h = level.upsample(h)  # (B, C, 2H, 2W)
        h = nn.functional.silu(self.conv_norm_out(h), inplace=not torch.is_grad_enabled())
        out = self.conv_out(h)  # (B, C_out, H, W) channels_last
        return out.contiguous() if nchw_in else out

    def save(self, path: str | Path, *, diffusion: dict[str, Any] | Any | None = None) -> Path:
        """Write our model folder: ``config.json`` (format "ddpmkit.model") + ``model.safetensors``.

        diffusion: a DiffusionConfig (anything with ``to_dict``) or its dict, stored beside the net.
        Returns the folder path.
        """
        return save_model_folder(self, path, diffusion=diffusion)


def read_model_folder(path: str | Path) -> tuple[UNet, dict[str, Any] | None]:
    """Load our model folder: returns (UNet with the stored weights, in eval mode; the diffusion
    dict or None)."""
    path = Path(path)
    config = read_model_config(path)
    try:
        unet_config = UNetConfig.from_dict(config.get("unet"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path / CONFIG_NAME}: bad 'unet' section: {err}") from None
    diffusion = diffusion_section(config, path)
    state_dict = read_safetensors(path / WEIGHTS_NAME)
    with torch.device("meta"):  # no init work: every tensor comes from the file
        unet = UNet(config=unet_config)
    load_state_dict_into(unet, state_dict, path / WEIGHTS_NAME)
    return unet.eval(), diffusion
