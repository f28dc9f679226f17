"""DDIM inversion on a trained model: encode held-out digits with ``ddim_invert``, decode with
eta = 0 DDIM, and report the round-trip error in pixel units of [-1, 1] (and in uint8 levels).

    python benchmarks/ddim_inversion.py MODEL [--n 120] [--timesteps ddim50 ddim100 ...]

MODEL: a run directory or model folder trained on the digits (8x8, 1 channel). The test digits are
the last DIGITS_NUM_TEST of scikit-learn's set (the split `ddpm reproduce digits` uses).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ddpmkit.chains import ddim_invert
from ddpmkit.data.sources import load_digits_uint8
from ddpmkit.models import load_model
from ddpmkit.respace import parse_timesteps
from ddpmkit.sampling import sample_ddim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--timesteps", nargs="+", default=["ddim20", "ddim50", "ddim100"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    net, diffusion = loaded.unet.eval(), loaded.diffusion.build()
    images, _ = load_digits_uint8("test")  # (DIGITS_NUM_TEST, 8, 8, 1) uint8
    x = torch.from_numpy(images[: args.n]).float()
    x0 = (x / 127.5 - 1).permute(0, 3, 1, 2).contiguous()  # (N, 1, 8, 8) in [-1, 1]
    rows = []
    for spec in args.timesteps:
        kept = parse_timesteps(diffusion.num_timesteps, spec)
        start = time.perf_counter()
        with torch.inference_mode():
            x_T = ddim_invert(net, diffusion, x0, kept)
            back = sample_ddim(net, diffusion, x0.shape, timesteps=kept, x_T=x_T, clip_denoised=True)
        err = (back - x0).abs().flatten(1)  # (N, 64)
        rows.append({"timesteps": spec, "steps": len(kept), "max_abs": err.max().item(),
                     "mean_abs": err.mean().item(), "p99_abs": err.quantile(0.99).item(),
                     "x_T_std": x_T.std().item(), "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"model": str(args.model), "n": x0.shape[0],
                      "diffusion": loaded.diffusion.to_dict(), "rows": rows}))


if __name__ == "__main__":
    main()
