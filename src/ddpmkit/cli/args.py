"""Argument helpers shared by several commands (no command imports another command)."""

from __future__ import annotations

import argparse


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    """--device and the speed options of `ddpm sample` and `ddpm figure`."""
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--bf16", action="store_true", help="run the network under bfloat16 autocast (GPU)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the network call as a CUDA graph")


def add_gamma_arguments(p: argparse.ArgumentParser) -> None:
    """Analytic-DPM's Gamma_t (kept beside the model, see ``ddpmkit.gamma_file``)."""
    p.add_argument("--gamma-data", default=None, metavar="SRC",
                   help="the analytic variance's Gamma_t: the model's training data (default: a run's own)")
    p.add_argument("--gamma-samples", type=int, default=200, metavar="M",
                   help="Monte-Carlo images for Gamma_t (default 200; its standard error is stored)")
