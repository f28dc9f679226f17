"""Kill -9 a tiny run at evenly spread moments (mid-step, during checkpoint writes, pruning
and the final model write); ``--resume auto`` must then end bit-identical to an uninterrupted run:
every logged loss, the checkpoint's model / EMA / optimiser, RUN/model and RUN/model_raw, and
``--keep-last`` still bounding the checkpoints on disk. Dropout and data-loader workers are on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import assert_states_equal, cli_args, final_state, metric_losses, tiny_overrides

from ddpmkit import checkpoint as ckpt
from ddpmkit.config import apply_overrides, train_preset
from ddpmkit.data import load_digits_uint8
from ddpmkit.train import train

LAUNCHER = Path(__file__).with_name("kill_launcher.py")
STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    npz = root / "tiny.npz"
    np.savez(npz, load_digits_uint8("train")[0][:40])
    over = tiny_overrides(npz, steps=STEPS, checkpoint_every=EVERY, keep_last=1, num_workers=1)
    straight = train(apply_overrides(train_preset("digits"), over), root / "straight", progress=False)
    assert straight.exit_code == 0
    events = _launch(root / "dry", over, -1, root / "dry.log")
    assert events.returncode == 0, events.stdout
    names = [line.split(" ", 2)[1:] for line in (root / "dry.log").read_text().splitlines()]
    return root, over, names


def _launch(run: Path, over: dict[str, str], kill_at: int, log: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(LAUNCHER), str(kill_at), str(log), "--", "--output-dir", str(run),
           "--resume", "auto", "--no-progress", *cli_args(over)]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def kill_points(names: list[list[str]], count: int) -> list[int]:
    """``count`` event numbers evenly spread over the run, plus the first of each kind of danger."""
    n = len(names)
    spread = {int(round(x)) for x in np.linspace(1, n, count)}
    def first(pred):
        return next(i + 1 for i, (kind, *arg) in enumerate(names) if pred(kind, arg[0] if arg else ""))
    last_model = max(i + 1 for i, (kind, *arg) in enumerate(names)
                     if kind == "replace" and "model" in arg[-1])
    special = {first(lambda k, a: k == "checkpoint-file"), first(lambda k, a: k == "rmtree" and "step-" in a),
               _mid_prune(names), last_model,
               first(lambda k, a: k == "rename" and "checkpoints" in a)}
    return sorted(spread | special)


def _mid_prune(names: list[list[str]]) -> int:
    """The second unlink inside the first prune of a checkpoint: a half-deleted checkpoint."""
    start = next(i for i, (kind, *arg) in enumerate(names) if kind == "rmtree" and "step-" in arg[-1])
    return [i + 1 for i, (kind, *_) in enumerate(names) if kind == "unlink" and i > start][1]


def _check_kill_and_resume(root: Path, over: dict[str, str], kill_at: int) -> None:
    # a fresh folder per call: the worst-moment tests kill at some of the same events in this module
    run = Path(tempfile.mkdtemp(prefix=f"cut-{kill_at}-", dir=root))
    killed = _launch(run, over, kill_at, run.with_name(run.name + ".log"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    resumed = train(apply_overrides(train_preset("digits"), over), run, resume="auto", progress=False)
    assert resumed.exit_code == 0 and resumed.step == STEPS
    straight = root / "straight"
    assert metric_losses(run) == metric_losses(straight), f"kill at event {kill_at}"
    assert_states_equal(final_state(run), final_state(straight))
    for name in ("model", "model_raw"):
        a, b = load_file(run / name / "model.safetensors"), load_file(straight / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}, kill at {kill_at}"
        assert json.loads((run / name / "config.json").read_text()) == json.loads(
            (straight / name / "config.json").read_text())
    leftovers = sorted(p.name for p in ckpt.checkpoint_dir(run).iterdir())
    assert leftovers == [f"step-{STEPS:09d}"], f"kill at {kill_at}: {leftovers}"  # keep_last 1 still holds
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp", ".old", ".del"))]


def test_kill_points_cover_the_dangerous_moments(setup):
    _, _, names = setup
    kinds = {k for k, *_ in names}
    assert {"step", "checkpoint-file", "rmtree", "replace", "rename"} <= kinds
    assert len(kill_points(names, 20)) >= 20


@pytest.mark.parametrize("which", ["final model write", pytest.param("pruning", marks=pytest.mark.slow)])
def test_kill_at_the_worst_moments_then_resume_is_bit_identical(setup, which):
    root, over, names = setup
    points = kill_points(names, 0)
    last_model = max(i + 1 for i, (kind, *arg) in enumerate(names)
                     if kind == "replace" and "model" in arg[-1])
    _check_kill_and_resume(root, over, last_model if which == "final model write" else _mid_prune(names))
    assert points


@pytest.mark.slow
def test_kill_anywhere_then_resume_is_bit_identical(setup):
    root, over, names = setup
    for kill_at in kill_points(names, 20):
        _check_kill_and_resume(root, over, kill_at)


# ------------------------------------------------------------------------- a checkpoint step's grid
@pytest.fixture(scope="module")
def grid_setup(tmp_path_factory):
    """An uninterrupted run (under the launcher, never killed) with a grid at every checkpoint step."""
    root = tmp_path_factory.mktemp("grid-crash")
    npz = root / "tiny.npz"
    np.savez(npz, load_digits_uint8("train")[0][:40])
    over = tiny_overrides(npz, steps=STEPS, checkpoint_every=EVERY, sample_every=EVERY, num_samples=1,
                          keep_last=1, **{"diffusion.num_timesteps": 20})
    straight = _launch(root / "straight", over, -1, root / "straight.log")
    assert straight.returncode == 0, straight.stdout
    return root, over


def _files(run: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob(pattern))}


@pytest.mark.parametrize("moment", ["inside the grid write", "just after the checkpoint"])
def test_a_kill_at_a_grid_step_keeps_its_grid_after_resume(grid_setup, moment):
    """Killed as step 2's grid is renamed into place (its temp file written), or once step 2's
    checkpoint is complete and before its grid begins: ``--resume auto`` continues from that
    checkpoint, writes the missing grid, removes the temp file, and ends as the uninterrupted run
    did: the same grids and model files, byte for byte."""
    root, over = grid_setup
    run = root / moment.replace(" ", "-")
    grid_rename = f"replace:{Path('samples') / '.tmp-step-'}{EVERY:09d}"
    kill_at = grid_rename if moment.startswith("inside") else "grid"
    killed = _launch(run, over, kill_at, root / f"{run.name}.log")
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    assert ckpt.latest_checkpoint(run).name == f"step-{EVERY:09d}"
    assert not (run / "samples" / f"step-{EVERY:09d}.png").exists()  # the grid the kill cut short
    resumed = train(apply_overrides(train_preset("digits"), over), run, resume="auto", progress=False)
    assert resumed.exit_code == 0 and resumed.step == STEPS
    straight = root / "straight"
    grids = {f"samples/step-{s:09d}.png" for s in range(EVERY, STEPS + 1, EVERY)}
    assert _files(run, "*.png").keys() == grids
    assert _files(run, "*.png") == _files(straight, "*.png")
    assert _files(run, "*.safetensors") == _files(straight, "*.safetensors")
    assert not [str(p.relative_to(run)) for p in run.rglob(".*") if p.name != ".lock"]
