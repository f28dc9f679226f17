"""`ddpm reproduce digits`: the paper's Table 1, 2, 4 and Fig. 5, 6 experiments on the 8x8 digits."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reproduce", help="the paper's experiments in miniature (Tables 1, 2, 4; Figs. 5, 6) on the digits",
        description="Train every Table 2 variant (and the learned-range hybrid) with one recipe on the "
        "digits' train split, then measure sample quality, test bits/dim (full bound), stability, "
        "rate-distortion and memorization on the held-out digits; writes REPORT.md, report.json and PNGs.")
    sub = p.add_subparsers(dest="reproduce_what", metavar="WHAT", required=True)
    d = sub.add_parser("digits", help="scikit-learn's 8x8 digits (run times measured: README, "
                       "'What the paper found')")
    d.add_argument("--output-dir", default="reproduce-digits", metavar="DIR",
                   help="where the runs, stage results, figures and report go (default ./reproduce-digits)")
    d.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train every variant with seeds 0..N-1; N >= 2 reports mean ± spread (default 1)")
    d.add_argument("--quick", action="store_true", help="a smoke run: the same report from tiny sizes")
    d.add_argument("--resume", action="store_true", help="skip the finished stages of an earlier run in DIR")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ddpmkit.reproduce import reproduce_digits

    rep = reproduce_digits(args.output_dir, seeds=args.seeds, sizes="quick" if args.quick else "default",
                           resume=args.resume)
    b = rep["budget"]
    print(f"wrote {args.output_dir}/REPORT.md and report.json ({b['wall_seconds']:.0f} s wall, "
          f"{b['cpu_seconds']:.0f} s CPU over the stages)")
    return 0
