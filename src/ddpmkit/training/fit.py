"""What fits: the network for a data set, the memory a U-Net needs, and the batch that fits in it.

- The network for a data set: ``unet_for_data`` / ``config_for_data`` build one for the data's own
  size and the device (``NetSize``, ``default_net_size``, ``small_recipe``), ``native_resolution``
  reads that size, ``check_data_fits`` refuses a network of another size (nothing is resized silently).
- The memory: ``estimate_memory`` is the one estimator, from a U-Net's config alone (no
  allocation); ``check_fits`` refuses, before anything is allocated, what cannot fit in
  ``memory_limit`` (training and sampling), and ``auto_batch_size`` picks the most samples per
  network call within a sampling bound.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ddpmkit.config import TrainConfig, train_preset
from ddpmkit.enums import parse_enum
from ddpmkit.nn import UNET_PRESETS, UNetConfig

__all__ = [
    "MemoryEstimate",
    "NetSize",
    "auto_batch_size",
    "check_data_fits",
    "check_fits",
    "config_for_data",
    "default_net_size",
    "estimate_memory",
    "memory_limit",
    "native_resolution",
    "small_recipe",
    "unet_for_data",
]


class NetSize(str, Enum):
    """The network ``config_for_data`` builds for a data set without a preset."""

    PAPER = "paper"  # the paper's family: CIFAR-10's U-Net at 32 px, CelebA-HQ/LSUN's at 256 px
    SMALL = "small"  # the CPU variant of the digits preset: ch 64, one res block a level, no attention


# ----------------------------------------------------------------------------- the network for a data set
def _num_levels(resolution: int, cap: int) -> int:
    """Levels R, R/2, ... while the next one is a whole number >= 4; at most ``cap``."""
    levels, r = 1, resolution
    while r % 2 == 0 and r // 2 >= 4 and levels < cap:
        levels, r = levels + 1, r // 2
    return levels


def unet_for_data(resolution: int, channels: int, size: NetSize | str) -> UNetConfig:
    """A U-Net for ``channels``-channel ``resolution``-px images (see ``NetSize``).

    paper: 32 px is exactly the CIFAR-10 network (35.7M parameters) and 256 px the CelebA-HQ /
    LSUN one; other sizes keep ch 128 and 2 res blocks, halve down to 4 px (at most 6 levels) with
    multipliers (1, 2, 2, 2) up to 32 px and (1, 1, 2, 2, 4, 4) above, attention at the level
    nearest 16 px, dropout 0.1 up to 32 px (CIFAR-10's) and 0 above (the 256 px models').
    small: the digits preset's network at any size: ch 64 at every level, levels down to 4 px,
    one res block per level, attention only in the middle block, no dropout (8 px: 1.08M).
    """
    size = parse_enum(NetSize, size, "net size")
    io = {"in_channels": channels, "out_channels": channels}
    if size is NetSize.SMALL:
        levels = _num_levels(resolution, cap=6)
        return dataclasses.replace(UNET_PRESETS["digits"], resolution=resolution, ch_mult=(1,) * levels, **io)
    if size is NetSize.PAPER:
        if resolution in (32, 256):
            return dataclasses.replace(UNET_PRESETS["cifar10" if resolution == 32 else "celebahq256"], **io)
        levels = _num_levels(resolution, cap=6)
        mult = ((1, 2, 2, 2, 2, 2) if resolution <= 32 else (1, 1, 2, 2, 4, 4))[:levels]
        res = [resolution // 2**i for i in range(levels)]
        attn = min(res, key=lambda r: (abs(r - 16), -r))
        return UNetConfig(resolution=resolution, ch=128, ch_mult=mult, num_res_blocks=2,
                          attn_resolutions=(attn,), dropout=0.1 if resolution <= 32 else 0.0, **io)
    raise NotImplementedError(size)


# the CPU recipe's budget: images x pixels per image seen in training (1000 steps of 64 at 16 px,
# docs/training.md) and drawn for the final grid (64 at 16 px, 16 at 32 px)
_CPU_TRAIN_PIXELS = 1000 * 64 * 16 * 16
_CPU_GRID_PIXELS = 64 * 16 * 16


def default_net_size(resolution: int, device: Any) -> NetSize:
    """The network ``--data`` gets without ``--net``: paper from 32 px up on a GPU; small on a CPU
    (the paper's 35.7M-parameter CIFAR-10 recipe is far too slow there) and below 32 px."""
    import torch

    on_gpu = torch.device(device).type == "cuda"
    return NetSize.PAPER if on_gpu and resolution >= 32 else NetSize.SMALL


def small_recipe(resolution: int) -> dict[str, int]:
    """Steps, batch and final-grid size of the small network's recipe, sized to the images: a fixed
    budget of images x pixels (``_CPU_TRAIN_PIXELS``), batch 64 up to 16 px and 32 above, at least
    500 steps; a final grid of ``_CPU_GRID_PIXELS`` pixels (4 to 64 images)."""
    batch = 64 if resolution <= 16 else 32
    steps = max(500, 100 * round(_CPU_TRAIN_PIXELS / (batch * resolution**2 * 100)))
    grid = min(64, max(4, _CPU_GRID_PIXELS // resolution**2))
    return {"steps": steps, "batch_size": batch, "num_samples": grid, "sample_every": steps}


def config_for_data(data: str, resolution: int, channels: int,
                    size: NetSize | str | None = None, *, device: Any) -> TrainConfig:
    """The run ``ddpm train --data DATA`` makes without a preset (preset "custom") on ``device``.

    ``size`` None: ``default_net_size``. The paper network gets the paper's CIFAR-10 recipe (800k
    steps); the small one the digits recipe (lr 1e-3, EMA 0.998, one CPU thread) with a 50-step
    warm-up, steps, batch and grid sized to the images (``small_recipe``), random flips on and EMA
    warm-up on (a short run's EMA would otherwise still hold much of the initial weights).
    """
    if size is None:
        size = default_net_size(resolution, device)
    size = parse_enum(NetSize, size, "net size")
    unet = unet_for_data(resolution, channels, size)
    if size is NetSize.PAPER:
        return TrainConfig(preset="custom", unet=unet, data=data)
    if size is NetSize.SMALL:
        return dataclasses.replace(train_preset("digits"), preset="custom", unet=unet, data=data,
                                   random_flip=True, ema_warmup=True, warmup_steps=50,
                                   **small_recipe(resolution))
    raise NotImplementedError(size)


def _describe(resolution: int, channels: int) -> str:
    return f"{resolution}x{resolution} {'RGB' if channels == 3 else 'grayscale'}"


def _sizes_text(sizes: tuple[tuple[int, int], ...]) -> str:
    shown = ", ".join(f"{w}x{h}" for w, h in sizes[:4])
    return shown + (f" and {len(sizes) - 4} more sizes" if len(sizes) > 4 else "")


def native_resolution(description: str, sizes: tuple[tuple[int, int], ...]) -> int:
    """The one square, even side of ``sizes``; else a ValueError asking for --resolution."""
    if len(sizes) > 1:
        raise ValueError(f"the images of {description} differ in size ({_sizes_text(sizes)}); pass "
                         "--resolution N to center-crop and resize every image to NxN")
    (w, h), = sizes
    if w != h or w % 2 or w < 4:
        near = max(8, round(min(w, h) / 8) * 8)
        raise ValueError(f"the images of {description} are {w}x{h}, not a square of even side that a "
                         f"U-Net can halve; pass --resolution N (e.g. --resolution {near}) to center-crop "
                         "and resize them")
    return w


def check_data_fits(config: TrainConfig, description: str, sizes: tuple[tuple[int, int], ...],
                    channels: int, *, what: str, drop: str = "--preset") -> None:
    """Refuse a run whose network's image size differs from the data's (nothing is resized silently).

    ``what`` names where the network came from (e.g. "the digits preset"), ``drop`` the flag that
    chose it; the message names both sizes and the flags that fix it.
    """
    res, ch = config.unet.resolution, config.unet.in_channels
    if len(sizes) > 1:
        raise ValueError(f"the images of {description} differ in size ({_sizes_text(sizes)}) and {what} "
                         f"trains {_describe(res, ch)} images; pass --resolution {res} to center-crop "
                         "and resize every image to that size")
    (w, h), = sizes
    if (w, h, channels) != (res, res, ch):
        data = f"{w}x{h} {'RGB' if channels == 3 else 'grayscale'}"
        raise ValueError(f"{description} holds {data} images but {what} trains {_describe(res, ch)} "
                         f"ones; train without {drop} to build a network for the data, or pass "
                         f"--resolution {res} --channels {ch} to resize and convert the images")


# ----------------------------------------------------------------------------- memory
_GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """What a U-Net needs, from its config alone (``estimate_memory``).

    params: weights, a rough lower estimate (per level 2 * num_res_blocks + 1 residual blocks of
    two 3x3 convolutions, 18 c^2 weights each); train_acts: values saved for backward per image,
    about 8 tensors of c * side^2 per block (a lower estimate: only what clearly cannot fit is
    refused); sample_bytes: bytes per image of a no_grad forward, float32, generous (the skip
    activations kept for the up path + 8 times the largest activation + the largest attention matrix).
    """

    params: float
    train_acts: float
    sample_bytes: int


def estimate_memory(unet: Any) -> MemoryEstimate:
    """The one memory estimator of a U-Net config (see ``MemoryEstimate``); level i has
    c = ch * ch_mult[i] channels at side R / 2^i."""
    levels = [(unet.ch * m, unet.resolution // 2**i) for i, m in enumerate(unet.ch_mult)]
    blocks = 2 * unet.num_res_blocks + 1
    params = train_acts = 0.0
    for c, side in levels:
        c_f, side_f = float(c), float(side)
        params += blocks * 18 * c_f * c_f
        train_acts += blocks * 8 * c_f * side_f * side_f
    acts = [c * side**2 for c, side in levels]
    attn = max([(r * r) ** 2 for r in unet.attn_resolutions] + [levels[-1][1] ** 4])
    sample_bytes = 4 * ((unet.num_res_blocks + 1) * sum(acts) + 8 * max(acts) + attn)
    return MemoryEstimate(params=params, train_acts=train_acts, sample_bytes=sample_bytes)


def _physical_memory() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def memory_limit(device: Any = None) -> int:
    """Bytes of memory of ``device``: the GPU's total memory, else this machine's physical memory."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return _physical_memory()


def check_fits(unet: Any, num_timesteps: int, batch_size: int, *, training: bool, device: Any = None) -> None:
    """Refuse sizes that cannot fit in memory, before anything is allocated: a ValueError (one line)
    naming the estimate and the limit. Training keeps weights, gradients, two Adam moments and the
    EMA (5 copies) and the activations for backward; sampling one copy and transient activations."""
    m = estimate_memory(unet)
    copies, act_factor = (5, 1.0) if training else (1, 0.25)
    need = 4 * (copies * m.params + act_factor * batch_size * m.train_acts) + 8 * 16 * float(num_timesteps)
    limit = memory_limit(device)
    if need > limit:
        what = "training" if training else "sampling"
        raise ValueError(f"{what} needs at least ~{need / _GIB:,.1f} GiB (U-Net ch={unet.ch}, ch_mult="
                         f"{list(unet.ch_mult)}, num_res_blocks={unet.num_res_blocks}, "
                         f"resolution={unet.resolution}, batch {batch_size}, T={num_timesteps}), more than "
                         f"the {limit / _GIB:,.1f} GiB of the "
                         "device; lower these sizes")


def auto_batch_size(unet: Any, n: int, device: Any) -> int:
    """The most samples per network call, up to ``n``, whose activations fit a memory bound.

    Bigger batches are faster per image on CPUs and GPUs alike (measured: docs/training.md). The
    bound is half the free GPU memory on CUDA, else a quarter of the RAM (at most 8 GiB); an image
    needs ``estimate_memory(unet).sample_bytes``.
    """
    import torch

    if device.type == "cuda":
        bound = torch.cuda.mem_get_info(device)[0] // 2
    else:
        bound = min(8 << 30, _physical_memory() // 4)
    return max(1, min(n, bound // estimate_memory(unet).sample_bytes))
