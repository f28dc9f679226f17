"""Training-free samplers and variances on a trained digits model: FD by model calls, bits/dim by K.

    python benchmarks/samplers_digits.py RUN --out DIR [--n 1000] [--calls 10 20 50 100 1000]
        [--bpd-k 10 25 100 1000] [--gamma-samples 200] [--bootstrap 200] [--seed 0]

RUN is a `ddpm train` digits run (or any digits model folder). For each sampler and number of
model calls it draws n digits (sample i from its own noise stream, as `ddpm sample --seed` does),
times the draw, and scores it with the shipped digits classifier (`ddpm eval digits`): the Frechet
distance to the train split with a 95% bootstrap interval over the samples. Then bits/dim of the
test split through the K-step bound for sigma^2 = beta, beta-tilde and Analytic-DPM's variance
(respaced chains share their noise draws). Each result is a JSON file in DIR, so a rerun (or a cut
run) does only what is missing; DIR/REPORT.md, DIR/fd_by_calls.png and DIR/bpd_by_k.png are
written from whatever is there. Gamma_t is estimated once from the train split (DIR/gamma.npz).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ddpmkit.analytic import GammaEstimate, analytic_chain, estimate_gamma
from ddpmkit.charts import plot_lines
from ddpmkit.data import open_source
from ddpmkit.evaluate.digits_metric import digits_fd
from ddpmkit.models import load_model
from ddpmkit.respace import parse_timesteps, respace_diffusion
from ddpmkit.sampling import sample
from ddpmkit.seeds import sample_generators

# (name, sampler, timesteps spec for S calls, the largest S it takes)
SAMPLERS = [
    ("ancestral (respaced DDPM)", "ddpm", lambda s: s, 1000),
    ("DDIM uniform", "ddim", lambda s: s, 1000),
    ("DDIM quad", "ddim", lambda s: f"quad{s}", 800),
    ("Analytic-DDPM", "analytic-ddpm", lambda s: s, 1000),
    ("Analytic-DDIM", "analytic-ddim", lambda s: s, 1000),
    ("DPM-Solver++(2M)", "dpm-solver++", lambda s: s, 999),
]
VARIANCES = ("fixedlarge", "fixedsmall", "analytic")


def _json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _gamma(out: Path, net, diffusion, num_samples: int, seed: int) -> GammaEstimate:
    path = out / "gamma.npz"
    if path.exists():
        z = np.load(path)
        return GammaEstimate(mean=z["mean"], stderr=z["stderr"], num_samples=int(z["num_samples"]))
    train = open_source("digits", resolution=8, channels=1, split="train")
    t0 = time.perf_counter()
    est = estimate_gamma(net, diffusion.alphas_cumprod, iter([train.get_batch(list(range(num_samples)))]),
                         num_samples=num_samples, generator=torch.Generator().manual_seed(seed))
    np.savez(path, mean=est.mean, stderr=est.stderr, num_samples=num_samples,
             seconds=time.perf_counter() - t0)
    return est


def _fd_runs(out: Path, net, diffusion, gamma, args) -> None:
    for name, sampler, spec, largest in SAMPLERS:
        for calls in args.calls:
            path = out / f"fd_{sampler}_{'quad' if 'quad' in name else 'u'}_{calls}.json"
            if calls > largest or path.exists():
                continue
            t0 = time.perf_counter()
            with torch.inference_mode():
                x = sample(net, diffusion, (args.n, 1, 8, 8), sampler=sampler, timesteps=spec(calls),
                           gamma=gamma, generator=sample_generators(args.seed, range(args.n)))
            seconds = time.perf_counter() - t0
            r = digits_fd(x, bootstrap=args.bootstrap, seed=args.seed)
            _json(path, {"name": name, "sampler": sampler, "calls": calls, "n": args.n, "seconds": seconds,
                         "fd": r["fd"], "fd_interval": r["fd_interval"], "score": r["score"],
                         "real_fd": r["real"]["fd"]})
            print(f"{name:28s} {calls:5d} calls  FD {r['fd']:7.2f} [{r['fd_interval'][0]:.2f}, "
                  f"{r['fd_interval'][1]:.2f}]  {seconds:7.1f} s", flush=True)


def _bpd_runs(out: Path, net, loaded, gamma, args) -> None:
    test = open_source("digits", resolution=8, channels=1, split="test")
    x0 = test.get_batch(list(range(len(test))))
    base = loaded.diffusion
    for k in args.bpd_k:
        for var in VARIANCES:
            path = out / f"bpd_{var}_{k}.json"
            if path.exists():
                continue
            kept = parse_timesteps(base.num_timesteps, k)
            if var == "analytic":
                chain = analytic_chain(base.build(), kept, gamma)
            else:
                chain = respace_diffusion(dataclasses.replace(base, var_type=var).build(), kept)
            t0 = time.perf_counter()
            with torch.inference_mode():
                res = chain.calc_bpd_loop(net, x0, t_chunk=min(k, 25),
                                          generator=torch.Generator().manual_seed(args.seed))
            tot = res["total_bpd"].double()
            _json(path, {"variance": var, "K": k, "n": int(tot.numel()), "bpd": tot.mean().item(),
                         "stderr": (tot.std() / tot.numel() ** 0.5).item(),
                         "seconds": time.perf_counter() - t0})
            print(f"bits/dim K={k:5d} {var:10s} {tot.mean().item():.4f}", flush=True)


def _series(records: list[dict], name: str, x: str, y: str) -> dict[str, tuple[list, list]]:
    """One line per ``records[name]``: (xs, ys) in increasing x."""
    series: dict[str, tuple[list, list]] = {}
    for r in sorted(records, key=lambda r: r[x]):
        xs, ys = series.setdefault(r[name], ([], []))
        xs.append(r[x])
        ys.append(r[y])
    return series


def _report(out: Path, args) -> None:
    fds = [json.loads(p.read_text()) for p in sorted(out.glob("fd_*.json"))]
    bpds = [json.loads(p.read_text()) for p in sorted(out.glob("bpd_*.json"))]
    series = _series(fds, "name", "calls", "fd")
    if series:
        plot_lines(out / "fd_by_calls.png", series, title=f"digits FD by model calls (n = {args.n})",
                   xlabel="model calls", ylabel="FD (digits classifier)", logx=True, logy=True)
    bseries = _series(bpds, "variance", "K", "bpd")
    if bseries:
        plot_lines(out / "bpd_by_k.png", bseries, title="test bits/dim through the K-step bound",
                   xlabel="K (steps of the bound)", ylabel="bits/dim (log scale)", logx=True, logy=True)
    lines = ["| sampler | calls | FD | 95% interval | seconds |", "|---|---|---|---|---|"]
    for r in sorted(fds, key=lambda r: (r["name"], r["calls"])):
        lines.append(f"| {r['name']} | {r['calls']} | {r['fd']:.2f} | {r['fd_interval'][0]:.2f}–"
                     f"{r['fd_interval'][1]:.2f} | {r['seconds']:.1f} |")
    lines += ["", "| K | variance | bits/dim | stderr |", "|---|---|---|---|"]
    for r in sorted(bpds, key=lambda r: (r["K"], r["variance"])):
        lines.append(f"| {r['K']} | {r['variance']} | {r['bpd']:.4f} | {r['stderr']:.4f} |")
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--calls", type=int, nargs="+", default=[10, 20, 50, 100, 1000])
    p.add_argument("--bpd-k", type=int, nargs="+", default=[10, 25, 100, 1000])
    p.add_argument("--gamma-samples", type=int, default=200)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["fd", "bpd"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.run)
    net = loaded.unet.eval()
    diffusion = loaded.diffusion.build()
    gamma = _gamma(out, net, diffusion, args.gamma_samples, args.seed)
    if "fd" not in args.skip:
        _fd_runs(out, net, diffusion, gamma, args)
    if "bpd" not in args.skip:
        _bpd_runs(out, net, loaded, gamma, args)
    _report(out, args)
    print(f"wrote {out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
