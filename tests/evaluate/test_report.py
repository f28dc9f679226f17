"""The report card of a training run (evaluate.report): the sample grid enlarged."""

from __future__ import annotations

import numpy as np
from PIL import Image


def test_report_card_shows_the_sample_grid_enlarged(tmp_path):
    from ddpmkit.evaluate.report import build_report

    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text('{"preset": "digits", "batch_size": 4, "steps": 1}')
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (42, 42, 3), dtype=np.uint8)  # 16 digits at 8 px, scale 1
    Image.fromarray(small).save(run / "samples" / "step-000000001.png")
    build_report(run)
    got = np.asarray(Image.open(run / "report" / "samples.png"))
    s = -(-512 // 42)
    assert np.array_equal(got, small.repeat(s, axis=0).repeat(s, axis=1))  # nearest neighbour, >= 512 px
    big = rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)
    Image.fromarray(big).save(run / "samples" / "step-000000002.png")
    build_report(run)
    assert np.array_equal(np.asarray(Image.open(run / "report" / "samples.png")), big)  # wide already
