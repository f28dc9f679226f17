"""`ddpm convert`: weights in and out (diffusers folders, the authors' TF checkpoints)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert weights between diffusers, the authors' TF checkpoints and ddpmkit's model folder",
        description="Convert weights. Exactly one of --from-diffusers, --to-diffusers, --from-tf.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-diffusers", metavar="DIR", help="a diffusers model folder (UNet2DModel)")
    src.add_argument("--to-diffusers", metavar="MODEL", help="our model folder or a training run directory")
    src.add_argument("--from-tf", metavar="PREFIX", help="the authors' TF checkpoint prefix")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=True,
                     help="TF: take the ExponentialMovingAverage shadow weights (default)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="TF: take the raw weights")
    p.add_argument("--resolution", type=int, default=None,
                   help="TF: image size, when it cannot be read off the weights (default: inferred)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.from_diffusers:
        from ddpmkit.convert import convert_from_diffusers

        convert_from_diffusers(args.from_diffusers, args.out)
    elif args.to_diffusers:
        from ddpmkit.convert import convert_to_diffusers

        convert_to_diffusers(args.to_diffusers, args.out)
    else:
        from ddpmkit.convert import convert_from_tf

        convert_from_tf(args.from_tf, args.out, ema=args.ema, resolution=args.resolution)
    print(f"wrote {args.out}")
    return 0
