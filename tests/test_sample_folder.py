"""The sample folder (`ddpm sample`): its grid legible, a rerun compares the model, torn PNGs redone,
a folder in use refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from json_inputs import FAST, json_files, one_line, same_json
from PIL import Image

from ddpmkit import sample_folder as folder
from ddpmkit.cli import main
from ddpmkit.config import apply_overrides, train_preset
from ddpmkit.diffusion import DiffusionConfig
from ddpmkit.sample_folder import default_output_dir, ema_warning
from ddpmkit.schema import problem
from ddpmkit.train import train


def test_sample_grid_is_legible_and_batch_size_chosen(model_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(model_dir), "--n", "5", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "batch 5;" in text and text.splitlines()[-2].endswith("images/s")
    assert Image.open(out / "grid.png").width >= 512


def _tiny_model(path: Path, seed: int) -> Path:
    from ddpmkit.nn import UNet, UNetConfig

    torch.manual_seed(seed)
    net = UNet(config=UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1,),
                                 num_res_blocks=1, attn_resolutions=()))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.save(path, diffusion=DiffusionConfig(num_timesteps=10, beta_start=0.01, beta_end=0.4))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return _tiny_model(root / "a", 0), _tiny_model(root / "b", 1)


def _sample(model: Path, out: Path, n: int = 3) -> int:
    return main(["sample", str(model), "--n", str(n), "--output-dir", str(out), "--device", "cpu"])


def test_another_model_into_the_same_folder_is_refused(models, tmp_path, capsys):
    a, b = models
    out = tmp_path / "s"
    assert _sample(a, out) == 0
    moved = tmp_path / "a-moved"  # the same model under another path is still the same model
    shutil.copytree(a, moved)
    assert _sample(moved, out, n=4) == 0
    assert _sample(b, out, n=5) == 2  # different weights, same settings
    err = capsys.readouterr().err
    assert "model" in err and "another --output-dir" in err
    assert len(list(out.glob("[0-9]*.png"))) == 4


def test_a_torn_sample_png_is_redone(models, tmp_path, capsys):
    a, _ = models
    out = tmp_path / "s"
    assert _sample(a, out) == 0
    want = (out / "000001.png").read_bytes()
    (out / "000001.png").write_bytes(b"")  # a power cut after the rename, before the data reached disk
    (out / "000002.png").write_bytes(want[:20])
    assert _sample(a, out) == 0
    captured = capsys.readouterr()
    assert "000001.png" in captured.err and "000002.png" in captured.err
    assert (out / "000001.png").read_bytes() == want
    with np.load(next(out.glob("samples_*.npz"))) as f:
        assert f["arr_0"].shape == (3, 8, 8, 1)


def test_an_unwritable_sample_folder_is_a_one_line_error(models, tmp_path, capsys):
    a, _ = models
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _sample(a, blocker / "s") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to" in err


_HOLDER = """
import sys, time
from ddpmkit.fileio import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # a subprocess start: ~10 s under load
def test_a_sample_folder_in_use_is_refused(models, tmp_path, capsys):
    import os

    a, _ = models
    out = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _sample(a, out) == 2
        assert f"{holder.pid}@" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert _sample(a, out) == 0


TINY = {"unet.ch": "32", "unet.ch_mult": "1", "unet.num_res_blocks": "1", "unet.attn_resolutions": "",
        "diffusion.num_timesteps": "20", "batch_size": "8", "steps": "6", "checkpoint_every": "100",
        "sample_every": "1000", "num_samples": "0", "ema_decay": "0.99"}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """6 steps at EMA 0.99: 0.99^6 = 94% of the initial weights are still in the EMA."""
    run = tmp_path_factory.mktemp("runs") / "short"
    train(apply_overrides(train_preset("digits"), TINY), run, progress=False)
    return run


@pytest.mark.usefixtures("one_thread")
def test_a_young_ema_is_warned_about_in_one_line(short_run, tmp_path, capsys):
    assert main(["sample", str(short_run), "--n", "1", "--steps", "2", "--output-dir",
                 str(tmp_path / "a")]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(err) == 1 and "94% of the initial random weights after 6 steps" in err[0]
    assert "--no-ema" in err[0]
    assert main(["sample", str(short_run), "--n", "1", "--steps", "2", "--no-ema", "--output-dir",
                 str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_no_warning_with_warm_up(tmp_path):
    run = tmp_path / "warm"
    train(apply_overrides(train_preset("digits"), {**TINY, "ema_warmup": "true"}), run, progress=False)
    assert ema_warning(run) is None


@pytest.mark.usefixtures("one_thread")
def test_the_default_folder_is_inside_the_run(short_run, capsys):
    assert main(["sample", str(short_run), "--n", "2", "--sampler", "ddim", "--steps", "4"]) == 0
    out = short_run / "samples" / "ddim-4"
    assert (out / "sampling.json").is_file() and (out / "samples_2x8x8x1.npz").is_file()
    assert str(out) in capsys.readouterr().out
    assert default_output_dir(short_run, sampler="ddim", steps=4, eta=0.5, seed=3, ema=False) == \
        short_run / "samples" / "ddim-4-eta0.5-seed3-raw"
    assert default_output_dir(short_run).name == "ddpm-20"  # all T steps


@pytest.mark.usefixtures("one_thread")
def test_a_model_folder_needs_an_output_dir(tiny_model_dir, capsys):
    assert main(["sample", str(tiny_model_dir), "--n", "1"]) == 2
    assert "pass --output-dir DIR" in capsys.readouterr().err


def _sample_with(model: Path, out: Path, *extra: str, n: int = 2) -> int:
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
    assert _sample_with(tiny_model_dir, out) == 0
    other = _with_diffusion(tiny_model_dir, tmp_path / "other", **changes)
    capsys.readouterr()
    assert _sample_with(other, out, n=3) == 2
    err = capsys.readouterr().err
    assert "other settings (diffusion" in err and "another --output-dir" in err
    assert len(list(out.glob("[0-9]*.png"))) == 2
    assert json.loads((out / "sampling.json").read_text())["diffusion"]["beta_start"] == 0.01


def test_the_same_diffusion_is_accepted(tiny_model_dir, tmp_path):
    out = tmp_path / "s"
    assert _sample_with(tiny_model_dir, out) == 0
    assert _sample_with(tiny_model_dir, out, n=3) == 0
    assert len(list(out.glob("[0-9]*.png"))) == 3


def test_a_folder_from_before_the_diffusion_was_recorded_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sample_with(tiny_model_dir, out) == 0
    settings = json.loads((out / "sampling.json").read_text())
    del settings["diffusion"]
    (out / "sampling.json").write_text(json.dumps(settings))
    capsys.readouterr()
    assert _sample_with(tiny_model_dir, out, n=3) == 2
    assert "diffusion: None there" in capsys.readouterr().err


def test_a_sampling_json_of_the_wrong_shape_is_one_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sample_with(tiny_model_dir, out) == 0
    (out / "sampling.json").write_text('{"sampler": 3}')
    capsys.readouterr()
    assert _sample_with(tiny_model_dir, out, n=3) == 2
    err = capsys.readouterr().err
    assert "sampling.json" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def made_settings(tiny_model_dir, tmp_path_factory):
    """The sampling.json that ``ddpm sample`` wrote for the tiny model (DDIM, so timesteps and eta)."""
    out = tmp_path_factory.mktemp("made") / "s"
    ddim = ("--sampler", "ddim", "--timesteps", "list:0,3,7", "--eta", "0.5")
    assert _sample_with(tiny_model_dir, out, *ddim) == 0
    return json.loads((out / "sampling.json").read_text())


@FAST
@given(data=st.data())
def test_a_sampling_json_is_matched_or_refused_in_one_line(made_settings, tmp_path_factory, data):
    """Whatever DIR/sampling.json holds, a rerun with the settings it was made with either goes on
    (only when the file states those settings, of their JSON types: ``true`` is not 1) or is a
    one-line ValueError; an evaluation records the file only when it is of the schema."""
    content = data.draw(json_files(made_settings))
    out = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    (out / folder.SETTINGS_NAME).write_bytes(content)
    try:
        folder._check_settings(out, made_settings)
    except ValueError as e:
        event("refused")
        one_line(e)
        assert str(out) in str(e)
    else:
        event("kept")
        old = json.loads(content)
        for k in folder._SETTINGS_KEYS:  # the diffusion and gamma objects are compared whole, by value
            same = old.get(k) == made_settings.get(k) if k in ("diffusion", "gamma") else same_json(
                old.get(k), made_settings.get(k))
            assert same, (k, old.get(k))
        assert (out / folder.SETTINGS_NAME).read_bytes() == content  # kept as it was
    recorded = folder.samples_provenance(out, np.zeros((1, 8, 8, 1), np.uint8))["sampling"]
    assert recorded is None or problem(recorded, folder._SETTINGS_SCHEMA) is None, recorded
