"""`load_model` on a run still training (no model/ yet): "no model yet", and what finishes it."""

from __future__ import annotations

import shutil

import pytest

from ddpmkit.cli import EXIT_USER_ERROR, main
from ddpmkit.config import apply_overrides, train_preset
from ddpmkit.train import EventKind, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"unet.ch": "32", "unet.ch_mult": "1", "unet.num_res_blocks": "1", "unet.attn_resolutions": "",
        "diffusion.num_timesteps": "20", "batch_size": "8", "steps": "6", "checkpoint_every": "2",
        "sample_every": "1000", "num_samples": "0"}


class _Stop(Exception):
    pass


def _train_until(run, step: int) -> None:
    """Train and stop at ``step`` as if the trainer were still running there."""
    def stop(event):
        if event.kind is EventKind.UPDATE and event.step == step:
            raise _Stop

    with pytest.raises(_Stop):
        train(apply_overrides(train_preset("digits"), TINY), run, progress=False, callbacks=[stop])


def _sample_error(capsys, run, tmp_path) -> str:
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "1", "--output-dir", str(tmp_path / "s")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "no model yet" in err and f"ddpm train --output-dir {run} --resume auto" in err, err
    assert "neither our model format" not in err
    return err


def test_before_the_first_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    _train_until(run, 1)  # checkpoint_every 2: nothing saved yet
    assert not (run / "model").exists()
    assert "no checkpoint yet" in _sample_error(capsys, run, tmp_path)


def test_after_a_checkpoint_without_its_model(tmp_path, capsys):
    run = tmp_path / "run"
    _train_until(run, 3)
    shutil.rmtree(run / "model")  # killed between the checkpoint's rename and the model's write
    shutil.rmtree(run / "model_raw")
    assert "checkpoints/step-000000002 (step 2)" in _sample_error(capsys, run, tmp_path)
