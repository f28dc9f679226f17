"""`ddpm reproduce digits`: the paper's experiments, in miniature, on scikit-learn's 8x8 digits.

The layer above training and evaluation. One job trains every reverse-process variant of Table 2
(plus Nichol & Dhariwal's learned-range hybrid) with one shared recipe, then measures, on digits
the models never saw:
- sample quality: the shipped digits metric (Frechet distance, classifier score) of ancestral
  samples (Algorithm 2, all T steps), next to the real-subset floor (held-out real digits);
- test bits/dim through the full T-step bound, eq. (5) (``evaluate.bpd.evaluate_bpd``, the code of
  ``ddpm eval bpd``) on the first ``bpd_examples`` test digits;
- stability: non-finite (skipped) updates and divergence (see ``stability``);
- Table 4 / Fig. 5: rate and distortion by t for the L_simple model (from the same bound terms),
  progressive lossy reconstructions from x_t (Sec. 4.3); Fig. 6 progressive generation;
- App. D: samples beside their nearest training digits in pixel and classifier-feature space, with
  the fraction of near-copies next to the same fraction for held-out real digits.

The split is the package's fixed digits split (``ddpmkit.data.sources``): the first 1437 of the 1797
digits train, the last 360 are held out (``digits_split``).

Resumable: each stage writes ``OUT/stages/<name>.json`` atomically when it finishes; ``resume``
skips stages whose file exists with the same settings, and training resumes from its checkpoints.
REPORT.md and report.json are rebuilt from the stage files only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpmkit.config import TrainConfig, apply_overrides, train_preset
from ddpmkit.diffusion import LossType, MeanType, VarType
from ddpmkit.enums import unknown_choice
from ddpmkit.figures import ChartBackend
from ddpmkit.fileio import atomic_write_bytes, read_json_object

__all__ = ["SIZES", "VARIANTS", "ReproduceSizes", "Variant", "digits_split", "near_copy_fraction",
           "nearest_neighbours", "reproduce_digits", "variant_config"]

STAGE_FORMAT = "ddpmkit.reproduce_stage"


@dataclass(frozen=True, kw_only=True)
class ReproduceSizes:
    """How much of everything one run does. Every variant gets the same sizes (one recipe)."""

    name: str
    smoke: bool
    steps: int  # training steps per variant (the digits preset's batch 128, lr, EMA, warm-up)
    num_timesteps: int  # T: the paper's 1000 except in the tests' tiny size
    bpd_examples: int  # test digits through the full bound (the first N of the 360)
    bpd_batch: int
    t_chunk: int  # timesteps per network call in the bound
    num_samples: int  # ancestral samples per variant for the digits metric and the NN panel
    recon_examples: int = 4  # test digits in the progressive-reconstruction figure
    progressive_examples: int = 4  # chains in the progressive-generation figure
    unet_ch: int | None = None  # None: the digits preset's U-Net (64 channels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SIZES: dict[str, ReproduceSizes] = {
    # measured end to end on the 2-core machine: default 76 min (61% training), --quick 4 min
    # (README, "What the paper found"); each run's REPORT.md lists its measured stage times
    "default": ReproduceSizes(name="default", smoke=False, steps=1200, num_timesteps=1000,
                              bpd_examples=100, bpd_batch=100, t_chunk=5, num_samples=200),
    "quick": ReproduceSizes(name="quick", smoke=True, steps=40, num_timesteps=1000, bpd_examples=8,
                            bpd_batch=8, t_chunk=25, num_samples=16, recon_examples=2,
                            progressive_examples=2),
}


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One row of Table 2 (or the learned-range hybrid), with the paper's CIFAR-10 numbers."""

    key: str
    label: str
    table: str
    mean_type: MeanType
    var_type: VarType
    loss_type: LossType
    paper: dict[str, Any]


# Table 2 of Ho et al. (CIFAR-10, unconditional); Table 1 for the NLLs. "-" in the paper = unstable.
VARIANTS: tuple[Variant, ...] = (
    Variant(key="mu_bound_learned", label="μ̃: L, learned diagonal Σ", table="Table 2",
            mean_type=MeanType.X_PREV, var_type=VarType.LEARNED, loss_type=LossType.KL,
            paper={"is": 7.28, "is_std": 0.10, "fid": 23.69}),
    Variant(key="mu_bound_fixed", label="μ̃: L, fixed isotropic Σ", table="Table 2",
            mean_type=MeanType.X_PREV, var_type=VarType.FIXED_LARGE, loss_type=LossType.KL,
            paper={"is": 8.06, "is_std": 0.09, "fid": 13.22}),
    Variant(key="mu_mse", label="μ̃: ‖μ̃ − μ_θ‖² (unweighted)", table="Table 2",
            mean_type=MeanType.X_PREV, var_type=VarType.FIXED_LARGE, loss_type=LossType.MSE,
            paper={"unstable": True}),
    Variant(key="eps_bound_learned", label="ε: L, learned diagonal Σ", table="Table 2",
            mean_type=MeanType.EPS, var_type=VarType.LEARNED, loss_type=LossType.KL,
            paper={"unstable": True}),
    Variant(key="eps_bound_fixed", label="ε: L, fixed isotropic Σ", table="Table 2",
            mean_type=MeanType.EPS, var_type=VarType.FIXED_LARGE, loss_type=LossType.KL,
            paper={"is": 7.67, "is_std": 0.13, "fid": 13.51, "nll": 3.70}),
    Variant(key="eps_simple", label="ε: L_simple", table="Table 2",
            mean_type=MeanType.EPS, var_type=VarType.FIXED_LARGE, loss_type=LossType.MSE,
            paper={"is": 9.46, "is_std": 0.11, "fid": 3.17, "nll": 3.75}),
    Variant(key="eps_hybrid_range", label="ε: L_hybrid, learned_range Σ (Nichol & Dhariwal)",
            table="Nichol & Dhariwal 2021", mean_type=MeanType.EPS, var_type=VarType.LEARNED_RANGE,
            loss_type=LossType.HYBRID, paper={}),
)
SIMPLE = "eps_simple"
# Table 4 of Ho et al.: (reverse process time T - t + 1, rate bits/dim, distortion RMSE [0, 255]).
PAPER_TABLE4 = ((1000, 1.77581, 0.95136), (900, 0.11994, 12.02277), (800, 0.05415, 18.47482),
                (700, 0.02866, 24.43656), (600, 0.01507, 30.80948), (500, 0.00716, 38.03236),
                (400, 0.00282, 46.12765), (300, 0.00081, 54.18826), (200, 0.00013, 60.97170),
                (100, 0.00000, 67.60125))


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The fixed split of the 1797 digits as index arrays (train, test): the first 1437, the last 360."""
    from ddpmkit.data.sources import DIGITS_NUM_TEST, load_digits_uint8

    n = load_digits_uint8("all")[0].shape[0]
    idx = np.arange(n)
    return idx[: n - DIGITS_NUM_TEST], idx[n - DIGITS_NUM_TEST:]


def variant_config(variant: Variant, sizes: ReproduceSizes, seed: int) -> TrainConfig:
    """The digits preset with this variant's parameterization, variance and loss; nothing else changes."""
    learned = variant.var_type.is_learned
    over: dict[str, Any] = {"steps": sizes.steps, "seed": seed, "diffusion.mean_type": variant.mean_type,
                            "diffusion.var_type": variant.var_type, "diffusion.loss_type": variant.loss_type,
                            "diffusion.num_timesteps": sizes.num_timesteps, "unet.learned_variance": learned,
                            "sample_every": sizes.steps + 1, "num_samples": 0,
                            "checkpoint_every": max(1, min(500, sizes.steps))}
    if sizes.unet_ch is not None:
        over["unet.ch"] = sizes.unet_ch
    return apply_overrides(train_preset("digits"), over)


# ------------------------------------------------------------------------------------ nearest neighbours
def nearest_neighbours(queries: np.ndarray, reference: np.ndarray, k: int = 1,
                       exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean k nearest rows of ``reference`` (M, D) for each row of ``queries`` (N, D).

    ``exclude_self`` (queries is reference): a point is not its own neighbour. Returns
    (distances (N, k) float64, indices (N, k) int64), nearest first."""
    q, r = np.asarray(queries, np.float64), np.asarray(reference, np.float64)
    d2 = (q * q).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2.0 * q @ r.T  # (N, M)
    d2 = np.maximum(d2, 0.0)
    if exclude_self:
        np.fill_diagonal(d2, np.inf)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.sqrt(np.take_along_axis(d2, idx, 1)), idx


def near_copy_fraction(queries: np.ndarray, reference: np.ndarray, threshold: float) -> float:
    """The fraction of rows of ``queries`` whose nearest row of ``reference`` is closer than ``threshold``."""
    d, _ = nearest_neighbours(queries, reference, 1)
    return float((d[:, 0] < threshold).mean())


def near_copy_threshold(train: np.ndarray, quantile: float = 0.05) -> float:
    """The rule for "near-copy": closer than the ``quantile`` of the training digits' distances to
    their nearest *other* training digit (the same rule in every space; fixed before any model)."""
    d, _ = nearest_neighbours(train, train, 1, exclude_self=True)
    return float(np.quantile(d[:, 0], quantile))


def _pixel_space(images_uint8: np.ndarray) -> np.ndarray:
    return images_uint8.reshape(images_uint8.shape[0], -1).astype(np.float64) / 255.0  # (N, 64)


@torch.no_grad()
def _feature_space(images_uint8: np.ndarray) -> np.ndarray:
    from ddpmkit.evaluate.digits_metric import _features_logits

    return _features_logits(images_uint8)[0]  # (N, 64)


# ------------------------------------------------------------------------------------ stage files
def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    from ddpmkit.fileio import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


class _Stages:
    """Runs named stages once; each result is OUT/stages/NAME.json, written atomically at the end."""

    def __init__(self, out: Path, settings: dict[str, Any], *, resume: bool, bar: Any) -> None:
        self.dir, self.settings, self.resume, self.bar = out / "stages", settings, resume, bar
        self.seconds: dict[str, float] = {}

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def load(self, name: str) -> dict[str, Any]:
        return read_json_object(self.path(name))["result"]

    def run(self, name: str, cost: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        p = self.path(name)
        if p.is_file():
            saved = read_json_object(p)
            if self.resume and saved.get("settings") == self.settings:
                self.bar.update(cost)
                return saved["result"]
            if not self.resume:
                raise ValueError(f"{p} exists from an earlier run; pass --resume to continue it or "
                                 "choose another --output-dir")
            raise ValueError(f"{p} was made with other settings; choose another --output-dir")
        self.bar.set_description(f"{name} (est. {cost / 60:.1f} min)")
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        _atomic_json(p, {"format": STAGE_FORMAT, "stage": name, "settings": self.settings,
                         "wall_seconds": wall, "cpu_seconds": cpu, "result": result})
        self.bar.update(cost)
        return result


# ------------------------------------------------------------------------------------ cost model
# Seconds on the 2-core machine, one thread, unloaded: the digits preset trains 1500 steps in ~9 min
# (0.36 s a step at batch 128); the forward cost per image is an estimate (~0.09 s per 128 images,
# a third of a training step). Only the progress bar's estimates and the budget plan use them.
SECONDS_PER_TRAIN_STEP = 0.36
SECONDS_PER_IMAGE_STEP = 7e-4  # one image through the U-Net forward, once


def _train_cost(s: ReproduceSizes) -> float:
    return s.steps * SECONDS_PER_TRAIN_STEP * (1 if s.unet_ch is None else (s.unet_ch / 64) ** 2)


def _eval_cost(s: ReproduceSizes) -> float:
    return (s.bpd_examples + s.num_samples) * s.num_timesteps * SECONDS_PER_IMAGE_STEP + 2.0


def _figures_cost(s: ReproduceSizes) -> float:
    return (s.recon_examples * 4 + s.progressive_examples) * s.num_timesteps * 0.004 + 5.0


# ------------------------------------------------------------------------------------ the stages
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


def _train_stage(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    from ddpmkit.checkpoint import latest_checkpoint
    from ddpmkit.train import train

    last = latest_checkpoint(run_dir) if run_dir.exists() else None
    start = int(last.name.split("-")[1]) if last is not None else 0  # step-000000500
    t0 = time.perf_counter()
    res = train(cfg, run_dir, resume="auto", progress=False)
    seconds = time.perf_counter() - t0
    if res.exit_code >= 128:  # stopped by a signal: checkpointed, not finished; --resume continues it
        raise KeyboardInterrupt
    out = stability(res.losses, res.step - start, res.exit_code)
    out.update(step=int(res.step), seconds_per_step=seconds / max(1, res.step - start),
               config=cfg.to_dict(), run_dir=run_dir.name)
    return out


def _load(run_dir: Path) -> tuple[Any, Any]:
    from ddpmkit.models import load_model

    loaded = load_model(run_dir)
    return loaded.unet.eval(), loaded.diffusion.build()


def _test_set() -> Any:
    from ddpmkit.data import open_source

    return open_source("digits", resolution=8, channels=1, split="test")


def _eval_stage(run_dir: Path, sizes: ReproduceSizes, seed: int, out: Path, name: str) -> dict[str, Any]:
    from ddpmkit.evaluate.bpd import evaluate_bpd
    from ddpmkit.evaluate.digits_metric import digits_fd
    from ddpmkit.figures import images_to_uint8, save_image_grid
    from ddpmkit.sampling import sample
    from ddpmkit.seeds import sample_generators

    unet, diffusion = _load(run_dir)
    with torch.inference_mode():  # one noise stream per sample, as `ddpm sample --seed` draws them
        x = sample(unet, diffusion, (sizes.num_samples, 1, 8, 8),
                   generator=sample_generators(seed, range(sizes.num_samples)))  # (N, 1, 8, 8)
        finite = bool(torch.isfinite(x).all())
        u8 = images_to_uint8(x.nan_to_num(0.0).clamp(-1, 1))  # (N, 8, 8, 1)
        (out / "samples").mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out / "samples" / f"{name}.npz", arr_0=u8)
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


def _nn_stage(samples_npz: Path, out: Path, panel_rows: int = 8, k: int = 3) -> dict[str, Any]:
    from ddpmkit.data import load_digits_uint8
    from ddpmkit.figures import save_image_grid

    samples = np.load(samples_npz)["arr_0"]  # (N, 8, 8, 1)
    train_u8, test_u8 = load_digits_uint8("train")[0], load_digits_uint8("test")[0]
    result: dict[str, Any] = {"num_samples": int(samples.shape[0]), "num_test": int(test_u8.shape[0]),
                              "quantile": 0.05}
    tiles = [samples[:panel_rows]]
    for space, embed in (("pixel", _pixel_space), ("feature", _feature_space)):
        tr, s, te = embed(train_u8), embed(samples), embed(test_u8)
        thr = near_copy_threshold(tr, result["quantile"])
        d, idx = nearest_neighbours(s, tr, k)
        result[space] = {"threshold": thr, "samples_near_copy": near_copy_fraction(s, tr, thr),
                         "heldout_near_copy": near_copy_fraction(te, tr, thr),
                         "samples_median_nn_distance": float(np.median(d[:, 0])),
                         "heldout_median_nn_distance": float(np.median(nearest_neighbours(te, tr, 1)[0]))}
        tiles += [train_u8[idx[:panel_rows, j]] for j in range(k)]
    rows = np.stack(tiles, 1).reshape(-1, 8, 8, 1)  # per row: sample, k pixel NNs, k feature NNs
    labels = ["sample", *[f"{space}\nNN {j + 1}" for space in ("pixel", "feature") for j in range(k)]]
    result["panel"] = str(save_image_grid(rows, out / "figures" / "nearest_neighbours.png",
                                          nrow=1 + 2 * k, scale=8, col_labels=labels).relative_to(out))
    return result


def _figures_stage(run_dir: Path, sizes: ReproduceSizes, seed: int, out: Path) -> dict[str, Any]:
    """Sec. 4.3 progressive lossy reconstructions and Fig. 6 progressive generation (L_simple)."""
    from ddpmkit.chains import reconstruct
    from ddpmkit.figures import (
        progressive_figure,
        progressive_labels,
        reconstruction_figure,
        reconstruction_labels,
        save_image_grid,
    )

    unet, diffusion = _load(run_dir)
    T = diffusion.num_timesteps
    ts = sorted({max(0, round(T * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)})
    x0 = _test_set().get_batch(list(range(sizes.recon_examples)))  # (K, 1, 8, 8)
    with torch.inference_mode():
        grid, cols = reconstruction_figure(unet, diffusion, x0, ts, seed=seed)
        recon = save_image_grid(grid, out / "figures" / "reconstructions.png", nrow=cols, scale=8,
                                col_labels=reconstruction_labels([t + 1 for t in ts])[0])  # paper's t
        rmse = {}
        for t in ts:
            _, rec = reconstruct(unet, diffusion, x0, t, generator=torch.Generator().manual_seed(seed))
            rmse[str(t + 1)] = float(((rec.clamp(-1, 1) - x0) ** 2).mean().sqrt() * 127.5)
        grid, cols = progressive_figure(unet, diffusion, (sizes.progressive_examples, 1, 8, 8),
                                        num_snapshots=min(10, T), seed=seed)
        col_labels, row_labels = progressive_labels(T, min(10, T), one_based=True)  # the paper's t
        prog = save_image_grid(grid, out / "figures" / "progressive_generation.png", nrow=cols, scale=8,
                               col_labels=col_labels, row_labels=row_labels)
    return {"reconstruction_ts": [t + 1 for t in ts], "reconstruction_rmse": rmse,
            "reconstructions": str(recon.relative_to(out)), "progressive": str(prog.relative_to(out))}


# ------------------------------------------------------------------------------------ aggregation
def resolve_source(out: Path, source: str) -> Any:
    """The value a report source "stages/NAME.json#a.b.3" points at (list items by index)."""
    path, _, key = source.partition("#")
    return _get(read_json_object(Path(out) / path)["result"], key)


def _get(result: Any, key: str) -> Any:
    for part in key.split("."):
        result = result[int(part)] if isinstance(result, list) else result[part]
    return result


def _stat(stages: _Stages, names: list[str], key: str) -> dict[str, Any]:
    """Mean and spread (sample standard deviation over seeds; None with one seed) of ``key`` in the
    results of ``names``, with each value's source "stages/NAME.json#KEY"."""
    values = [float(_get(stages.load(n), key)) for n in names]
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "spread": spread, "n": len(values), "values": values,
            "sources": [f"stages/{n}.json#{key}" for n in names]}


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Is a's mean lower than b's, and is the gap larger than the two spreads together (None: 1 seed)."""
    gap = a["mean"] - b["mean"]
    noise = None if a["spread"] is None or b["spread"] is None else a["spread"] + b["spread"]
    return {"a_lower": bool(gap < 0), "gap": float(gap),
            "beyond_noise": None if noise is None else bool(abs(gap) > noise)}


def _variant_rows(stages: _Stages, seeds: list[int]) -> dict[str, Any]:
    rows = {}
    for v in VARIANTS:
        ev = [f"eval_{v.key}_s{s}" for s in seeds]
        tr = [f"train_{v.key}_s{s}" for s in seeds]
        rows[v.key] = {
            "label": v.label, "table": v.table, "mean_type": v.mean_type.value, "var_type": v.var_type.value,
            "loss_type": v.loss_type.value, "paper": v.paper,
            "fd": _stat(stages, ev, "digits.fd"), "score": _stat(stages, ev, "digits.score"),
            "real_fd": _stat(stages, ev, "digits.real.fd"),
            "real_score": _stat(stages, ev, "digits.real.score"),
            "bpd": _stat(stages, ev, "bpd.bpd"), "bpd_stderr": _stat(stages, ev, "bpd.bpd_stderr"),
            "nonfinite_steps": _stat(stages, tr, "nonfinite_steps"),
            "diverged": _stat(stages, tr, "diverged"),
            "seconds_per_step": _stat(stages, tr, "seconds_per_step"),
            "sample_grids": [stages.load(n)["sample_grid"] for n in ev],
        }
    return rows


def _findings(rows: dict[str, Any]) -> dict[str, Any]:
    """The paper's claims, each checked against this run's rows (see REPORT.md for the words)."""
    stable = sorted((k for k, r in rows.items() if "fid" in r["paper"]),
                    key=lambda k: rows[k]["paper"]["fid"])
    ours = sorted(stable, key=lambda k: rows[k]["fd"]["mean"])
    pairs = [{"better": a, "worse": b, "agrees": _compare(rows[a]["fd"], rows[b]["fd"])["a_lower"],
              "beyond_noise": _compare(rows[a]["fd"], rows[b]["fd"])["beyond_noise"]}
             for a, b in zip(stable, stable[1:], strict=False)]
    unstable = {k: {"paper_unstable": bool(r["paper"].get("unstable", False)),
                    "in_paper_table2": r["table"] == "Table 2",
                    "diverged_runs": int(round(r["diverged"]["mean"] * r["diverged"]["n"])),
                    "nonfinite_steps": r["nonfinite_steps"]["mean"]} for k, r in rows.items()}
    bound, simple, hybrid = rows["eps_bound_fixed"], rows[SIMPLE], rows["eps_hybrid_range"]
    return {
        "table2_order": {"paper": stable, "ours": ours, "matches": ours == stable, "adjacent_pairs": pairs},
        "stability": unstable,
        "table1": {"bound_lower_bpd": _compare(bound["bpd"], simple["bpd"]),
                   "simple_lower_fd": _compare(simple["fd"], bound["fd"])},
        "hybrid": {"hybrid_lower_bpd": _compare(hybrid["bpd"], simple["bpd"]),
                   "hybrid_lower_fd": _compare(hybrid["fd"], simple["fd"])},
    }


def _rate_distortion(stages: _Stages, seeds: list[int], out: Path) -> dict[str, Any]:
    """Table 4 / Fig. 5 for the L_simple model, from its bound terms on the test digits."""
    from ddpmkit.evaluate.bpd import table4_reverse_times
    from ddpmkit.figures import rate_distortion_figure

    names = [f"eval_{SIMPLE}_s{s}" for s in seeds]
    T = len(stages.load(names[0])["bpd"]["by_t"]["rate"])
    table = []
    for i, k in enumerate(table4_reverse_times(T)):  # reverse process time T - t + 1; index T - k
        paper = PAPER_TABLE4[i] if T == 1000 else (None, None, None)
        table.append({"reverse_time": k, "rate": _stat(stages, names, f"bpd.by_t.rate.{T - k}"),
                      "distortion": _stat(stages, names, f"bpd.by_t.distortion.{T - k}"),
                      "paper_rate": paper[1], "paper_distortion": paper[2]})
    by_t = [stages.load(n)["bpd"]["by_t"] for n in names]
    rd = {"num_timesteps": T, "rate": np.mean([b["rate"] for b in by_t], 0).tolist(),
          "distortion_rmse": np.mean([b["distortion"] for b in by_t], 0).tolist()}
    fig = rate_distortion_figure(rd, out / "figures" / "rate_distortion.png")
    return {"table": table, "figure": str(fig.relative_to(out)), "model": SIMPLE,
            "rate_total": _stat(stages, names, "bpd.rate_bpd"),
            "distortion_total": _stat(stages, names, "bpd.decoder_bpd")}



# ------------------------------------------------------------------------------------ figures
@dataclass(frozen=True, kw_only=True)
class BarPanel:
    """One panel of ``bar_chart``: a mean (and a spread, or None) per name; ``reference`` draws a
    dashed line (e.g. the real-data floor); ``log`` puts the values on a log axis."""

    title: str
    names: list[str]
    means: list[float]
    spreads: list[float | None]
    reference: float | None = None
    log: bool = False


def bar_chart(path: Path, panels: list[BarPanel], *, width: int = 900, row_h: int = 26,
              backend: ChartBackend | str = ChartBackend.AUTO) -> Path:
    """Horizontal bars with +- spread error bars, one panel per ``BarPanel``, stacked; drawn by
    matplotlib when installed (PNG, PDF or SVG), else by Pillow (PNG, labels spelled in ASCII)."""
    from ddpmkit.figures import _chart_backend

    for p in panels:
        if p.log and any(math.isfinite(m) and m <= 0 for m in p.means):
            raise ValueError(f"panel {p.title!r}: a log axis needs positive values, got {p.means}")
    if _chart_backend(backend, path) is ChartBackend.MATPLOTLIB:
        return _mpl_bar_chart(path, panels, width=width, row_h=row_h)
    return _pil_bar_chart(path, panels, width=width, row_h=row_h)


def _mpl_bar_chart(path: Path, panels: list[BarPanel], *, width: int, row_h: int) -> Path:
    from matplotlib.figure import Figure

    from ddpmkit.figures import PALETTE, _atomic_savefig

    heights = [60 + row_h * len(p.names) for p in panels]
    fig = Figure(figsize=(width / 100, sum(heights) / 100), dpi=100, layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    colour = tuple(c / 255 for c in PALETTE[0])
    for ax, p in zip(axes, panels, strict=True):
        y = np.arange(len(p.names))
        finite = [math.isfinite(m) for m in p.means]
        means = [m if ok else np.nan for m, ok in zip(p.means, finite, strict=True)]
        xerr = [s if (s and ok) else 0.0 for s, ok in zip(p.spreads, finite, strict=True)]
        ax.barh(y, means, xerr=xerr, color=colour, capsize=4, height=0.6)
        for yi, m, err, ok in zip(y, p.means, xerr, finite, strict=True):
            if ok:  # the value, right of its error bar
                ax.annotate(f"{m:.4g}", (m + err, yi), xytext=(6, 0), textcoords="offset points",
                            va="center", fontsize=9)
            else:  # at the axis' left edge (x in axes coordinates: also right on a log axis)
                ax.annotate("not finite", (0, yi), xycoords=ax.get_yaxis_transform(), xytext=(6, 0),
                            textcoords="offset points", va="center", fontsize=9, color="red")
        if p.reference is not None:
            ax.axvline(p.reference, color=(0.8, 0.16, 0.16), linestyle="--", linewidth=1.5)
        ax.set_yticks(y, p.names)
        ax.invert_yaxis()  # the first name on top, as in the table
        ax.set_xscale("log" if p.log else "linear")
        ax.grid(True, axis="x", which="both" if p.log else "major", color="0.9")
        ax.set_axisbelow(True)
        ax.set_title(p.title, fontsize=11, loc="left")
        ax.set_xlabel("log scale" if p.log else "")
        ax.margins(x=0.15)
    return _atomic_savefig(fig, path)


def _pil_bar_chart(path: Path, panels: list[BarPanel], *, width: int, row_h: int) -> Path:
    from PIL import Image, ImageDraw

    from ddpmkit.figures import _atomic_save, _font

    font, left, right = _font(12), 330, 60
    heights = [40 + row_h * len(p.names) + 20 for p in panels]
    img = Image.new("RGB", (width, sum(heights)), "white")
    d, y0 = ImageDraw.Draw(img), 0
    for p, h in zip(panels, heights, strict=True):
        ends = [m + (s or 0) for m, s in zip(p.means, p.spreads, strict=True) if math.isfinite(m)]
        ends += [p.reference] if p.reference else []
        starts = [max(m - (s or 0), m / 10)
                  for m, s in zip(p.means, p.spreads, strict=True) if math.isfinite(m)]
        lo = math.log10(min(starts)) - 0.1 if (p.log and starts) else 0.0
        hi = (math.log10(max(ends)) + 0.1) if (p.log and ends) else max(ends + [1e-12]) * 1.1

        def pos(v: float, lo: float = lo, hi: float = hi, log: bool = p.log) -> float:
            """The x pixel of value ``v``."""
            u = (math.log10(max(v, 10 ** lo)) if log else v) - lo
            return left + u * (width - left - right) / (hi - lo)

        title = _ascii(p.title) + (" (log scale)" if p.log else "")
        d.text((10, y0 + 8), title, fill="black", font=_font(14))
        for i, (name, m, s) in enumerate(zip(p.names, p.means, p.spreads, strict=True)):
            y = y0 + 40 + i * row_h
            d.text((10, y + 5), _ascii(name), fill="black", font=font)
            if not math.isfinite(m):
                d.text((left + 4, y + 5), "not finite", fill="red", font=font)
                continue
            d.rectangle([left, y + 4, pos(m), y + row_h - 4], fill=(70, 120, 190))
            if s:
                lo_x, hi_x, cy = pos(max(m - s, 0.0)), pos(m + s), y + row_h // 2
                d.line([lo_x, cy, hi_x, cy], fill="black", width=2)
                d.line([lo_x, cy - 5, lo_x, cy + 5], fill="black", width=2)
                d.line([hi_x, cy - 5, hi_x, cy + 5], fill="black", width=2)
            d.text((pos(m + (s or 0)) + 6, y + 5), f"{m:.4g}", fill="black", font=font)
        if p.reference:
            x = pos(p.reference)
            for yy in range(y0 + 36, y0 + h - 16, 8):
                d.line([x, yy, x, yy + 4], fill=(200, 40, 40), width=2)
        d.line([left, y0 + 36, left, y0 + h - 16], fill="black")
        y0 += h
    return _atomic_save(img, path)


_ASCII = (("μ̃", "mu~"), ("μ", "mu"), ("Σ", "Sigma"), ("ε", "eps"), ("‖", "|"), ("−", "-"), ("²", "^2"),
          ("θ", "theta"))


def _ascii(text: str) -> str:
    """Pillow's fallback font has no Greek: the labels spelled out."""
    for a, b in _ASCII:
        text = text.replace(a, b)
    return text


def _variant_chart(rows: dict[str, Any], out: Path) -> str:
    names = [r["label"] for r in rows.values()]

    def panel(key: str, title: str, reference: float | None = None, log: bool = False) -> BarPanel:
        return BarPanel(title=title, names=names, means=[r[key]["mean"] for r in rows.values()],
                        spreads=[r[key]["spread"] for r in rows.values()], reference=reference, log=log)

    real_fd = float(np.mean([r["real_fd"]["mean"] for r in rows.values()]))

    def wide(key: str) -> bool:
        """Values spanning orders of magnitude between variants: a log axis keeps all readable."""
        finite = [r[key]["mean"] for r in rows.values() if math.isfinite(r[key]["mean"])]
        return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 5

    panels = [panel("fd", "Frechet distance, lower is better (dashed: held-out real digits)",
                    reference=real_fd, log=wide("fd")),
              panel("bpd", "test bits/dim, full T-step bound, lower is better", log=wide("bpd"))]
    return str(bar_chart(out / "figures" / "table2_variants.png", panels).relative_to(out))


# ------------------------------------------------------------------------------------ REPORT.md
def _n(x: Any) -> str:
    """How every number is written in REPORT.md (the provenance test parses this form back)."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}"


def _s(stat: dict[str, Any]) -> str:
    return _n(stat["mean"]) + ("" if stat["spread"] is None else f" ± {_n(stat['spread'])}")


def _verdict(c: dict[str, Any], claim: str) -> str:
    noise = {None: "one seed, so the noise is unknown", True: "the gap is larger than the spreads",
             False: "the gap is within the spreads (noise)"}[c["beyond_noise"]]
    return f"{'matches' if c['a_lower'] else 'does not match'} the paper ({claim}; {noise})"


def _md_table2(rep: dict[str, Any]) -> list[str]:
    lines = ["| variant | FD ↓ | real floor FD | classifier score ↑ | test bits/dim ↓ | non-finite steps | "
             "diverged runs | paper IS | paper FID |", "|---|---|---|---|---|---|---|---|---|"]
    for k, r in rep["variants"].items():
        p = r["paper"]
        pis = ("unstable" if p.get("unstable")
               else (f"{_n(p['is'])} ± {_n(p['is_std'])}" if "is" in p else "-"))
        pfid = "unstable" if p.get("unstable") else _n(p.get("fid"))
        div = _n(rep["findings"]["stability"][k]["diverged_runs"])
        lines.append(f"| {r['label']} | {_s(r['fd'])} | {_s(r['real_fd'])} | {_s(r['score'])} | "
                     f"{_s(r['bpd'])} | "
                     f"{_s(r['nonfinite_steps'])} | {div} | {pis} | {pfid} |")
    return lines


def _md_findings(rep: dict[str, Any]) -> list[str]:
    f, v = rep["findings"], rep["variants"]
    o = f["table2_order"]
    lines = ["## Findings, beside the paper", "",
             f"- **Table 2 sample-quality order** (stable variants; paper by FID, here by FD): paper "
             f"{' < '.join(v[k]['label'] for k in o['paper'])}; "
             f"here {' < '.join(v[k]['label'] for k in o['ours'])}. "
             f"The order {'matches' if o['matches'] else 'does not match'} the paper's."]
    for p in o["adjacent_pairs"]:
        noise = {None: "one seed", True: "beyond noise", False: "within noise"}[p["beyond_noise"]]
        lines.append(f"  - {v[p['better']]['label']} better than {v[p['worse']]['label']}: "
                     f"{'yes' if p['agrees'] else 'no'} ({noise})")
    for k, s in f["stability"].items():
        ours = "diverged or stopped" if s["diverged_runs"] > 0 else "trained stably"
        if not s.get("in_paper_table2", True):
            lines.append(f"- **Stability, {v[k]['label']}**: not in the paper's Table 2 "
                         f"({v[k]['table']}); here {ours}.")
            continue
        paper = "unstable in the paper" if s["paper_unstable"] else "stable in the paper"
        agree = (s["diverged_runs"] > 0) == s["paper_unstable"]
        lines.append(f"- **Stability, {v[k]['label']}**: {paper}; here {ours} "
                     f"({'matches' if agree else 'does not match'}).")
    t1, h = f["table1"], f["hybrid"]
    lines += [f"- **Table 1, NLL vs sample quality**: the true bound (ε, fixed Σ) giving lower bits/dim than "
              f"L_simple {_verdict(t1['bound_lower_bpd'], 'paper: 3.70 vs 3.75')}; "
              "L_simple giving the better "
              f"samples {_verdict(t1['simple_lower_fd'], 'paper: FID 3.17 vs 13.51')}.",
              f"- **Learned range variances (hybrid)**: lower bits/dim than L_simple with fixed Σ: "
              f"{_verdict(h['hybrid_lower_bpd'], 'Nichol & Dhariwal: better log-likelihood')}; samples at "
              "least as good (lower FD): "
              f"{_verdict(h['hybrid_lower_fd'], 'Nichol & Dhariwal: similar quality')}."]
    return lines


def _md_rd(rep: dict[str, Any]) -> list[str]:
    rd = rep["rate_distortion"]
    lines = ["## Table 4 and Fig. 5: rate and distortion of the L_simple model on the test digits", "",
             f"Rate at t = 1: {_s(rd['rate_total'])} bits/dim; distortion L_0: {_s(rd['distortion_total'])} "
             "bits/dim (paper, CIFAR-10: 1.78 and 1.97).", "",
             "| reverse time (T - t + 1) | rate (bits/dim) | distortion (RMSE [0, 255]) | paper rate "
             "| paper distortion |",
             "|---|---|---|---|---|"]
    for r in rd["table"]:
        lines.append(f"| {_n(r['reverse_time'])} | {_s(r['rate'])} | {_s(r['distortion'])} | "
                     f"{_n(r['paper_rate'])} | {_n(r['paper_distortion'])} |")
    lines += ["", f"![rate-distortion]({rd['figure']})", ""]
    return lines


def _md_nn(rep: dict[str, Any]) -> list[str]:
    nn, fig = rep["nearest_neighbours"], rep["figures_stage"]
    lines = ["## Fig. 6, Sec. 4.3 and App. D: progressive generation, lossy reconstructions, "
             "memorization", "",
             f"![progressive generation]({fig['progressive']})", "",
             f"Reconstructions from x_t (each row: x_0, then x_t and its reconstruction for t in "
             f"{', '.join(_n(t) for t in fig['reconstruction_ts'])}):", "",
             f"![reconstructions]({fig['reconstructions']})",
             "", "| t | reconstruction RMSE [0, 255] |", "|---|---|"]
    lines += [f"| {_n(t)} | {_n(fig['reconstruction_rmse'][str(t)])} |" for t in fig["reconstruction_ts"]]
    lines += ["", "Near-copies: a digit closer to its nearest training digit than the "
              f"{_n(nn['quantile'])} quantile "
              "of the training digits' distances to their nearest other training digit.", "",
              "| space | samples near-copies | held-out real near-copies | samples median NN distance | "
              "held-out median NN distance |", "|---|---|---|---|---|"]
    for sp in ("pixel", "feature"):
        r = nn[sp]
        lines.append(f"| {sp} | {_n(r['samples_near_copy'])} | {_n(r['heldout_near_copy'])} | "
                     f"{_n(r['samples_median_nn_distance'])} | {_n(r['heldout_median_nn_distance'])} |")
    lines += ["", "Each row: an L_simple sample, its 3 nearest training digits in pixel space, then in the "
              "classifier's feature space.", "", f"![nearest neighbours]({nn['panel']})", ""]
    return lines


def write_markdown(rep: dict[str, Any], path: Path) -> None:
    sz, b = rep["sizes"], rep["budget"]
    smoke = ["> **SMOKE RUN (--quick)**: tiny training and evaluation, only the report's structure is "
             "meaningful, not its numbers.", ""] if sz["smoke"] else []
    lines = ["# ddpm reproduce digits: Ho et al. 2020 in miniature", "", *smoke,
             f"Data: scikit-learn's 8x8 digits, fixed split: {rep['split']['train']} train (the first), "
             f"{rep['split']['test']} held out (the last); disjoint by index. Seeds: "
             f"{', '.join(_n(s) for s in rep['seeds'])}. Every variant: the `digits` preset, "
             f"{_n(sz['steps'])} steps, T = {_n(sz['num_timesteps'])}; only the parameterization, "
             f"variance and loss change. Sample quality: {_n(sz['num_samples'])} ancestral samples "
             "(all T steps) per model. Test bits/dim: the full bound on the first "
             f"{_n(sz['bpd_examples'])} of the held-out digits (a subsample, for time). Spreads: sample "
             "standard deviation over seeds. The paper's numbers are CIFAR-10's: compare orderings, "
             "not values.",
             "", "## Table 2: parameterization × objective", "",
             "FD and classifier score: the shipped digits classifier's features of the samples against "
             "those of the training digits. The real floor is the same count of held-out real digits "
             "scored the same way; a model of the training digits can score below it.", "",
             *_md_table2(rep), "",
             f"![variants]({rep['figures']['variants']})", ""]
    lines += [f"![{k}]({g})" for k, r in rep["variants"].items() for g in r["sample_grids"][:1]]
    lines += ["", *_md_findings(rep), "", *_md_rd(rep), *_md_nn(rep),
              "## Budget", "",
              f"Total wall time {_n(b['wall_seconds'])} s, process CPU time {_n(b['cpu_seconds'])} s "
              "(sum of the stages).", "", "| stage | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {k} | {_n(s['wall_seconds'])} | {_n(s['cpu_seconds'])} |" for k, s in b["stages"].items()]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


# ------------------------------------------------------------------------------------ the job
def _plan(sizes: ReproduceSizes, seeds: list[int], out: Path) -> list[tuple[str, float, Callable[[], Any]]]:
    """Every stage in order: (name, estimated seconds, function)."""
    plan: list[tuple[str, float, Callable[[], Any]]] = []
    for s in seeds:
        for v in VARIANTS:
            run_dir = out / "runs" / f"{v.key}_s{s}"
            cfg = variant_config(v, sizes, s)
            plan.append((f"train_{v.key}_s{s}", _train_cost(sizes),
                         lambda cfg=cfg, run_dir=run_dir: _train_stage(cfg, run_dir)))
            name = f"eval_{v.key}_s{s}"
            plan.append((name, _eval_cost(sizes),
                         lambda run_dir=run_dir, s=s, name=name: _eval_stage(run_dir, sizes, s, out, name)))
    s0 = seeds[0]
    simple = out / "runs" / f"{SIMPLE}_s{s0}"
    plan.append((f"figures_{SIMPLE}_s{s0}", _figures_cost(sizes),
                 lambda: _figures_stage(simple, sizes, s0, out)))
    plan.append((f"nn_{SIMPLE}_s{s0}", 5.0,
                 lambda: _nn_stage(out / "samples" / f"eval_{SIMPLE}_s{s0}.npz", out)))
    return plan


def _budget(stages: _Stages, names: list[str]) -> dict[str, Any]:
    rows = {}
    for n in names:
        d = read_json_object(stages.path(n))
        rows[n] = {"wall_seconds": d["wall_seconds"], "cpu_seconds": d["cpu_seconds"]}
    return {"stages": rows, "wall_seconds": float(sum(r["wall_seconds"] for r in rows.values())),
            "cpu_seconds": float(sum(r["cpu_seconds"] for r in rows.values()))}


def build_report(stages: _Stages, sizes: ReproduceSizes, seeds: list[int], out: Path,
                 names: list[str]) -> dict[str, Any]:
    """report.json and REPORT.md from the stage files alone."""
    train_idx, test_idx = digits_split()
    rows = _variant_rows(stages, seeds)
    s0 = seeds[0]
    rep = {"format": "ddpmkit.reproduce_report", "version": 1, "sizes": sizes.to_dict(), "seeds": seeds,
           "split": {"train": int(train_idx.size), "test": int(test_idx.size),
                     "rule": "first 1437 train, last 360 test (ddpmkit.data.sources.DIGITS_NUM_TEST)"},
           "variants": rows, "findings": _findings(rows),
           "rate_distortion": _rate_distortion(stages, seeds, out),
           "figures_stage": stages.load(f"figures_{SIMPLE}_s{s0}"),
           "nearest_neighbours": stages.load(f"nn_{SIMPLE}_s{s0}"),
           "budget": _budget(stages, names)}
    rep["figures"] = {"variants": _variant_chart(rows, out)}
    _atomic_json(out / "report.json", rep)
    write_markdown(rep, out / "REPORT.md")
    return rep


def reproduce_digits(output_dir: str | os.PathLike, *, seeds: int = 1,
                     sizes: ReproduceSizes | str = "default", resume: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole job into ``output_dir``; returns the report dict."""
    from ddpmkit.logs import progress_bar

    if isinstance(sizes, str):
        if sizes not in SIZES:
            raise unknown_choice("size", sizes, sorted(SIZES))
        sizes = SIZES[sizes]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {seeds!r}")
    out = Path(output_dir)
    earlier = [d for d in (out / "stages", out / "runs") if d.is_dir() and any(d.iterdir())]
    if earlier and not resume:  # an interrupted run's checkpoints are continued only when asked
        raise ValueError(f"{out} holds an earlier run ({earlier[0].name}/); pass --resume to continue it "
                         "or choose another --output-dir")
    seed_list = list(range(seeds))
    plan = _plan(sizes, seed_list, out)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, train_preset("digits").num_threads))
    try:
        with progress_bar(total=sum(c for _, c, _ in plan), disable=not progress, unit="s(est)",
                          dynamic_ncols=True,
                          bar_format="{desc}: {percentage:3.0f}%|{bar}| elapsed {elapsed}, left {remaining}"
                          ) as bar:
            stages = _Stages(out, {"sizes": sizes.to_dict(), "version": 1}, resume=resume, bar=bar)
            for name, cost, fn in plan:
                stages.run(name, cost, fn)
            bar.set_description("report")
            return build_report(stages, sizes, seed_list, out, [n for n, _, _ in plan])
    finally:
        torch.set_num_threads(threads)
