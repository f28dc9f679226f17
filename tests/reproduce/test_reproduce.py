"""`ddpm reproduce digits`'s output: the deviations listed once, t labelled 0-based as `ddpm figure` does."""

from __future__ import annotations

import json

import pytest

from ddpmkit.reproduce import reproduce_digits
from ddpmkit.reproduce.plan import ReproduceSizes

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ReproduceSizes(name="tiny", smoke=True, steps=2, num_timesteps=10, bpd_examples=4, bpd_batch=4,
                      t_chunk=5, num_samples=8, recon_examples=1, progressive_examples=1, unet_ch=32)


def test_deviations_once_and_t_zero_based(tmp_path, capsys, monkeypatch):
    import ddpmkit.images as images

    labels: dict[str, list[str]] = {}
    save = images.save_image_grid

    def recording(grid, path, **kw):
        labels[path.name] = kw.get("col_labels")
        return save(grid, path, **kw)

    monkeypatch.setattr(images, "save_image_grid", recording)
    reproduce_digits(tmp_path / "r", sizes=TINY, progress=False)
    out = capsys.readouterr().out
    assert out.count("deviations from the paper's recipe") == 1, out
    prog = labels["progressive_generation.png"]
    assert prog[0] == "t = 9" and prog[-1] == "t = 0"  # ddpm figure's 0-based t, T = 10
    assert "t = 9\nx_t" in labels["reconstructions.png"]
    fig = json.loads((tmp_path / "r" / "report.json").read_text())["figures_stage"]
    assert fig["reconstruction_ts"][-1] == 9 and "9" in fig["reconstruction_rmse"]
