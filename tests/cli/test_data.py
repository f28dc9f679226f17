"""`ddpm data verify SRC`: the unreadable files of a data source, named."""

from __future__ import annotations

import os


# ------------------------------------------------------------------------- 15: non-UTF-8 file names
def test_data_verify_reports_a_file_whose_name_is_not_utf8(tmp_path, monkeypatch):
    import io
    import sys

    from ddpmkit.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    Image.new("L", (8, 8)).save(folder / "good.png")
    with open(os.path.join(os.fsencode(folder), b"bad\xff.png"), "wb") as f:
        f.write(b"not a png")
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")  # a strict UTF-8 stdout
    monkeypatch.setattr(sys, "stdout", out)
    code = main(["data", "verify", str(folder), "--workers", "1"])
    out.flush()
    text = out.buffer.getvalue().decode("utf-8")
    assert code == 1, text
    assert "bad\\xff.png: " in text and "1 unreadable" in text
