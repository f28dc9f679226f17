"""report.json and its charts, assembled from the stage files alone; REPORT.md is written from it.

``report_from_stages`` reads every number from OUT/stages/*.json (each statistic names its source),
checks the paper's claims (``findings``), draws the Table 2 bar chart and Fig. 5, and writes
report.json and REPORT.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ddpmkit.charts import BarPanel, bar_chart
from ddpmkit.reproduce.findings import findings, stat, variant_rows
from ddpmkit.reproduce.markdown import write_markdown
from ddpmkit.reproduce.plan import SIMPLE, ReproduceSizes, digits_split
from ddpmkit.reproduce.stages import Stages, stage_budget, write_json

__all__ = ["PAPER_TABLE4", "rate_distortion_section", "report_from_stages", "variant_chart"]

# Table 4 of Ho et al.: (reverse process time T - t + 1, rate bits/dim, distortion RMSE [0, 255]).
PAPER_TABLE4 = ((1000, 1.77581, 0.95136), (900, 0.11994, 12.02277), (800, 0.05415, 18.47482),
                (700, 0.02866, 24.43656), (600, 0.01507, 30.80948), (500, 0.00716, 38.03236),
                (400, 0.00282, 46.12765), (300, 0.00081, 54.18826), (200, 0.00013, 60.97170),
                (100, 0.00000, 67.60125))


def rate_distortion_section(stages: Stages, seeds: list[int], out: Path) -> dict[str, Any]:
    """Table 4 / Fig. 5 for the L_simple model, from its bound terms on the test digits."""
    from ddpmkit.evaluate.bpd import table4_reverse_times
    from ddpmkit.figures import rate_distortion_figure

    names = [f"eval_{SIMPLE}_s{s}" for s in seeds]
    T = len(stages.load(names[0])["bpd"]["by_t"]["rate"])
    table = []
    for i, k in enumerate(table4_reverse_times(T)):  # reverse process time T - t + 1; index T - k
        paper = PAPER_TABLE4[i] if T == 1000 else (None, None, None)
        table.append({"reverse_time": k, "rate": stat(stages, names, f"bpd.by_t.rate.{T - k}"),
                      "distortion": stat(stages, names, f"bpd.by_t.distortion.{T - k}"),
                      "paper_rate": paper[1], "paper_distortion": paper[2]})
    by_t = [stages.load(n)["bpd"]["by_t"] for n in names]
    rd = {"num_timesteps": T, "rate": np.mean([b["rate"] for b in by_t], 0).tolist(),
          "distortion_rmse": np.mean([b["distortion"] for b in by_t], 0).tolist()}
    fig = rate_distortion_figure(rd, out / "figures" / "rate_distortion.png")
    return {"table": table, "figure": str(fig.relative_to(out)), "model": SIMPLE,
            "rate_total": stat(stages, names, "bpd.rate_bpd"),
            "distortion_total": stat(stages, names, "bpd.decoder_bpd")}


def variant_chart(rows: dict[str, Any], out: Path) -> str:
    """The Table 2 bar chart (FD beside the real floor, test bits/dim): OUT/figures/table2_variants.png."""
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


def report_from_stages(stages: Stages, sizes: ReproduceSizes, seeds: list[int], out: Path,
                       names: list[str]) -> dict[str, Any]:
    """report.json and REPORT.md from the stage files alone."""
    train_idx, test_idx = digits_split()
    rows = variant_rows(stages, seeds)
    s0 = seeds[0]
    rep = {"format": "ddpmkit.reproduce_report", "version": 1, "sizes": sizes.to_dict(), "seeds": seeds,
           "split": {"train": int(train_idx.size), "test": int(test_idx.size),
                     "rule": "first 1437 train, last 360 test (ddpmkit.data.sources.DIGITS_NUM_TEST)"},
           "variants": rows, "findings": findings(rows),
           "rate_distortion": rate_distortion_section(stages, seeds, out),
           "figures_stage": stages.load(f"figures_{SIMPLE}_s{s0}"),
           "nearest_neighbours": stages.load(f"nn_{SIMPLE}_s{s0}"),
           "budget": stage_budget(stages, names)}
    rep["figures"] = {"variants": variant_chart(rows, out)}
    write_json(out / "report.json", rep)
    write_markdown(rep, out / "REPORT.md")
    return rep
