"""`ddpm figure KIND MODEL`: the paper's figures as PNG files.

  progressive      Fig. 6: x_t and the predicted x_0 along one reverse chain per sample
  interpolate      Fig. 8-9: latent interpolation of two data images through x_t, decoded from t
  reconstruct      x_0 -> x_t (q) -> x_0 (the reverse chain), for several t
  shared-xt        Fig. 7: several samples x_0 ~ p(x_0 | x_t) sharing one x_t, for several t
  rate-distortion  Fig. 5 + Table 4: rate and distortion along the reverse process (needs --data)

Timesteps (--t) are 0-based indices in [0, T-1] (index t is the paper's t + 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ddpmkit.cli.args import add_speed_arguments

KINDS = ("progressive", "interpolate", "reconstruct", "shared-xt", "rate-distortion")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "figure", help="draw the paper's figures (progressive, interpolate, reconstruct, shared-xt, "
        "rate-distortion)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    helps = {
        "progressive": "x_t and predicted x_0 along the chain (Fig. 6)",
        "interpolate": "interpolation of two data images through x_t (Fig. 8-9)",
        "reconstruct": "data images encoded to x_t and decoded back",
        "shared-xt": "samples that share one x_t, at several t (Fig. 7)",
        "rate-distortion": "rate and distortion against t (Fig. 5, Table 4)",
    }
    for kind in KINDS:
        k = kinds.add_parser(kind, help=helps[kind], description=helps[kind])
        k.add_argument("model", metavar="MODEL", help="run directory, model folder, or diffusers folder")
        k.add_argument("--out", default=None, metavar="FILE",
                       help=f"PNG to write (default figure_{kind}.png)")
        k.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
        k.add_argument("--no-ema", dest="ema", action="store_false", help="a run directory's raw weights")
        k.add_argument("--scale", type=int, default=None,
                       help="enlarge images this many times (default: until the figure is >= 512 px wide)")
        add_speed_arguments(k)
        if kind in ("interpolate", "reconstruct", "rate-distortion"):
            k.add_argument("--data", required=True, metavar="SRC",
                           help="data source: digits, cifar10[-test], an image folder or an npz")
            k.add_argument("--split", default=None,
                           help="data split: train, test or all (default: "
                           + ("test where the source has one, else train)" if kind == "rate-distortion"
                              else "train)"))
        if kind in ("interpolate", "reconstruct", "shared-xt"):
            k.add_argument("--t", type=_int_list, default=None,
                           help="comma-separated 0-based timesteps (default: a few across [0, T-1])")
        if kind == "progressive":
            k.add_argument("--n", type=int, default=4, help="number of chains (default 4)")
            k.add_argument("--snapshots", type=int, default=10, help="columns: timesteps shown (default 10)")
            k.add_argument("--show", default="both", help="both (default), x0 or xt")
        elif kind == "interpolate":
            k.add_argument("--n", type=int, default=2, help="number of image pairs (default 2)")
            k.add_argument("--lambdas", type=int, default=11, help="interpolation points (default 11)")
            k.add_argument("--encode", default="q", help="q (default: the paper's stochastic encoder) or "
                           "ddim (deterministic DDIM inversion, decoded by DDIM with eta 0)")
            k.add_argument("--timesteps", default=None, metavar="SPEC",
                           help="--encode ddim's timesteps below t: 'ddim50', '10,15,20' "
                           "(improved-diffusion) or 'list:0,10,...' (default: all)")
        elif kind == "reconstruct":
            k.add_argument("--n", type=int, default=4, help="number of images (default 4)")
        elif kind == "shared-xt":
            k.add_argument("--n", type=int, default=6, help="samples per x_t (default 6)")
        elif kind == "rate-distortion":
            k.add_argument("--n", type=int, default=16, help="number of data images (default 16)")
            k.add_argument("--json", default=None, metavar="FILE",
                           help="where to write the numbers (default: --out with .json)")
            k.add_argument("--t-chunk", type=int, default=None, help="timesteps per network call")
        k.set_defaults(func=run)
    p.set_defaults(func=_no_kind)


def _no_kind(args: argparse.Namespace) -> int:
    raise ValueError(f"expected a figure KIND, one of {list(KINDS)} (see ddpm figure --help)")


def _data(args: argparse.Namespace, count: int, resolution: int, channels: int) -> Any:
    """``count`` images of --data (B, C, H, W), drawn without replacement with --seed."""
    import torch

    from ddpmkit.data import open_source

    if args.split is None and args.kind == "rate-distortion":  # the paper's Table 4: the test set
        try:
            ds = open_source(args.data, resolution=resolution, channels=channels, split="test")
        except ValueError:  # a source without a test split (a folder, an npz)
            ds = open_source(args.data, resolution=resolution, channels=channels, split="train")
    else:
        ds = open_source(args.data, resolution=resolution, channels=channels, split=args.split or "train")
    if len(ds) < count:
        raise ValueError(f"--data {args.data}: {len(ds)} images, fewer than the {count} needed")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:count]
    args.data_description = ds.description
    return ds.get_batch(sorted(idx.tolist()))


def _timesteps(args: argparse.Namespace, T: int) -> list[int]:
    ts = args.t if args.t is not None else [round(T * f) - 1 for f in (0.25, 0.5, 0.75, 1.0)]
    bad = [t for t in ts if not 0 <= t < T]
    if not ts or bad:
        raise ValueError(f"--t must list 0-based timesteps in [0, {T - 1}], got {ts}")
    return ts


def _spec(text: str | None, encode: str) -> Any:
    from ddpmkit.respace import timesteps_from_text

    if text is not None and encode != "ddim":
        raise ValueError("--timesteps applies to --encode ddim only")
    return None if text is None else timesteps_from_text(text)


def run(args: argparse.Namespace) -> int:
    from ddpmkit import figures
    from ddpmkit.accel import prepare_model
    from ddpmkit.distributed import resolve_device
    from ddpmkit.fileio import check_output_path
    from ddpmkit.images import readable_scale, save_image_grid
    from ddpmkit.models import load_model

    if getattr(args, "n", 1) < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    device = resolve_device(args.device)
    out = check_output_path(args.out or f"figure_{args.kind}.png")  # before the model is loaded
    if getattr(args, "json", None):
        check_output_path(args.json)
    loaded = load_model(args.model, ema=args.ema)
    diffusion = loaded.diffusion.build()
    T = diffusion.num_timesteps
    C, R = loaded.unet.config.in_channels, loaded.unet.config.resolution
    model = prepare_model(loaded.unet, device=device, compile=args.compile, bf16=args.bf16,
                          cuda_graphs=args.cuda_graphs)
    if args.kind == "progressive":
        grid = figures.progressive_figure(model, diffusion, (args.n, C, R, R), num_snapshots=args.snapshots,
                                          seed=args.seed, device=device, show=args.show)
    elif args.kind == "interpolate":
        x = _data(args, 2 * args.n, R, C).to(device)
        grid = figures.interpolation_figure(model, diffusion, x[: args.n], x[args.n :], _timesteps(args, T),
                                            num_lambdas=args.lambdas, seed=args.seed, encoder=args.encode,
                                            timesteps=_spec(args.timesteps, args.encode))
    elif args.kind == "reconstruct":
        x = _data(args, args.n, R, C).to(device)
        grid = figures.reconstruction_figure(model, diffusion, x, _timesteps(args, T), seed=args.seed)
    elif args.kind == "shared-xt":
        grid = figures.shared_xt_figure(model, diffusion, (1, C, R, R), _timesteps(args, T),
                                        num_samples=args.n, seed=args.seed, device=device)
    elif args.kind == "rate-distortion":
        return _rate_distortion(args, model, diffusion, device, out, R, C)
    else:
        raise NotImplementedError(args.kind)
    images, cols = grid
    col_labels, row_labels, corner = _labels(args, T)
    # default: nearest-neighbour upscaling to >= 512 px wide, and tiles >= 64 px (the labels fit)
    scale = args.scale if args.scale is not None else max(readable_scale(cols * (R + 2) + 2), -(-64 // R))
    path = save_image_grid(images, out, nrow=cols, scale=scale, col_labels=col_labels,
                           row_labels=row_labels, corner=corner)
    print(f"wrote {path}")
    return 0


def _labels(args: argparse.Namespace, T: int) -> tuple[list[str], list[str], str]:
    """The figure's column labels, row labels and corner text (what the column labels give)."""
    from ddpmkit import figures

    if args.kind == "progressive":
        return (*figures.progressive_labels(T, args.snapshots, args.show), "")
    if args.kind == "interpolate":
        return (*figures.interpolation_labels(_timesteps(args, T), args.lambdas, args.n), "lambda")
    if args.kind == "reconstruct":
        return (*figures.reconstruction_labels(_timesteps(args, T)), "")
    if args.kind == "shared-xt":
        return (*figures.shared_xt_labels(_timesteps(args, T), args.n), "")
    raise NotImplementedError(args.kind)


def _rate_distortion(args: argparse.Namespace, model: Any, diffusion: Any, device: Any, out: Path,
                     R: int, C: int) -> int:
    from ddpmkit.evaluate.bpd import format_rate_distortion_table, rate_distortion
    from ddpmkit.figures import rate_distortion_figure
    from ddpmkit.fileio import atomic_write_json

    if args.t_chunk is not None and args.t_chunk < 1:
        raise ValueError(f"--t-chunk must be >= 1, got {args.t_chunk}")
    x = _data(args, args.n, R, C).to(device)
    rd = rate_distortion(model, diffusion, x, seed=args.seed, t_chunk=args.t_chunk, progress=True)
    rd["data"] = args.data_description
    path = rate_distortion_figure(rd, out)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    atomic_write_json(json_path, rd, indent=1, sort_keys=False)
    print(format_rate_distortion_table(rd))
    print(f"wrote {path} and {json_path}")
    return 0
