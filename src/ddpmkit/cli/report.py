"""`ddpm report RUN`: a markdown + JSON report card of a training run, next to the paper's figures."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="a report card of a training run (markdown + JSON), next to the paper's numbers",
        description="Parameter count, steps, images seen, throughput, bits/dim, FID/IS and the digits "
        "metric (from the `ddpm eval` results found in RUN), each next to the paper's figure, with the "
        "newest sample grid and the loss curve.")
    p.add_argument("run", metavar="RUN", help="a training run directory (written by `ddpm train`)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/report)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ddpmkit.evaluate.report import build_report

    report = build_report(args.run, args.out)
    out = report["files"].get("loss_curve")
    folder = args.out or f"{args.run}/report"
    print(f"wrote {folder}/report.md and report.json" + (f" (+ {out})" if out else ""))
    return 0
