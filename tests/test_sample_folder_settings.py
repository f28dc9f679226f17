"""Issue 27.4: a sample folder's sampling.json records every setting that changes the samples (the
diffusion included), and a later run with any of them changed is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ddpmkit.cli import main


def _sample(model: Path, out: Path, *extra: str, n: int = 2) -> int:
    return main(["sample", str(model), "--n", str(n), "--output-dir", str(out), "--device", "cpu", *extra])


def _with_diffusion(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["diffusion"].update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes", [{"var_type": "fixedsmall"}, {"beta_end": 0.3}])
def test_the_same_weights_with_another_diffusion_are_refused(tiny_model_dir, tmp_path, capsys, changes):
    out = tmp_path / "s"
    assert _sample(tiny_model_dir, out) == 0
    other = _with_diffusion(tiny_model_dir, tmp_path / "other", **changes)
    capsys.readouterr()
    assert _sample(other, out, n=3) == 2
    err = capsys.readouterr().err
    assert "other settings (diffusion" in err and "another --output-dir" in err
    assert len(list(out.glob("[0-9]*.png"))) == 2
    assert json.loads((out / "sampling.json").read_text())["diffusion"]["beta_start"] == 0.01


def test_the_same_diffusion_is_accepted(tiny_model_dir, tmp_path):
    out = tmp_path / "s"
    assert _sample(tiny_model_dir, out) == 0
    assert _sample(tiny_model_dir, out, n=3) == 0
    assert len(list(out.glob("[0-9]*.png"))) == 3


def test_a_folder_from_before_the_diffusion_was_recorded_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sample(tiny_model_dir, out) == 0
    settings = json.loads((out / "sampling.json").read_text())
    del settings["diffusion"]
    (out / "sampling.json").write_text(json.dumps(settings))
    capsys.readouterr()
    assert _sample(tiny_model_dir, out, n=3) == 2
    assert "diffusion: None there" in capsys.readouterr().err


def test_a_sampling_json_of_the_wrong_shape_is_one_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sample(tiny_model_dir, out) == 0
    (out / "sampling.json").write_text('{"sampler": 3}')
    capsys.readouterr()
    assert _sample(tiny_model_dir, out, n=3) == 2
    err = capsys.readouterr().err
    assert "sampling.json" in err and "Traceback" not in err
