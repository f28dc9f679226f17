"""A/B of one U-Net step, ddpmkit against diffusers: the quick measurement behind benchmarks/NOTES.md.

Builds both systems as ``bench_unet.py`` does (the paper's CIFAR-10 U-Net, dropout 0.1 in training,
fused Adam), warms each up, then calls them interleaved (ddpmkit, diffusers, ddpmkit, ...) and
prints the median images/s of each and their ratio. With one thread the clock is the process CPU
time, which other processes' load barely disturbs; with more threads it is wall time.

    python benchmarks/ab_step.py --mode train --batch 16 --threads 1 --reps 7
    python benchmarks/ab_step.py --mode forward --batch 16 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_unet as bu  # noqa: E402
import torch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("train", "forward"), default="train")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each system first (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    opts = bu.Options(
        device=torch.device("cpu"), channels_last=False, bf16=False, compile=False, cuda_graphs=False,
        reps=args.reps, big_reps=args.reps, sample_reps=1,
    )
    fns = {}
    for name in ("ddpmkit", "diffusers"):
        torch.manual_seed(0)
        b = bu.Bench(name=name, model=bu.build_system(name))
        if args.mode == "train":
            bu.prepare_training(b, opts)
            fns[name] = bu.make_train_step(b, args.batch, opts)
        else:
            bu.prepare_sampling(b, opts)
            fns[name] = bu.make_forward(b, args.batch, opts)
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.mode} batch {args.batch}, {args.threads} thread(s), {args.reps} reps: "
        f"ddpmkit {args.batch / med['ddpmkit']:.2f} img/s, "
        f"diffusers {args.batch / med['diffusers']:.2f} img/s, "
        f"ratio {med['diffusers'] / med['ddpmkit']:.3f}x"
    )


if __name__ == "__main__":
    main()
