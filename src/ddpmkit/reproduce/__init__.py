"""`ddpm reproduce digits`: the paper's experiments, in miniature, on scikit-learn's 8x8 digits.

The layer above training and evaluation. One job trains every reverse-process variant of Table 2
(plus Nichol & Dhariwal's learned-range hybrid) with one shared recipe, then measures, on digits
the models never saw:
- sample quality: the shipped digits metric (Frechet distance, classifier score) of ancestral
  samples (Algorithm 2, all T steps), next to the real-subset floor (held-out real digits);
- test bits/dim through the full T-step bound, eq. (5) (``evaluate.bpd.evaluate_bpd``, the code of
  ``ddpm eval bpd``) on the first ``bpd_examples`` test digits;
- stability: non-finite (skipped) updates and divergence (see ``runs.stability``);
- Table 4 / Fig. 5: rate and distortion by t for the L_simple model (from the same bound terms),
  progressive lossy reconstructions from x_t (Sec. 4.3); Fig. 6 progressive generation;
- App. D: samples beside their nearest training digits in pixel and classifier-feature space, with
  the fraction of near-copies next to the same fraction for held-out real digits.

The split is the package's fixed digits split (``ddpmkit.data.sources``): the first 1437 of the 1797
digits train, the last 360 are held out (``plan.digits_split``).

Resumable: each stage writes ``OUT/stages/<name>.json`` atomically when it finishes (``stages``);
``resume`` skips stages whose file exists with the same settings, and training resumes from its
checkpoints. REPORT.md and report.json are rebuilt from the stage files only (``report``).

Modules: ``plan`` (sizes, variants, configs, work weights), ``stages`` (the resumable runner),
``runs`` (train, evaluate, the L_simple figures), ``memorization`` (nearest neighbours, near-copies),
``findings`` (statistics over seeds, the paper's claims), ``report`` (report.json and its charts),
``markdown`` (REPORT.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ddpmkit.checks import check_int
from ddpmkit.config import train_preset
from ddpmkit.enums import unknown_choice
from ddpmkit.reproduce.memorization import memorization_stage
from ddpmkit.reproduce.plan import (
    NN_WORK,
    SIMPLE,
    SIZES,
    VARIANTS,
    ReproduceSizes,
    eval_work,
    figures_work,
    train_work,
    variant_config,
)
from ddpmkit.reproduce.report import report_from_stages
from ddpmkit.reproduce.runs import eval_stage, figures_stage, file_sha256, model_inputs, train_stage
from ddpmkit.reproduce.stages import Stages

__all__ = ["reproduce_digits", "stage_plan"]

# (name, relative work, function, its inputs besides the settings: see Stages.run)
Stage = tuple[str, float, Callable[[], Any], Callable[[], dict[str, Any]] | None]


def stage_plan(sizes: ReproduceSizes, seeds: list[int], out: Path) -> list[Stage]:
    """Every stage in order: (name, relative work, function, inputs)."""
    plan: list[Stage] = []
    for s in seeds:
        for v in VARIANTS:
            run_dir = out / "runs" / f"{v.key}_s{s}"
            cfg = variant_config(v, sizes, s)
            plan.append((f"train_{v.key}_s{s}", train_work(sizes),
                         lambda cfg=cfg, run_dir=run_dir: train_stage(cfg, run_dir), None))
            name = f"eval_{v.key}_s{s}"
            plan.append((name, eval_work(sizes),
                         lambda run_dir=run_dir, s=s, name=name: eval_stage(run_dir, sizes, s, out, name),
                         lambda run_dir=run_dir: model_inputs(run_dir)))
    s0 = seeds[0]
    simple = out / "runs" / f"{SIMPLE}_s{s0}"
    plan.append((f"figures_{SIMPLE}_s{s0}", figures_work(sizes),
                 lambda: figures_stage(simple, sizes, s0, out), lambda: model_inputs(simple)))
    npz = out / "samples" / f"eval_{SIMPLE}_s{s0}.npz"
    plan.append((f"nn_{SIMPLE}_s{s0}", NN_WORK, lambda: memorization_stage(npz, out),
                 lambda: {"samples_sha256": file_sha256(npz)}))
    return plan


def _log_recipe(sizes: ReproduceSizes, seed: int) -> None:
    """The shared recipe's deviations from the paper, once for all the runs (L_simple's: the other
    variants differ from it only in the parameterization, variance and loss of Table 2)."""
    from ddpmkit.logs import logger
    from ddpmkit.training.log import deviation_lines

    simple = next(v for v in VARIANTS if v.key == SIMPLE)
    lines = deviation_lines(variant_config(simple, sizes, seed))
    lines[0] += " (the recipe every variant shares; each then sets its own mean, variance and loss)"
    for line in lines:
        logger("ddpmkit.reproduce").info(line)


def reproduce_digits(output_dir: str | os.PathLike, *, seeds: int = 1,
                     sizes: ReproduceSizes | str = "default", resume: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole job into ``output_dir``; returns the report dict."""
    from ddpmkit.logs import progress_bar

    if isinstance(sizes, str):
        if sizes not in SIZES:
            raise unknown_choice("size", sizes, sorted(SIZES))
        sizes = SIZES[sizes]
    seeds = check_int(seeds, "--seeds", low=1)
    out = Path(output_dir)
    earlier = [d for d in (out / "stages", out / "runs") if d.is_dir() and any(d.iterdir())]
    if earlier and not resume:  # an interrupted run's checkpoints are continued only when asked
        raise ValueError(f"{out} holds an earlier run ({earlier[0].name}/); pass --resume to continue it "
                         "or choose another --output-dir")
    seed_list = list(range(seeds))
    plan = stage_plan(sizes, seed_list, out)
    _log_recipe(sizes, seed_list[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, train_preset("digits").num_threads))
    try:
        with progress_bar(total=sum(w for _, w, _, _ in plan), disable=not progress, unit="work",
                          dynamic_ncols=True,
                          bar_format="{desc}: {percentage:3.0f}%|{bar}| elapsed {elapsed}, left {remaining}"
                          ) as bar:
            stages = Stages(out, {"sizes": sizes.to_dict(), "version": 1}, resume=resume, bar=bar)
            for name, work, fn, inputs in plan:
                stages.run(name, work, fn, inputs)
            bar.set_description("report")
            return report_from_stages(stages, sizes, seed_list, out, [n for n, _, _, _ in plan])
    finally:
        torch.set_num_threads(threads)
