"""report.json and REPORT.md (reproduce.report): Table 4 through the one rule."""

from __future__ import annotations


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
