"""`ddpm figure KIND MODEL`: each figure file labelled, wide enough to read, of the expected size."""

from __future__ import annotations

import pytest
from PIL import Image
from stand_ins import _assert_labelled

from ddpmkit.cli import main


def test_progressive_figure_file_is_labelled_and_wide(model_dir, tmp_path):
    out = tmp_path / "p.png"
    assert main(["figure", "progressive", str(model_dir), "--n", "2", "--snapshots", "3",
                 "--out", str(out)]) == 0
    im = Image.open(out)
    assert im.width >= 512 + 20 and im.height > 7 * (4 * 10 + 2)  # >= 512 px of grid, plus the labels
    assert im.getpixel((0, 0)) == (255, 255, 255)  # the label band


@pytest.mark.parametrize(
    "kind,extra,cols,rows,row_labels",
    [
        ("progressive", ["--n", "2", "--snapshots", "3"], 3, 4, True),
        ("reconstruct", ["--data", "digits", "--n", "2", "--t", "3,5"], 5, 2, False),
        ("interpolate", ["--data", "digits", "--n", "2", "--t", "2,5", "--lambdas", "6"], 8, 4, True),
        ("shared-xt", ["--n", "2", "--t", "1,5"], 3, 2, True),
    ],
)
def test_every_figure_is_labelled_and_wide(model_dir, tmp_path, kind, extra, cols, rows, row_labels):
    out = tmp_path / f"{kind}.png"
    assert main(["figure", kind, str(model_dir), "--out", str(out), *extra]) == 0
    _assert_labelled(out, cols, rows, row_labels=row_labels)
