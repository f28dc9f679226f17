"""The numbers over seeds and the paper's claims checked against them, from the stage results.

A statistic is a mean and a spread (the sample standard deviation over seeds; None with one seed)
with each value's source; a comparison says whether one mean is lower and whether the gap exceeds
the two spreads together. ``findings`` checks Table 2's order, stability, Table 1's NLL against
sample quality, and the learned-range hybrid.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ddpmkit.reproduce.plan import SIMPLE, VARIANTS
from ddpmkit.reproduce.stages import Stages, get_key

__all__ = ["compare", "findings", "stat", "variant_rows"]


def stat(stages: Stages, names: list[str], key: str) -> dict[str, Any]:
    """Mean and spread (sample standard deviation over seeds; None with one seed) of ``key`` in the
    results of ``names``, with each value's source "stages/NAME.json#KEY"."""
    values = [float(get_key(stages.load(n), key)) for n in names]
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "spread": spread, "n": len(values), "values": values,
            "sources": [f"stages/{n}.json#{key}" for n in names]}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Is a's mean lower than b's, and is the gap larger than the two spreads together (None: 1 seed)."""
    gap = a["mean"] - b["mean"]
    noise = None if a["spread"] is None or b["spread"] is None else a["spread"] + b["spread"]
    return {"a_lower": bool(gap < 0), "gap": float(gap),
            "beyond_noise": None if noise is None else bool(abs(gap) > noise)}


def variant_rows(stages: Stages, seeds: list[int]) -> dict[str, Any]:
    """Each variant's row of Table 2: its settings, the paper's numbers, and its statistics."""
    rows = {}
    for v in VARIANTS:
        ev = [f"eval_{v.key}_s{s}" for s in seeds]
        tr = [f"train_{v.key}_s{s}" for s in seeds]
        rows[v.key] = {
            "label": v.label, "table": v.table, "mean_type": v.mean_type.value, "var_type": v.var_type.value,
            "loss_type": v.loss_type.value, "paper": v.paper,
            "fd": stat(stages, ev, "digits.fd"), "score": stat(stages, ev, "digits.score"),
            "real_fd": stat(stages, ev, "digits.real.fd"),
            "real_score": stat(stages, ev, "digits.real.score"),
            "bpd": stat(stages, ev, "bpd.bpd"), "bpd_stderr": stat(stages, ev, "bpd.bpd_stderr"),
            "nonfinite_steps": stat(stages, tr, "nonfinite_steps"),
            "diverged": stat(stages, tr, "diverged"),
            "seconds_per_step": stat(stages, tr, "seconds_per_step"),
            "sample_grids": [stages.load(n)["sample_grid"] for n in ev],
        }
    return rows


def findings(rows: dict[str, Any]) -> dict[str, Any]:
    """The paper's claims, each checked against this run's rows (see REPORT.md for the words)."""
    stable = sorted((k for k, r in rows.items() if "fid" in r["paper"]),
                    key=lambda k: rows[k]["paper"]["fid"])
    ours = sorted(stable, key=lambda k: rows[k]["fd"]["mean"])
    pairs = [{"better": a, "worse": b, "agrees": compare(rows[a]["fd"], rows[b]["fd"])["a_lower"],
              "beyond_noise": compare(rows[a]["fd"], rows[b]["fd"])["beyond_noise"]}
             for a, b in zip(stable, stable[1:], strict=False)]
    unstable = {k: {"paper_unstable": bool(r["paper"].get("unstable", False)),
                    "in_paper_table2": r["table"] == "Table 2",
                    "diverged_runs": int(round(r["diverged"]["mean"] * r["diverged"]["n"])),
                    "nonfinite_steps": r["nonfinite_steps"]["mean"]} for k, r in rows.items()}
    bound, simple, hybrid = rows["eps_bound_fixed"], rows[SIMPLE], rows["eps_hybrid_range"]
    return {
        "table2_order": {"paper": stable, "ours": ours, "matches": ours == stable, "adjacent_pairs": pairs},
        "stability": unstable,
        "table1": {"bound_lower_bpd": compare(bound["bpd"], simple["bpd"]),
                   "simple_lower_fd": compare(simple["fd"], bound["fd"])},
        "hybrid": {"hybrid_lower_bpd": compare(hybrid["bpd"], simple["bpd"]),
                   "hybrid_lower_fd": compare(hybrid["fd"], simple["fd"])},
    }


