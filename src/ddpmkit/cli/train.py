"""`ddpm train`: train a DDPM from a preset, a config file and overrides; resumable; torchrun-ready.

With no arguments it trains the ``digits`` preset on scikit-learn's 8x8 digits into runs/digits
and ends by writing a sample grid. ``--data FOLDER|NPZ`` without a preset builds a network for the
data's own size and channels and the device (``training.fit.config_for_data``) into runs/NAME; a
preset or config whose image size differs from the data's is refused unless ``--resolution`` /
``--channels`` ask for the images to be resized/converted; so is a run without data (the digits,
8x8 grayscale) whose network is another size, e.g. ``--preset cifar10`` alone
(``check_default_data``). Settings resolve in this order: the preset (or ``--config`` FILE, or,
when resuming without either, the checkpoint's config), then ``--set KEY=VALUE``, then the
explicit flags. Exit codes: 0 done,
2 a user error, 3 too many non-finite steps, 128+N stopped by signal N (after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

from ddpmkit.config import LrSchedule, Precision, Tracker
from ddpmkit.data.sources import OnBadImage
from ddpmkit.training.fit import NetSize

# explicit flag -> config key
_FLAGS = {
    "data": "data", "steps": "steps", "seed": "seed", "batch_size": "batch_size", "lr": "lr",
    "checkpoint_every": "checkpoint_every", "keep_last": "keep_last", "max_nonfinite": "max_nonfinite",
    "precision": "precision", "sample_every": "sample_every", "num_samples": "num_samples",
    "log_every": "log_every", "num_workers": "num_workers", "num_threads": "num_threads",
    "on_bad_image": "on_bad_image", "grad_accum": "grad_accum", "logger": "logger",
    "lr_schedule": "lr_schedule", "lr_min": "lr_min", "ema_warmup": "ema_warmup",
    "ema_inv_gamma": "ema_inv_gamma", "ema_power": "ema_power",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    from ddpmkit.config import TRAIN_PRESETS

    p = subparsers.add_parser(
        "train",
        help="train a DDPM (default: the digits preset, a few minutes on a CPU)",
        description="Train a DDPM. Presets follow the paper's recipe (digits: a short CPU recipe); every "
        "setting can be overridden with --set KEY=VALUE (e.g. --set lr=1e-4 --set unet.ch=64 "
        "--set diffusion.num_timesteps=500). Multi-GPU: torchrun --nproc-per-node=N -m ddpmkit.cli train ...",
    )
    p.add_argument("--preset", default=None, metavar="NAME",
                   help=f"named recipe, any case: {', '.join(sorted(TRAIN_PRESETS))} (default: digits)")
    p.add_argument("--config", metavar="FILE", help="JSON config (e.g. a run's config.json); keys not in it "
                   "come from its 'preset'")
    p.add_argument("--data", metavar="SRC", help="digits, cifar10, an image folder, a CIFAR-10 archive or "
                   "folder, or an .npz (uint8 NHWC)")
    p.add_argument("--resolution", type=int, metavar="N", help="center-crop and resize every image to NxN "
                   "(without a preset: and build the network for N); default: the data's own size")
    p.add_argument("--channels", type=int, choices=(1, 3), help="convert the images to 1 (gray) or 3 "
                   "(RGB) channels; default: the data's own")
    p.add_argument("--net", choices=[m.value for m in NetSize],
                   help="without a preset: 'paper', the paper's U-Net family and recipe (32 px: CIFAR-10's, "
                   "800k steps; the default from 32 px on a GPU), or 'small', a CPU recipe sized to the "
                   "images (the default on a CPU and below 32 px)")
    p.add_argument("--output-dir", "-o", metavar="RUN", help="run directory (default: runs/PRESET, or "
                   "runs/NAME for --data NAME without a preset)")
    p.add_argument("--resume", metavar="auto|CKPT", help="'auto': continue from the newest complete "
                   "checkpoint in RUN (start fresh if none); or a checkpoint folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable); see --print-config for the keys")
    _add_recipe_flags(p)
    _add_bookkeeping_flags(p)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def _add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """The optimisation recipe's flags (each sets one config key)."""
    p.add_argument("--steps", type=int, help="total optimiser steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, help="global batch (split over ranks)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--grad-accum", type=int, metavar="N", help="split each batch into N micro-batches whose "
                   "gradients are accumulated (same global batch and update, less memory)")
    p.add_argument("--lr-schedule", choices=[m.value for m in LrSchedule],
                   help="lr after the warm-up: constant (the paper's), or linear / cosine decay to --lr-min "
                   "at the last step")
    p.add_argument("--lr-min", type=float, help="the lr that linear / cosine decay ends at (default 0)")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="EMA decay 1 - (1 + step / inv_gamma)^-power capped at the EMA decay (diffusers' "
                   "warm-up); default on for --data without a preset, off for the presets (the paper's "
                   "constant decay; the digits preset's too, whose weights stay as they were)")
    p.add_argument("--ema-inv-gamma", type=float, metavar="X", help="EMA warm-up inv_gamma (default 1)")
    p.add_argument("--ema-power", type=float, metavar="X", help="EMA warm-up power (default 2/3)")
    p.add_argument("--logger", choices=[m.value for m in Tracker],
                   help="also log metrics, sample grids and the config to TensorBoard or Weights & Biases "
                   "(default none)")


def _add_bookkeeping_flags(p: argparse.ArgumentParser) -> None:
    """Checkpoints, precision, sample grids, logging and the data loader (each sets one config key)."""
    p.add_argument("--checkpoint-every", type=int, metavar="N")
    p.add_argument("--keep-last", type=int, metavar="K", help="checkpoints kept")
    p.add_argument("--max-nonfinite", type=int, metavar="N",
                   help="stop after N non-finite steps in a row")
    p.add_argument("--precision", choices=[m.value for m in Precision])
    p.add_argument("--sample-every", type=int, metavar="N", help="EMA sample grid every N steps")
    p.add_argument("--num-samples", type=int, metavar="N", help="images in each sample grid")
    p.add_argument("--log-every", type=int, metavar="N", help="metrics.jsonl line every N steps")
    p.add_argument("--num-workers", type=int, metavar="N", help="data loader worker processes")
    p.add_argument("--num-threads", type=int, metavar="N", help="torch CPU threads (0: torch's default)")
    p.add_argument("--on-bad-image", choices=[m.value for m in OnBadImage])


def resolve_config(args: argparse.Namespace):
    """The run's TrainConfig and directory from the parsed arguments."""
    from ddpmkit.config import (
        TrainConfig,
        apply_overrides,
        load_config,
        parse_overrides,
        preset_name,
        train_preset,
    )

    if args.preset is not None and args.config is not None:
        raise ValueError("give --preset or --config, not both")
    preset = None if args.preset is None else preset_name(args.preset)
    base = load_config(args.config) if args.config is not None else None
    custom = base is None and preset is None and _is_custom_data(args.data)
    if base is None and preset is None and args.data is not None and not custom:
        preset = "cifar10" if args.data.lower().startswith("cifar10") else "digits"
    default_name = base.preset if base is not None else (preset or "digits")
    if custom:
        default_name = Path(args.data).name.removesuffix(".npz") or "custom"
    run_dir = Path(args.output_dir) if args.output_dir else Path("runs") / default_name
    if base is None and preset is None and args.resume:
        from ddpmkit.train import load_resumable, newest_resumable

        found = newest_resumable(run_dir) if args.resume == "auto" else load_resumable(Path(args.resume))
        if found is not None:
            base, custom = TrainConfig.from_dict(found.state["config"]), False
    if custom:
        base = _config_for(args)
    elif args.net is not None:
        raise ValueError("--net applies only to --data without --preset or --config")
    if base is None:
        base = train_preset(preset or "digits")
    overrides: dict[str, object] = dict(parse_overrides(args.overrides))
    for flag, key in _FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    for flag, keys in (("resolution", ("unet.resolution",)),
                       ("channels", ("unet.in_channels", "unet.out_channels"))):
        if getattr(args, flag) is not None:
            overrides.update({k: getattr(args, flag) for k in keys})
    config = apply_overrides(base, overrides)
    _check_data(config, args, what="the network built for it" if custom else _origin(args, base))
    return config, run_dir


@functools.lru_cache(maxsize=4)
def _source_shape(data: str):
    """``data.source_shape``, once per source (a folder's headers, an npz's array) per process."""
    from ddpmkit.data import source_shape

    return source_shape(data)


def _is_custom_data(data: str | None) -> bool:
    """A folder or npz (not digits / CIFAR-10, which have their presets)."""
    from ddpmkit.data import SourceKind

    return data is not None and _source_shape(data).kind in (SourceKind.FOLDER, SourceKind.NPZ)


def _config_for(args: argparse.Namespace):
    """The network and recipe for ``--data`` without a preset: the data's own size unless overridden."""
    from ddpmkit.distributed import resolve_device
    from ddpmkit.training.fit import config_for_data, native_resolution

    shape = _source_shape(args.data)
    res = (args.resolution if args.resolution is not None
           else native_resolution(shape.description, shape.sizes))
    channels = args.channels if args.channels is not None else shape.channels
    return config_for_data(args.data, res, channels, args.net, device=resolve_device(args.device))


def _origin(args: argparse.Namespace, base) -> str:
    if args.config is not None:
        return f"the config {args.config}"
    return f"the {base.preset} preset" if base.preset != "custom" else "the checkpoint's config"


def _check_data(config, args: argparse.Namespace, *, what: str) -> None:
    """The data must have the network's size and channels, unless --resolution/--channels resize it."""
    from ddpmkit.training.fit import check_data_fits

    if config.data is None:
        return
    shape = _source_shape(config.data)
    sizes, channels = shape.sizes, shape.channels
    if args.resolution is not None:
        sizes = ((args.resolution, args.resolution),)
    if args.channels is not None:
        channels = args.channels
    drop = "--config" if args.config is not None else "--preset"
    check_data_fits(config, shape.description, sizes, channels, what=what, drop=drop)


def check_default_data(config, args: argparse.Namespace, *, what: str) -> None:
    """Without data (config.data None) a run trains on the digits, 8x8 grayscale: a network of
    another size or channel count is refused unless --resolution / --channels ask for the resize."""
    if config.data is not None:
        return
    res, ch = config.unet.resolution, config.unet.in_channels
    if (res == 8 or args.resolution is not None) and (ch == 1 or args.channels is not None):
        return
    kind = f"{res}x{res} {'RGB' if ch == 3 else 'grayscale' if ch == 1 else f'{ch}-channel'}"
    data = "--data cifar10 (the CIFAR-10 training set) or --data FOLDER" if (res, ch) == (32, 3) \
        else "--data FOLDER (or an .npz) of such images"
    raise ValueError(f"{what} trains {kind} images but no --data was given, and the default data, the "
                     f"digits, are 8x8 grayscale; pass {data}, or --resolution {res} --channels {ch} "
                     "to train on the digits resized and converted")


def start_line(config) -> str:
    """One line: the image size the run trains on, the network's size and the steps."""
    import torch

    from ddpmkit.nn import UNet

    u = config.unet
    with torch.device("meta"):
        n_params = sum(p.numel() for p in UNet(config=u).parameters())
    shape = _source_shape(config.data)
    (w, h), *more = shape.sizes
    stored = "mixed sizes" if more else f"{w}x{h}"
    fitted = "as stored" if (not more and (w, h) == (u.resolution, u.resolution)
                             and shape.channels == u.in_channels) else f"resized from {stored}"
    return (f"training on {shape.description}: {u.resolution}x{u.resolution}, {u.in_channels} channel"
            f"{'s' if u.in_channels > 1 else ''} ({fitted}); U-Net {n_params / 1e6:.2f}M parameters "
            f"(ch {u.ch}, ch_mult {list(u.ch_mult)}); {config.steps:,} steps of batch {config.batch_size}")


def run(args: argparse.Namespace) -> int:
    config, run_dir = resolve_config(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    check_default_data(config, args, what=_origin(args, config))
    from ddpmkit.logs import logger
    from ddpmkit.train import train

    if args.data is not None:
        logger("ddpmkit.train").info(start_line(config))
    result = train(config, run_dir, resume=args.resume, device=args.device, progress=not args.no_progress)
    if result.exit_code == 0 and os.environ.get("RANK", "0") in ("", "0"):  # once under torchrun
        done = f"model (EMA weights): {run_dir / 'model'}   raw weights: {run_dir / 'model_raw'}"
        if getattr(args, "log_format", "terminal") == "plain":  # stamped like every line (-q excludes plain)
            logger("ddpmkit.train").info(done)
        else:
            print(done)  # the command's result: -q keeps it
    return result.exit_code
