"""sample_folder.py's defaults for a training run: the output folder inside the run, and a one-line
warning when the EMA still holds much of the initial weights (naming --no-ema)."""

from __future__ import annotations

import pytest

from ddpmkit.cli import main
from ddpmkit.config import apply_overrides, train_preset
from ddpmkit.sample_folder import default_output_dir, ema_warning
from ddpmkit.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"unet.ch": "32", "unet.ch_mult": "1", "unet.num_res_blocks": "1", "unet.attn_resolutions": "",
        "diffusion.num_timesteps": "20", "batch_size": "8", "steps": "6", "checkpoint_every": "100",
        "sample_every": "1000", "num_samples": "0", "ema_decay": "0.99"}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """6 steps at EMA 0.99: 0.99^6 = 94% of the initial weights are still in the EMA."""
    run = tmp_path_factory.mktemp("runs") / "short"
    train(apply_overrides(train_preset("digits"), TINY), run, progress=False)
    return run


def test_a_young_ema_is_warned_about_in_one_line(short_run, tmp_path, capsys):
    assert main(["sample", str(short_run), "--n", "1", "--steps", "2", "--output-dir",
                 str(tmp_path / "a")]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(err) == 1 and "94% of the initial random weights after 6 steps" in err[0]
    assert "--no-ema" in err[0]
    assert main(["sample", str(short_run), "--n", "1", "--steps", "2", "--no-ema", "--output-dir",
                 str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_no_warning_with_warm_up(tmp_path):
    run = tmp_path / "warm"
    train(apply_overrides(train_preset("digits"), {**TINY, "ema_warmup": "true"}), run, progress=False)
    assert ema_warning(run) is None


def test_the_default_folder_is_inside_the_run(short_run, capsys):
    assert main(["sample", str(short_run), "--n", "2", "--sampler", "ddim", "--steps", "4"]) == 0
    out = short_run / "samples" / "ddim-4"
    assert (out / "sampling.json").is_file() and (out / "samples_2x8x8x1.npz").is_file()
    assert str(out) in capsys.readouterr().out
    assert default_output_dir(short_run, sampler="ddim", steps=4, eta=0.5, seed=3, ema=False) == \
        short_run / "samples" / "ddim-4-eta0.5-seed3-raw"
    assert default_output_dir(short_run).name == "ddpm-20"  # all T steps


def test_a_model_folder_needs_an_output_dir(tiny_model_dir, capsys):
    assert main(["sample", str(tiny_model_dir), "--n", "1"]) == 2
    assert "pass --output-dir DIR" in capsys.readouterr().err
