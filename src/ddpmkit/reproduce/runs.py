"""One model's stages: train a variant (and judge its stability), evaluate it, draw the L_simple figures.

Evaluation is on digits the models never saw: ancestral samples (Algorithm 2, all T steps) scored
by the shipped digits metric next to held-out real digits, and test bits/dim through the full
T-step bound, eq. (5) (``evaluate.bpd.evaluate_bpd``, the code of ``ddpm eval bpd``).
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpmkit.config import TrainConfig
from ddpmkit.fileio import atomic_write_bytes
from ddpmkit.reproduce.plan import ReproduceSizes

__all__ = ["eval_stage", "figures_stage", "file_sha256", "model_inputs", "stability", "train_stage"]


def stability(losses: dict[int, float], steps_run: int, exit_code: int) -> dict[str, Any]:
    """Non-finite updates (skipped by the trainer) and divergence. ``diverged``: the run stopped on
    non-finite losses, or the mean loss of its last 10% of steps is not below that of its first 10%."""
    vals = [losses[k] for k in sorted(losses)]
    w = max(1, len(vals) // 10)
    first = float(np.mean(vals[:w])) if vals else float("nan")
    last = float(np.mean(vals[-w:])) if vals else float("nan")
    nonfinite = int(steps_run - len(vals))
    diverged = bool(exit_code != 0 or not math.isfinite(last) or not last < first)
    return {"nonfinite_steps": nonfinite, "diverged": diverged, "exit_code": int(exit_code),
            "loss_first_10pct": first, "loss_last_10pct": last, "steps_run": int(steps_run)}


def train_stage(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Train (or resume) one variant into ``run_dir``; its stability and speed."""
    from ddpmkit.checkpoint import latest_checkpoint
    from ddpmkit.train import train

    last = latest_checkpoint(run_dir) if run_dir.exists() else None
    start = int(last.name.split("-")[1]) if last is not None else 0  # step-000000500
    t0 = time.perf_counter()
    res = train(cfg, run_dir, resume="auto", progress=False, deviations=False)  # listed once by the job
    seconds = time.perf_counter() - t0
    if res.exit_code >= 128:  # stopped by a signal: checkpointed, not finished; --resume continues it
        raise KeyboardInterrupt
    out = stability(res.losses, res.step - start, res.exit_code)
    out.update(step=int(res.step), seconds_per_step=seconds / max(1, res.step - start),
               config=cfg.to_dict(), run_dir=run_dir.name)
    return out


def model_inputs(run_dir: Path) -> dict[str, Any]:
    """What of a trained model changes a stage that reads it: its EMA weights and its diffusion."""
    from ddpmkit.models import load_model
    from ddpmkit.nn.folder import weights_sha256

    loaded = load_model(run_dir)
    return {"model_sha256": weights_sha256(loaded.unet), "diffusion": loaded.diffusion.to_dict()}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (a samples npz a later stage reads)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load(run_dir: Path) -> tuple[Any, Any]:
    from ddpmkit.models import load_model

    loaded = load_model(run_dir)
    return loaded.unet.eval(), loaded.diffusion.build()


def _test_set() -> Any:
    from ddpmkit.data import open_source

    return open_source("digits", resolution=8, channels=1, split="test")


def eval_stage(run_dir: Path, sizes: ReproduceSizes, seed: int, out: Path, name: str) -> dict[str, Any]:
    """Samples (OUT/samples/NAME.npz and a grid), their digits metric, and test bits/dim of one model."""
    from ddpmkit.evaluate.bpd import evaluate_bpd
    from ddpmkit.evaluate.digits_metric import digits_fd
    from ddpmkit.images import save_image_grid, to_uint8_nhwc
    from ddpmkit.sampling import sample
    from ddpmkit.seeds import sample_generators

    unet, diffusion = _load(run_dir)
    with torch.inference_mode():  # one noise stream per sample, as `ddpm sample --seed` draws them
        x = sample(unet, diffusion, (sizes.num_samples, 1, 8, 8),
                   generator=sample_generators(seed, range(sizes.num_samples)))  # (N, 1, 8, 8)
        finite = bool(torch.isfinite(x).all())
        u8 = to_uint8_nhwc(x.nan_to_num(0.0).clamp(-1, 1))  # (N, 8, 8, 1)
        (out / "samples").mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, arr_0=u8)
        atomic_write_bytes(out / "samples" / f"{name}.npz", buf.getvalue())
        grid = save_image_grid(u8[:64], out / "figures" / f"samples_{name}.png", nrow=8, scale=6,
                               min_width=512)
        metric = digits_fd(u8)
        bpd = evaluate_bpd(unet, diffusion, _test_set(), n=sizes.bpd_examples, batch_size=sizes.bpd_batch,
                           t_chunk=sizes.t_chunk, seed=seed,
                           partial_path=out / "stages" / f".{name}.bpd.partial.jsonl",
                           settings={"model": run_dir.name, "split": "test"})
    bpd.pop("settings", None)
    return {"digits": metric, "bpd": bpd, "samples_finite": finite,
            "sample_grid": str(grid.relative_to(out)), "samples": f"samples/{name}.npz"}


def figures_stage(run_dir: Path, sizes: ReproduceSizes, seed: int, out: Path) -> dict[str, Any]:
    """Sec. 4.3 progressive lossy reconstructions and Fig. 6 progressive generation (L_simple)."""
    from ddpmkit.chains import reconstruct
    from ddpmkit.figures import (
        progressive_figure,
        progressive_labels,
        reconstruction_figure,
        reconstruction_labels,
    )
    from ddpmkit.images import save_image_grid

    unet, diffusion = _load(run_dir)
    T = diffusion.num_timesteps
    ts = sorted({max(0, round(T * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)})
    x0 = _test_set().get_batch(list(range(sizes.recon_examples)))  # (K, 1, 8, 8)
    with torch.inference_mode():
        grid, cols = reconstruction_figure(unet, diffusion, x0, ts, seed=seed)
        recon = save_image_grid(grid, out / "figures" / "reconstructions.png", nrow=cols, scale=8,
                                col_labels=reconstruction_labels(ts)[0])  # 0-based t, as ddpm figure
        rmse = {}
        for t in ts:
            _, rec = reconstruct(unet, diffusion, x0, t, generator=torch.Generator().manual_seed(seed))
            rmse[str(t)] = float(((rec.clamp(-1, 1) - x0) ** 2).mean().sqrt() * 127.5)
        grid, cols = progressive_figure(unet, diffusion, (sizes.progressive_examples, 1, 8, 8),
                                        num_snapshots=min(10, T), seed=seed)
        col_labels, row_labels = progressive_labels(T, min(10, T))
        prog = save_image_grid(grid, out / "figures" / "progressive_generation.png", nrow=cols, scale=8,
                               col_labels=col_labels, row_labels=row_labels)
    return {"reconstruction_ts": ts, "reconstruction_rmse": rmse,
            "reconstructions": str(recon.relative_to(out)), "progressive": str(prog.relative_to(out))}


