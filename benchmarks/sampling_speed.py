"""Wall time of drawing N digits at S model calls, per sampler, side by side in one process.

    python benchmarks/sampling_speed.py RUN [--n 1000] [--calls 20] [--repeats 3] [--threads 1]

Each sampler draws the same N samples (one noise stream per sample, as `ddpm sample` does) in one
batch, `--repeats` times, after one untimed warm-up call; the range of the timed runs is printed.
The analytic samplers' Gamma_t comes from the model folder (`ddpm sample --sampler analytic-*`
writes it) or is estimated first, untimed.
"""

from __future__ import annotations

import argparse
import time

import torch

from ddpmkit.gamma_file import model_gamma, training_data_of
from ddpmkit.models import load_model, resolve_model_path
from ddpmkit.nn.folder import weights_sha256
from ddpmkit.sampling import SamplerType, sample
from ddpmkit.seeds import sample_generators


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("run")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (two thrash when the other core is busy)")
    p.add_argument("--gamma-samples", type=int, default=50, help="Gamma_t's Monte-Carlo images (timing only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.run)
    net, d = loaded.unet.eval(), loaded.diffusion.build()
    gamma = model_gamma(net, d, resolve_model_path(args.run)[1], weights_sha256=weights_sha256(net),
                        data=training_data_of(args.run) or "digits", num_samples=args.gamma_samples)
    cfg = net.config
    shape = (args.n, cfg.in_channels, cfg.resolution, cfg.resolution)
    print(f"{args.n} samples at {args.calls} model calls, {args.threads} threads, torch {torch.__version__}")
    for sampler in SamplerType:
        times = []
        for k in range(args.repeats + 1):
            t0 = time.perf_counter()
            with torch.inference_mode():
                sample(net, d, shape, sampler=sampler, steps=args.calls, gamma=gamma,
                       generator=sample_generators(0, range(args.n)))
            if k:  # the first call warms up
                times.append(time.perf_counter() - t0)
        print(f"  {sampler.value:14s} {min(times):6.2f}-{max(times):6.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
