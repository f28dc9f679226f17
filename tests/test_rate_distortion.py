"""Rate-distortion (Sec. 4.3, Table 4) is computed in one place, ``evaluate.bpd.rate_distortion_by_t``,
and ``ddpm eval bpd`` (``summarize``) and the figure's (``evaluate.bpd.rate_distortion``) agree with a
hand-written example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

VB = [0.5, 1.0, 2.0, 3.0]  # L_0 (decoder), L_1, L_2, L_3 in bits/dim
PRIOR = 0.25  # L_T
RATE = [6.25, 5.25, 3.25, 0.25]  # L_T + sum_{s > i} L_s, by hand
DIST = [1.0, 2.0, 3.0, 4.0]  # 127.5 sqrt(x0_mse)
X0_MSE = [(d / 127.5) ** 2 for d in DIST]
ROWS = [4, 4, 3, 3, 2, 2, 2, 1, 1, 1]  # max(1, round(T (10 - i) / 10)) for T = 4, i = 0..9


def test_rate_distortion_by_t_by_hand():
    from ddpmkit.evaluate.bpd import rate_distortion_by_t

    rate, dist = rate_distortion_by_t(np.array(VB), np.array(X0_MSE), PRIOR)
    np.testing.assert_allclose(rate, RATE, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dist, DIST, rtol=1e-12)


def test_eval_bpd_summary_and_figure_agree_with_the_hand_written_values():
    from ddpmkit.evaluate.bpd import rate_distortion, rate_distortion_table, summarize

    s = summarize([{"total_bpd": [sum(VB) + PRIOR] * 2, "prior_bpd": [PRIOR] * 2,
                    "vb_sum": [2 * v for v in VB], "x0_mse_sum": [2 * m for m in X0_MSE]}], num_timesteps=4)
    assert s["by_t"]["rate"] == pytest.approx(RATE) and s["by_t"]["distortion"] == pytest.approx(DIST)
    assert s["rate_bpd"] == pytest.approx(6.25) and s["distortion_rmse"] == pytest.approx(1.0)
    assert [k for k, _, _ in rate_distortion_table(s)] == ROWS

    class Stub:  # a diffusion whose bound terms are the example's, for 2 images
        def calc_bpd_loop(self, model, x0, **kw):
            rep = lambda v: torch.tensor([v, v], dtype=torch.float64)  # noqa: E731
            return {"vb": rep(VB), "x0_mse": rep(X0_MSE), "prior_bpd": torch.full((2,), PRIOR),
                    "total_bpd": torch.full((2,), sum(VB) + PRIOR)}

    rd = rate_distortion(None, Stub(), torch.zeros(2, 1, 2, 2))
    assert rd["rate"] == pytest.approx(RATE) and rd["distortion_rmse"] == pytest.approx(DIST)
    assert [row["reverse_time"] for row in rd["table"]] == ROWS
    assert [row["rate_bpd"] for row in rd["table"]] == pytest.approx([RATE[4 - k] for k in ROWS])


def test_table4_rows_are_the_papers_reverse_times_and_stay_in_range_for_small_T():
    from ddpmkit.evaluate.bpd import table4_reverse_times

    assert table4_reverse_times(1000) == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]  # Table 4
    assert table4_reverse_times(4) == [4, 4, 3, 3, 2, 2, 2, 1, 1, 1]  # round half even, at least 1


def test_the_reproduce_report_reads_table4_rows_through_the_one_rule(tmp_path):
    """reproduce's Table 4 uses evaluate.bpd.table4_reverse_times (its own copy of the rule is gone)."""
    import types

    from ddpmkit.reproduce.report import rate_distortion_section

    by_t = {"rate": [10.0, 20.0, 30.0, 40.0], "distortion": [1.0, 2.0, 3.0, 4.0]}
    result = {"bpd": {"by_t": by_t, "rate_bpd": 1.0, "decoder_bpd": 2.0}}
    stages = types.SimpleNamespace(load=lambda name: result)
    rd = rate_distortion_section(stages, [0], tmp_path)
    assert [row["reverse_time"] for row in rd["table"]] == [4, 4, 3, 3, 2, 2, 2, 1, 1, 1]
    assert [row["rate"]["mean"] for row in rd["table"]][:3] == [10.0, 10.0, 20.0]  # index T - k
