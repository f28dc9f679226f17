"""The training loop end to end on tiny data: overfitting, bit-identical resume after kill -9 and
SIGTERM (at an epoch boundary and mid-epoch), NaN guard, run directory contents, CLI resolution."""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import (
    Boom,
    _copy,
    _resume,
    _steps,
    assert_states_equal,
    cli_args,
    config,
    final_state,
    inject_nonfinite,
    metric_losses,
    named,
    raise_at,
    tiny_config,
    tiny_overrides,
)

from ddpmkit import checkpoint as ckpt
from ddpmkit.cli import build_parser
from ddpmkit.cli.train import resolve_config
from ddpmkit.config import (
    apply_overrides,
    train_preset,
)
from ddpmkit.data import load_digits_uint8
from ddpmkit.train import (
    EXIT_NONFINITE,
    EventKind,
    TrainEvent,
    batch_indices,
    epoch_permutation,
    learning_rate,
    train,
)

NUM_IMAGES = 40  # the tiny data set: the first 40 training digits


# ------------------------------------------------------------------------- pure functions
def test_data_order_is_a_pure_function_covering_each_epoch_once():
    n, b = 10, 4
    stream = np.concatenate([batch_indices(s, batch_size=b, num_examples=n, seed=3) for s in range(5)])  # 20
    np.testing.assert_array_equal(stream[:10], epoch_permutation(3, 0, n))
    np.testing.assert_array_equal(stream[10:], epoch_permutation(3, 1, n))
    assert sorted(stream[:10]) == list(range(10)) and not np.array_equal(stream[:10], stream[10:])
    np.testing.assert_array_equal(batch_indices(2, batch_size=b, num_examples=n, seed=3), stream[8:12])


def test_learning_rate_warmup_is_the_authors():
    c = apply_overrides(train_preset("cifar10"), {})
    assert [learning_rate(c, s) for s in (0, 2500, 5000, 9000)] == [0.0, 1e-4, 2e-4, 2e-4]


# ------------------------------------------------------------------------- end to end
def test_overfits_one_image(tmp_path):
    """With a single training image the Bayes-optimal eps-predictor has zero loss. From ~1 at init
    (the output layer starts near zero, so the loss is E[eps^2] = 1) the loss of the last 20 of 150
    steps must fall below 0.15 (measured: ~0.09)."""
    one = tmp_path / "one.npz"
    np.savez(one, load_digits_uint8("train")[0][:1])
    c = tiny_config(one, **{"unet.dropout": 0.0, "random_flip": "false", "steps": 150, "batch_size": 16,
                            "checkpoint_every": 150, "warmup_steps": 10, "lr": 3e-3})
    result = train(c, tmp_path / "run", progress=False)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert result.exit_code == 0 and len(losses) == 150
    assert np.mean(losses[:5]) > 0.8
    assert np.mean(losses[-20:]) < 0.15, np.mean(losses[-20:])


def test_run_directory_contents_and_summary(tmp_path, tiny_npz, capsys):
    c = tiny_config(tiny_npz, steps=3, num_samples=4, sample_every=2, **{"diffusion.num_timesteps": 10})
    run = tmp_path / "run"
    result = train(c, run, progress=False)
    out = capsys.readouterr().out
    assert result.exit_code == 0
    assert "deviations from the paper's recipe:" in out and "  - lr 0.001 (paper's cifar10: 0.0002)" in out
    assert f"wrote sample grid {run / 'samples' / 'step-000000003.png'}" in out
    assert json.loads((run / "config.json").read_text()) == c.to_dict()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000000002.png", "step-000000003.png"]
    from PIL import Image

    with Image.open(run / "samples" / "step-000000003.png") as im:  # 2x2 grid of 8x8 images, padding 2,
        assert im.size == ((2 * 8 + 3 * 2) * 24, (2 * 8 + 3 * 2) * 24)  # x24: the first factor >= 512 px
    assert sorted(metric_losses(run)) == [1, 2, 3]
    # RUN/model = EMA weights, RUN/model_raw = raw weights, in the U-Net's model folder format
    from ddpmkit.models import load_model

    ema = load_model(run)
    raw = load_model(run, ema=False)
    assert ema.diffusion.num_timesteps == 10
    for k, v in result.ema.state_dict().items():
        assert torch.equal(ema.unet.state_dict()[k], v)
    for k, v in result.model.state_dict().items():
        assert torch.equal(raw.unet.state_dict()[k], v)
    assert not all(torch.equal(result.ema.state_dict()[k], v) for k, v in result.model.state_dict().items())


def test_existing_run_needs_resume(tmp_path, tiny_npz):
    c = tiny_config(tiny_npz, steps=3)
    train(c, tmp_path, progress=False)
    with pytest.raises(ValueError, match="--resume auto"):
        train(c, tmp_path, progress=False)
    with pytest.raises(ValueError, match="differ from the checkpoint's"):
        train(tiny_config(tiny_npz, steps=5, lr=5e-4), tmp_path, resume="auto", progress=False)


def _start_cli(run: Path, over: dict[str, str], pause_after: int) -> subprocess.Popen:
    """`ddpm train` through the test-only launcher, idling after step ``pause_after`` until a signal."""
    launcher = Path(__file__).with_name("kill_launcher.py")
    cmd = [sys.executable, str(launcher), "-1", os.devnull, "--pause-after", str(pause_after), "--",
           "--output-dir", str(run), "--no-progress", *cli_args(over)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        path = run / "metrics.jsonl"
        if path.is_file() and any(json.loads(x)["step"] == step for x in path.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged")


@pytest.mark.parametrize("batch, steps, every, pause, position", [
    pytest.param(20, 8, 4, 5, "epoch boundary", marks=pytest.mark.slow),  # resumes at position 80 = 2 epochs
    (16, 6, 3, 4, "mid-epoch"),  # resumes from step 3: position 48, 8 images into epoch 1
])
def test_kill_9_then_resume_auto_equals_an_uninterrupted_run(tmp_path, tiny_npz, batch, steps, every, pause,
                                                               position):
    over = tiny_overrides(tiny_npz, batch_size=batch, steps=steps, checkpoint_every=every)
    straight = train(apply_overrides(train_preset("digits"), over), tmp_path / "straight", progress=False)
    assert straight.exit_code == 0
    run = tmp_path / "cut"
    proc = _start_cli(run, over, pause_after=pause)
    try:
        _wait_for_step(run, proc, pause)  # a step past the last checkpoint is done and logged
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ckpt.latest_checkpoint(run).name == f"step-{every:09d}"
    assert (every * batch) % NUM_IMAGES == (0 if position == "epoch boundary" else 8)
    resumed = train(apply_overrides(train_preset("digits"), over), run, resume="auto", progress=False)
    assert resumed.exit_code == 0 and sorted(resumed.losses) == list(range(every + 1, steps + 1))
    assert metric_losses(run) == metric_losses(tmp_path / "straight")  # every step's loss, bit for bit
    assert all(resumed.losses[s] == straight.losses[s] for s in resumed.losses)
    assert_states_equal(final_state(run), final_state(tmp_path / "straight"))
    for name in ("model", "model_raw"):
        a = load_file(run / name / "model.safetensors")
        b = load_file(tmp_path / "straight" / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_exits_143_and_resumes_identically(tmp_path, tiny_npz):
    over = tiny_overrides(tiny_npz, steps=6, checkpoint_every=100)
    straight = train(apply_overrides(train_preset("digits"), over), tmp_path / "straight", progress=False)
    run = tmp_path / "cut"
    proc = _start_cli(run, over, pause_after=2)
    try:
        _wait_for_step(run, proc, 2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out
    assert "stopped by signal 15 after step 2; checkpoint saved" in out
    assert ckpt.latest_checkpoint(run).name == "step-000000002"  # saved although checkpoint_every is 100
    resumed = train(apply_overrides(train_preset("digits"), over), run, resume="auto", progress=False)
    assert resumed.exit_code == 0
    assert metric_losses(run) == metric_losses(tmp_path / "straight")
    assert_states_equal(final_state(run), final_state(tmp_path / "straight"))
    assert straight.step == resumed.step == 6


def test_injected_nan_skips_updates_and_stops_after_the_limit(tmp_path, tiny_npz, monkeypatch):
    reference = train(tiny_config(tiny_npz, steps=3), tmp_path / "ref", progress=False)
    c = tiny_config(tiny_npz, steps=10, max_nonfinite=3)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        inject_nonfinite(monkeypatch, lambda step: step >= 3)
        result = train(c, tmp_path / "nan", progress=False)
    assert result.exit_code == EXIT_NONFINITE != 0
    assert result.step == 6  # updates 4, 5, 6 were skipped; the third in a row stops the run
    for got, want in ((result.model, reference.model), (result.ema, reference.ema)):
        for k, v in want.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), k
    assert ckpt.latest_checkpoint(tmp_path / "nan").name == "step-000000003"  # the last good one, untouched
    assert_states_equal(final_state(tmp_path / "nan"), final_state(tmp_path / "ref"))


def test_a_single_nan_is_skipped_and_training_goes_on(tmp_path, tiny_npz, monkeypatch):
    c = tiny_config(tiny_npz, steps=4, max_nonfinite=2)
    with pytest.warns(RuntimeWarning, match="1 in a row"):
        inject_nonfinite(monkeypatch, lambda step: step == 1)
        result = train(c, tmp_path, progress=False)
    assert result.exit_code == 0 and sorted(result.losses) == [1, 3, 4]


# ------------------------------------------------------------------------- CLI
def _parse(*argv):
    return build_parser().parse_args(["train", *argv])


def test_cli_defaults_to_the_digits_preset():
    config, run = resolve_config(_parse())
    assert config == train_preset("digits") and run == Path("runs/digits")
    assert config.data == "digits"


def test_cli_flags_override_set_which_overrides_the_preset(tmp_path):
    config, run = resolve_config(_parse("--preset", "cifar10", "--set", "lr=1e-3", "--lr", "5e-5", "--set",
                                        "unet.dropout=0", "--steps", "10", "-o", str(tmp_path)))
    assert (config.lr, config.unet.dropout, config.steps, run) == (5e-5, 0.0, 10, tmp_path)
    assert config.batch_size == 128 and config.preset == "cifar10"


def test_cli_resume_without_preset_takes_the_checkpoints_config(tmp_path, tiny_npz):
    c = tiny_config(tiny_npz, steps=3)
    train(c, tmp_path, progress=False)
    config, _ = resolve_config(_parse("-o", str(tmp_path), "--resume", "auto", "--steps", "9"))
    assert config == apply_overrides(c, {"steps": 9})


def test_cli_user_errors_exit_2(tmp_path, capsys):
    from ddpmkit.cli import main

    assert main(["train", "--set", "unet.nope=1", "-o", str(tmp_path)]) == 2
    assert "unknown config key 'unet.nope'" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing"), "-o", str(tmp_path / "r")]) == 2


def test_worker_processes_deliver_the_same_batches(tiny_npz):
    from ddpmkit.data import open_source
    from ddpmkit.distributed import DistInfo
    from ddpmkit.training.data import batch_stream as _batch_stream

    ds = open_source(str(tiny_npz), resolution=8, channels=1)
    c = tiny_config(tiny_npz, steps=5)
    info = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    plain = list(_batch_stream(ds, c, info, start=2))
    workers = list(_batch_stream(ds, apply_overrides(c, {"num_workers": 2}), info, start=2))
    assert len(plain) == len(workers) == 3
    for step, (a, b) in enumerate(zip(plain, workers, strict=True), start=2):
        assert torch.equal(a, b)
        idx = batch_indices(step, batch_size=16, num_examples=NUM_IMAGES, seed=c.seed)[8:16]  # rank 1's half
        assert torch.equal(a, ds.get_batch(idx))


def test_a_model_folder_renamed_aside_by_a_kill_is_put_back(tmp_path, tiny_npz):
    c = tiny_config(tiny_npz, steps=3)
    train(c, tmp_path, progress=False)
    expected = load_file(tmp_path / "model" / "model.safetensors")
    os.rename(tmp_path / "model", tmp_path / ".old-model-999")  # killed between the two renames
    (tmp_path / ".tmp-model_raw-999").mkdir()  # and a half-written temp folder
    train(apply_overrides(c, {"steps": 3}), tmp_path, resume="auto", progress=False)
    got = load_file(tmp_path / "model" / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".lock"]


def test_training_steps_skip_the_t_range_check_that_public_calls_keep(tmp_path, tiny_npz, monkeypatch):
    """The range check reads t back (torch.aminmax: a device sync per step on a GPU); the trainer
    draws t in range itself, so its updates make no such call, while a public call still raises."""
    from ddpmkit.diffusion import DiffusionConfig

    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = train(tiny_config(tiny_npz, steps=3, checkpoint_every=100), tmp_path / "run", progress=False)
    assert res.step == 3 and calls == []
    d = DiffusionConfig(num_timesteps=10).build()
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 9\]"):
        d.training_losses(lambda x, t: x, x0, torch.tensor([0, 10]))
    assert calls == [1]


# ------------------------------------------------------------------------- learning rate
def test_lr_used_at_updates_0_1_and_warmup_is_the_authors(tmp_path, noise_npz, rec):
    """lr * min(1, s / warmup) at 0-based update s (the authors' TF code); written out by hand."""
    c = config(noise_npz, steps=5, warmup_steps=4, lr=2e-3)
    train(c, tmp_path, progress=False)
    assert len(rec.lrs) == 5
    assert rec.lrs[0] == 0.0 and rec.lrs[1] == pytest.approx(5e-4, rel=1e-12)
    assert rec.lrs[4] == pytest.approx(2e-3, rel=1e-12)
    assert rec.lrs == pytest.approx([0.0, 5e-4, 1e-3, 1.5e-3, 2e-3], rel=1e-12)


# ------------------------------------------------------------------------- which weights go where
def test_grid_and_model_folder_hold_the_ema_model_raw_the_raw_weights(tmp_path, noise_npz, rec):
    """One update, so the EMA is known in closed form (decay w0 + (1 - decay) w1) and differs from
    w1; a grid mid-run (after step 1) and one at the end; training goes on in train mode."""
    from safetensors.torch import load_file

    c = config(noise_npz, steps=2, sample_every=1, num_samples=4, ema_decay=0.5, lr=1e-2)
    result = train(c, tmp_path, progress=False)
    assert len(rec.sampled) == 2 and all(not training for _, training in rec.sampled)
    assert rec.train_mode == [True, True]  # the step after the mid-run grid too
    assert result.model.training
    final_ema = {k: v.detach() for k, v in result.ema.state_dict().items()}
    raw = {k: v.detach() for k, v in result.model.state_dict().items()}
    grid_weights = rec.sampled[-1][0]
    assert any(not torch.equal(final_ema[k], raw[k]) for k in raw)
    for k in raw:
        assert torch.equal(grid_weights[k], final_ema[k]), k
    folder_ema = load_file(tmp_path / "model" / "model.safetensors")
    folder_raw = load_file(tmp_path / "model_raw" / "model.safetensors")
    for k in raw:
        assert torch.equal(folder_ema[k], final_ema[k].cpu()), k
        assert torch.equal(folder_raw[k], raw[k].cpu()), k
    # the EMA in closed form, from the weights the optimizer held (d = 0.5):
    # grid 1 = d w0 + (1 - d) w1, grid 2 = d grid1 + (1 - d) w2
    w0, w1 = named(result, rec.w0), named(result, rec.w_before[1])
    grid1 = rec.sampled[0][0]
    for k in w0:
        torch.testing.assert_close(grid1[k].double(), 0.5 * w0[k].double() + 0.5 * w1[k].double(),
                                   rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(grid_weights[k].double(), 0.5 * grid1[k].double() + 0.5 * raw[k].double(),
                                   rtol=0, atol=1e-6, msg=k)


# ------------------------------------------------------------------------- learning-rate decay
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_decay_after_the_warmup_is_the_closed_form(tmp_path, noise_npz, rec, schedule):
    lr, lr_min, warmup, steps = 2e-3, 1e-4, 2, 7
    c = config(noise_npz, steps=steps, warmup_steps=warmup, lr=lr, lr_min=lr_min, lr_schedule=schedule)
    train(c, tmp_path, progress=False)
    expected = []
    for s in range(steps):  # 0-based updates
        p = (s - warmup) / (steps - warmup)
        shape = (1 - p) if schedule == "linear" else (1 + math.cos(math.pi * p)) / 2
        expected.append(lr * s / warmup if s < warmup else lr_min + (lr - lr_min) * shape)
    assert expected[:3] == pytest.approx([0.0, 1e-3, 2e-3], rel=1e-12)
    assert rec.lrs == pytest.approx(expected, rel=1e-12)
    assert rec.lrs[-1] > lr_min  # the last update is one step short of the end


def test_constant_lr_after_the_warmup_is_unchanged(tmp_path, noise_npz):
    c = config(noise_npz, steps=10, warmup_steps=3, lr=2e-3)
    assert [learning_rate(c, s) for s in range(3, 10)] == [2e-3] * 7


# ------------------------------------------------------------------------- callbacks
def test_callbacks_see_every_update_checkpoint_and_grid(tmp_path, noise_npz):
    events: list[TrainEvent] = []
    c = config(noise_npz, steps=4, checkpoint_every=2, sample_every=2, num_samples=1, warmup_steps=2)
    result = train(c, tmp_path, progress=False, callbacks=[events.append])
    seen = [(e.kind, e.step) for e in events]
    U, C, G = EventKind.UPDATE, EventKind.CHECKPOINT, EventKind.GRID
    assert seen == [(U, 1), (U, 2), (C, 2), (G, 2), (U, 3), (U, 4), (C, 4), (G, 4)]
    updates = [e for e in events if e.kind is U]
    assert [e.loss for e in updates] == [result.losses[s] for s in (1, 2, 3, 4)]
    assert [e.lr for e in updates] == [learning_rate(c, s) for s in range(4)]
    assert events[2].path == tmp_path / "checkpoints" / "step-000000002" and events[2].path.is_dir()
    assert events[3].path == tmp_path / "samples" / "step-000000002.png" and events[3].path.is_file()
    assert all(e.run_dir == tmp_path and e.model is result.model and e.ema is result.ema for e in events)


def test_resume_writes_the_grid_of_the_checkpoint_step_that_a_stop_cut_short(tmp_path, noise_npz):
    """A callback raising on step 2's checkpoint stops the run before step 2's grid: the resume
    writes it (with its event) before update 3, as the straight run's; a grid already there is kept."""
    c = config(noise_npz, steps=4, checkpoint_every=2, sample_every=2, num_samples=1, warmup_steps=2)
    straight = train(c, tmp_path / "straight", progress=False)

    def stop_on_the_checkpoint(event: TrainEvent) -> None:
        if event.kind is EventKind.CHECKPOINT:
            raise Boom("stop at the checkpoint")
    run, grid = tmp_path / "run", Path("samples") / "step-000000002.png"
    with pytest.raises(Boom):
        train(c, run, progress=False, callbacks=[stop_on_the_checkpoint])
    assert not (run / grid).exists()
    events: list[TrainEvent] = []
    train(c, run, resume="auto", progress=False, callbacks=[events.append])
    U, C, G = EventKind.UPDATE, EventKind.CHECKPOINT, EventKind.GRID
    assert [(e.kind, e.step) for e in events] == [(G, 2), (U, 3), (U, 4), (C, 4), (G, 4)]
    assert (run / grid).read_bytes() == (straight.run_dir / grid).read_bytes()
    shutil.rmtree(run / "checkpoints" / "step-000000004")
    (run / grid).write_bytes(b"kept")
    events.clear()
    train(c, run, resume="auto", progress=False, callbacks=[events.append])
    assert (run / grid).read_bytes() == b"kept" and (G, 2) not in [(e.kind, e.step) for e in events]


FEATURES = {
    "grad_accum": {"grad_accum": "2"},
    "cosine_lr": {"lr_schedule": "cosine", "lr_min": "1e-5"},
    "ema_warmup": {"ema_warmup": "true", "ema_power": "0.75"},
    "all": {"grad_accum": "4", "lr_schedule": "linear", "ema_warmup": "true", "logger": "tensorboard"},
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_a_raising_callback_stops_the_run_and_resume_is_bit_identical(tmp_path, feature):
    """The run stopped by a callback at update 4 resumes from its step-3 checkpoint and ends with the
    straight run's weights, EMA, optimizer state and losses, bit for bit (dropout and flips on)."""
    if FEATURES[feature].get("logger") == "tensorboard":
        pytest.importorskip("tensorboard")
    npz = tmp_path / "tiny.npz"
    np.savez(npz, load_digits_uint8("train")[0][:40])
    c = tiny_config(npz, steps=6, checkpoint_every=3, **FEATURES[feature])
    straight = train(c, tmp_path / "straight", progress=False)
    with pytest.raises(Boom, match="stop at 4"):
        train(c, tmp_path / "cut", progress=False, callbacks=[raise_at(4)])
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step-000000003"
    resumed = train(c, tmp_path / "cut", resume="auto", progress=False)  # the lock was released
    assert resumed.exit_code == 0 and sorted(resumed.losses) == [4, 5, 6]
    assert all(resumed.losses[s] == straight.losses[s] for s in resumed.losses)
    assert metric_losses(tmp_path / "cut") == metric_losses(tmp_path / "straight")
    assert_states_equal(final_state(tmp_path / "cut"), final_state(tmp_path / "straight"))


# ------------------------------------------------------------------------- 3, 10: one lock per run dir
_HOLDER = """
import sys, time
from ddpmkit.fileio import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_trainer_on_a_live_run_dir_is_refused_and_a_dead_holders_lock_is_stale(tmp_path, tiny_npz):
    import signal
    import socket
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        c = tiny_config(tiny_npz, steps=2)
        with pytest.raises(ValueError, match=f"in use by .*{holder.pid}@{socket.gethostname()}"):
            train(c, run, resume="auto", progress=False)
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (run / ".lock").read_text().startswith(f"{holder.pid}@")  # left behind by kill -9: stale
    assert train(c, run, resume="auto", progress=False).exit_code == 0


def test_an_unwritable_run_dir_is_a_one_line_error_before_any_work(tmp_path, tiny_npz, monkeypatch):
    import ddpmkit.train as train_module

    blocker = tmp_path / "a-file"  # a folder below a file cannot be created, not even by root
    blocker.write_text("")
    monkeypatch.setattr(train_module, "_build_run", None)  # building the run (data, model) must not start
    with pytest.raises(ValueError, match="cannot write to .*a-file/run"):
        train(tiny_config(tiny_npz, steps=2), blocker / "run", progress=False)


def test_steps_below_the_checkpoint_says_there_is_nothing_to_train(tmp_path, tiny_npz, finished_run,
                                                                   capsys):
    run = _copy(finished_run, tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    result, _ = _resume(run, tiny_npz, steps=2)
    out = capsys.readouterr().out
    assert "the checkpoint is at step 4, past --steps 2: nothing to train" in out
    assert result.exit_code == 0 and result.step == 4
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert {k: v for k, v in after.items() if k.name != "config.json"} == \
        {k: v for k, v in before.items() if k.name != "config.json"}  # weights, checkpoints untouched


def test_a_deeply_nested_manifest_or_metrics_line_is_torn(tmp_path, tiny_npz, finished_run):
    run = _copy(finished_run, tmp_path)
    (run / "checkpoints" / "step-000000004" / "manifest.json").write_text("[" * 100000)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[" * 100000 + "\n")
    result, warned = _resume(run, tiny_npz)
    assert result.exit_code == 0 and result.step == 4
    assert any("step-000000004/manifest.json" in w for w in warned), warned
    assert any("metrics.jsonl line 5" in w for w in warned), warned
    assert _steps(run) == [1, 2, 3, 4]


SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["--set", "unet.ch=32", "--set", "unet.ch_mult=1", "--set", "unet.num_res_blocks=1",
        "--set", "unet.attn_resolutions=", "--set", "diffusion.num_timesteps=20", "--batch-size", "8",
        "--steps", "100", "--checkpoint-every", "2", "--sample-every", "1000", "--num-samples", "0",
        "--no-progress"]
# Steps from the third on take STEP_SECONDS (a sleep inside the update: a long step on a slow machine).
_SLOW = """
import sys, time
from ddpmkit.training import step
call = step.UpdateStep.__call__
def slow(self, x0, s):
    if s >= 2:
        time.sleep(float(sys.argv[1]))
    return call(self, x0, s)
step.UpdateStep.__call__ = slow
from ddpmkit.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


def _start(run: Path, step_seconds: float) -> tuple[subprocess.Popen, queue.Queue]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-u", "-c", _SLOW, str(step_seconds), *TINY, "--output-dir",
                             str(run)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    return proc, lines


def _wait_for(lines: queue.Queue, text: str, timeout: float, seen: list[str]) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=max(0.01, end - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"no {text!r} within {timeout} s; output:\n{''.join(seen)}")


def _in_step_3(run: Path, proc: subprocess.Popen) -> None:
    manifest = run / "checkpoints" / "step-000000002" / "manifest.json"
    end = time.monotonic() + 120
    while not manifest.is_file():
        assert proc.poll() is None and time.monotonic() < end, "the run did not reach its checkpoint"
        time.sleep(0.05)
    time.sleep(0.5)  # inside step 3's update


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_first_ctrl_c_answers_and_saves_after_the_step(tmp_path):
    run = tmp_path / "run"
    proc, lines = _start(run, step_seconds=4.0)
    seen: list[str] = []
    try:
        _in_step_3(run, proc)
        proc.send_signal(signal.SIGINT)
        line = _wait_for(lines, "stopping after the current step", 2.0, seen)  # at once, mid-step
        assert "Ctrl-C again stops at once" in line and "checkpoints/step-000000002 (step 2)" in line
        assert proc.wait(timeout=60) == 128 + signal.SIGINT
    finally:
        proc.kill()
    _wait_for(lines, "after step 3; checkpoint saved", 5.0, seen)
    assert (run / "checkpoints" / "step-000000003" / "manifest.json").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_second_ctrl_c_stops_at_once_and_names_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc, lines = _start(run, step_seconds=600.0)
    seen: list[str] = []
    try:
        _in_step_3(run, proc)
        proc.send_signal(signal.SIGINT)
        _wait_for(lines, "stopping after the current step", 2.0, seen)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        assert time.monotonic() - t0 < 5.0
    finally:
        proc.kill()
    assert code == 128 + signal.SIGINT
    line = _wait_for(lines, "stopped at once by a second Ctrl-C", 5.0, seen)
    assert "during step 3" in line and "resumes from checkpoints/step-000000002 (step 2)" in line
    assert not (run / "checkpoints" / "step-000000003").exists()
