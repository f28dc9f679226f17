"""`ddpm sample`: draw samples from a trained model into PNG files, a grid and an FID-ready npz.

The folder's layout, resuming and sharding are ``ddpmkit.sample_folder``'s; this module parses the
arguments and reports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpmkit.cli.args import add_gamma_arguments, add_speed_arguments
from ddpmkit.sampling import SamplerType


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="draw samples (Algorithm 2, respaced DDPM, DDIM, Analytic-DPM, DPM-Solver++) into PNGs, "
        "a grid and an npz",
        description="Draw samples from MODEL (a training run directory, our model folder, or a "
        "diffusers folder). Default: Algorithm 2 with all T steps, the model's variance and x0 clipping.",
    )
    p.add_argument("model", metavar="MODEL", help="run directory, model folder, or diffusers folder")
    p.add_argument("--n", type=int, required=True, help="number of samples (indices START .. START+N-1)")
    p.add_argument("--output-dir", default=None, metavar="DIR", help="where the PNGs and the npz go "
                   "(default for a training run: RUN/samples/<sampler>-<steps>[-eta<E>][-seed<N>][-raw], "
                   "where `ddpm report RUN` finds their evaluations)")
    p.add_argument("--sampler", default=SamplerType.DDPM.value,
                   help=f"one of {', '.join(m.value for m in SamplerType)} (default ddpm: Algorithm 2, "
                   "or respaced on fewer steps; analytic-*: Analytic-DPM's variance; dpm-solver++: "
                   "20 logSNR-uniform steps by default)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps S <= T (default: all T)")
    p.add_argument("--timesteps", default=None, metavar="SPEC",
                   help="instead of --steps: 'quad20' (DDIM's quadratic), 'linspace20', 'logsnr20', "
                   "improved-diffusion's 'ddim50' or '10,15,20', or 'list:0,250,999'")
    p.add_argument("--eta", type=float, default=None, help="DDIM's eta (default 0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (sample i uses the stream (seed, i))")
    p.add_argument("--batch-size", type=int, default=None, help="samples per network call (default: "
                   "all N at once, within a memory bound; see training.fit.auto_batch_size)")
    p.add_argument("--start-index", type=int, default=0, help="global index of the first sample")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="a run directory's raw weights instead of the EMA ones")
    p.add_argument("--no-clip", dest="clip", action="store_false", help="do not clip predicted x0 to [-1, 1]")
    add_gamma_arguments(p)
    add_speed_arguments(p)
    p.set_defaults(func=run)


def _redraw(path: Path) -> None:
    print(f"ddpm sample: {path} is unreadable or of the wrong size; drawing it again", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ddpmkit.respace import timesteps_from_text
    from ddpmkit.sample_folder import ema_warning, sample_folder

    warning = ema_warning(args.model) if args.ema else None
    if warning is not None:
        print(f"ddpm sample: warning: {warning}", file=sys.stderr)
    res = sample_folder(
        args.model, args.output_dir, n=args.n, sampler=args.sampler, steps=args.steps,
        timesteps=None if args.timesteps is None else timesteps_from_text(args.timesteps), eta=args.eta,
        seed=args.seed, batch_size=args.batch_size, start_index=args.start_index, ema=args.ema,
        clip_denoised=args.clip, device=args.device, compile=args.compile, bf16=args.bf16,
        cuda_graphs=args.cuda_graphs, step_progress=sys.stderr.isatty(),  # a per-step bar on terminals only
        on_redraw=_redraw, gamma_data=args.gamma_data, gamma_samples=args.gamma_samples,
    )
    rate = res.sampled / res.seconds if res.sampled and res.seconds > 0 else 0.0
    print(f"sampled {res.sampled} images in {res.seconds:.1f} s on {res.device}, batch {res.batch_size}; "
          f"skipped {res.skipped} existing\n{rate:.2f} images/s")
    print(f"wrote {res.npz} and {res.grid}")
    return 0
