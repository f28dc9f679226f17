"""The trainer's optional features, each pinned to a value computed here, and resume with each on:
gradient accumulation, lr decay, EMA warm-up, the trackers (TensorBoard, W&B), callbacks, the bar.

Like test_train_values.py, the trainer is watched through monkeypatched seams (the ``rec`` fixture
records what the optimizer, the data set and the loss received) and driven through ``train()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import test_train_values
import torch
from test_train import assert_states_equal, final_state, metric_losses, tiny_config
from test_train_values import config, global_norm, named

from ddpmkit import checkpoint as ckpt
from ddpmkit.cli import build_parser
from ddpmkit.cli.train import resolve_config
from ddpmkit.config import LrSchedule, Tracker, TrainConfig, load_config, save_config
from ddpmkit.data import load_digits_uint8
from ddpmkit.train import EventKind, TrainEvent, learning_rate, train
from ddpmkit.training.state import ema_decay_at

noise_npz, rec = test_train_values.noise_npz, test_train_values.rec  # fixtures


# ------------------------------------------------------------------------- gradient accumulation
def test_grad_accum_gives_the_optimizer_the_full_batch_gradient(tmp_path, noise_npz, rec):
    for accum in (1, 2, 4):
        train(config(noise_npz, grad_accum=accum, grad_clip=1e6), tmp_path / str(accum), progress=False)
    full, *accumulated = rec.step_grads
    assert [x.shape[0] for x in rec.x0] == [8] + [4] * 2 + [2] * 4  # the micro-batches reached the loss
    assert global_norm(full) > 0
    for grads in accumulated:
        for g_full, g in zip(full, grads, strict=True):
            torch.testing.assert_close(g, g_full, rtol=0, atol=1e-6)


def test_grad_accum_clips_the_accumulated_gradient(tmp_path, noise_npz, rec):
    clip = 0.05
    train(config(noise_npz, grad_clip=1e6), tmp_path / "full", progress=False)
    train(config(noise_npz, grad_accum=2, grad_clip=clip), tmp_path / "accum", progress=False)
    full, raw, seen = rec.raw_grads[0], rec.raw_grads[1], rec.step_grads[1]
    norm = global_norm(full)
    assert norm > 4 * clip
    assert global_norm(raw) == pytest.approx(norm, rel=1e-5)  # .grad holds the sum of both halves
    assert global_norm(seen) == pytest.approx(clip, rel=1e-5)
    for g_full, g_seen in zip(full, seen, strict=True):
        torch.testing.assert_close(g_seen, g_full * (clip / norm), rtol=1e-4, atol=1e-9)


def test_grad_accum_a_nan_in_one_micro_batch_skips_the_whole_update(tmp_path, noise_npz, monkeypatch):
    from ddpmkit.training.step import UpdateStep

    reference = train(config(noise_npz, steps=1), tmp_path / "ref", progress=False)
    loss, calls = UpdateStep.loss, [0]

    def nan_in_micro_batch_3(self, *args, **kwargs):  # update 2's second half
        calls[0] += 1
        out = loss(self, *args, **kwargs)
        return out * float("nan") if calls[0] == 4 else out

    monkeypatch.setattr(UpdateStep, "loss", nan_in_micro_batch_3)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        result = train(config(noise_npz, steps=2, grad_accum=2), tmp_path / "nan", progress=False)
    assert sorted(result.losses) == [1] and calls[0] == 4
    for k, v in reference.model.state_dict().items():  # update 1 equals the full batch's; update 2 skipped
        torch.testing.assert_close(result.model.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


def test_grad_accum_under_ddp_syncs_only_the_last_micro_batch(tmp_path, noise_npz, monkeypatch):
    """A stand-in for DistributedDataParallel (one process cannot build one) records which
    micro-batches ran inside ``no_sync``."""
    import ddpmkit.training.step as step_module
    from ddpmkit.distributed import DistInfo
    from ddpmkit.training.state import build_state
    from ddpmkit.training.step import UpdateStep

    inside: list[bool] = []

    class FakeDDP(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.syncing = module, True

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing = False
            try:
                yield
            finally:
                self.syncing = True

        def forward(self, *args, **kwargs):
            inside.append(not self.syncing)
            return self.module(*args, **kwargs)

    monkeypatch.setattr(step_module, "DistributedDataParallel", FakeDDP)
    c = config(noise_npz, grad_accum=4)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    state = build_state(c, info)
    update = UpdateStep(state=state, diffusion=c.diffusion.build(), net=FakeDDP(state.model), info=info)
    assert update(torch.zeros(8, 1, 8, 8), 0).finite
    assert inside == [True, True, True, False]


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


# ------------------------------------------------------------------------- EMA warm-up
def test_ema_warmup_decay_is_diffusers_closed_form(noise_npz):
    c = config(noise_npz, ema_warmup="true", ema_decay=0.9999, ema_inv_gamma=1.0, ema_power=0.75)
    for s in (0, 1, 10, 1000, 10**6):
        want = min(0.9999, 1 - (1 + s) ** -0.75)
        assert ema_decay_at(c, s) == pytest.approx(want, rel=1e-12, abs=0), s
    assert ema_decay_at(c, 0) == 0.0 and ema_decay_at(c, 10**6) == 0.9999  # the cap
    c2 = dataclasses.replace(c, ema_inv_gamma=4.0, ema_power=2 / 3, ema_min_decay=0.1)
    assert ema_decay_at(c2, 0) == 0.1 and ema_decay_at(c2, 8) == pytest.approx(1 - 3 ** (-2 / 3), rel=1e-12)
    assert ema_decay_at(dataclasses.replace(c, ema_warmup=False), 0) == 0.9999  # off: the constant


def test_ema_warmup_averages_with_the_decay_of_each_update(tmp_path, noise_npz, rec):
    c = config(noise_npz, steps=3, ema_warmup="true", ema_decay=0.9, ema_inv_gamma=2.0, ema_power=1.0)
    result = train(c, tmp_path, progress=False)
    weights = [named(result, w) for w in rec.w_before[1:]] + [dict(result.model.named_parameters())]
    ema = {k: v.double() for k, v in named(result, rec.w0).items()}
    for s, w in enumerate(weights):  # decay of update s: min(0.9, 1 - (1 + s / 2) ** -1)
        d = min(0.9, 1 - 1 / (1 + s / 2))
        ema = {k: d * ema[k] + (1 - d) * w[k].detach().double() for k in ema}
    for k, v in result.ema.named_parameters():
        torch.testing.assert_close(v.detach().double(), ema[k], rtol=0, atol=1e-6, msg=k)


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


class Boom(RuntimeError):
    pass


def _raise_at(step: int):
    def callback(event: TrainEvent) -> None:
        if event.kind is EventKind.UPDATE and event.step == step:
            raise Boom(f"stop at {step}")
    return callback


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
        train(c, tmp_path / "cut", progress=False, callbacks=[_raise_at(4)])
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step-000000003"
    resumed = train(c, tmp_path / "cut", resume="auto", progress=False)  # the lock was released
    assert resumed.exit_code == 0 and sorted(resumed.losses) == [4, 5, 6]
    assert all(resumed.losses[s] == straight.losses[s] for s in resumed.losses)
    assert metric_losses(tmp_path / "cut") == metric_losses(tmp_path / "straight")
    assert_states_equal(final_state(tmp_path / "cut"), final_state(tmp_path / "straight"))


# ------------------------------------------------------------------------- trackers
def _tb_steps(folder: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_no_tracker_unless_asked(tmp_path, noise_npz):
    pytest.importorskip("tensorboard")  # installed, and still not used
    train(config(noise_npz, steps=2, log_every=1), tmp_path, progress=False)
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()


def test_tensorboard_gets_metrics_grids_config_and_no_duplicates_after_resume(tmp_path, noise_npz):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    c = config(noise_npz, steps=5, log_every=1, checkpoint_every=2, sample_every=2, num_samples=1,
               logger="tensorboard")
    with pytest.raises(Boom):  # steps 3 and 4 reach TensorBoard, the checkpoint is at step 2
        train(c, tmp_path, progress=False, callbacks=[_raise_at(4)])
    assert _tb_steps(tmp_path / "tensorboard") == [1, 2, 3, 4]
    train(c, tmp_path, resume="auto", progress=False)
    assert _tb_steps(tmp_path / "tensorboard") == [1, 2, 3, 4, 5]  # 3 and 4 once: purged, rewritten
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert [e.step for e in acc.Images("samples")] == [2, 4, 5]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"logger": "tensorboard"' in text


def test_wandb_offline_gets_metrics_grids_and_config(tmp_path, noise_npz, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    c = config(noise_npz, steps=2, log_every=1, num_samples=1, logger="wandb", lr=3e-3)
    assert train(c, run, progress=False).exit_code == 0
    (offline,) = (run / "wandb").glob("offline-run-*")
    (log,) = offline.glob("*.wandb")  # the run's records (what `wandb sync` uploads)

    def written() -> bool:  # W&B's service process may still be writing after run.finish() returned
        records = log.read_bytes()
        return (b"ema_inv_gamma" in records and b"0.003" in records  # the config
                and records.count(b"train/loss") >= 2  # the metrics of steps 1 and 2
                and bool(list((offline / "files" / "media" / "images").glob("samples_2_*.png"))))  # the grid

    deadline = time.monotonic() + 60
    while not written() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert written()


@pytest.mark.parametrize("kind,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_one_clear_error(tmp_path, noise_npz, monkeypatch, kind, package):
    import sys

    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: importing it raises
    with pytest.raises(ValueError, match=rf"^--logger {kind} needs the {package} package: "
                       rf"pip install 'ddpmkit\[{package}\]'$"):
        train(config(noise_npz, logger=kind), tmp_path, progress=False)
    assert not (tmp_path / "config.json").exists()  # refused before the run folder is touched


# ------------------------------------------------------------------------- the progress bar
def test_the_training_bar_follows_the_output_mode(tmp_path, noise_npz, capsys):
    from ddpmkit import logs

    try:
        logs.set_output_mode("plain")
        train(config(noise_npz, steps=2), tmp_path / "plain", progress=True)
        assert "2/2" not in capsys.readouterr().err
        logs.set_output_mode("terminal")
        train(config(noise_npz, steps=2), tmp_path / "terminal", progress=True)
        assert "2/2" in capsys.readouterr().err
    finally:
        logs.set_output_mode("terminal")


# ------------------------------------------------------------------------- config and CLI
def test_cli_flags_reach_the_config_and_round_trip_through_config_json(tmp_path):
    args = build_parser().parse_args(
        ["train", "--grad-accum", "4", "--lr-schedule", "cosine", "--lr-min", "1e-5", "--ema-warmup",
         "--ema-inv-gamma", "2", "--ema-power", "0.75", "--logger", "wandb"])
    c, _ = resolve_config(args)
    assert (c.grad_accum, c.lr_schedule, c.lr_min, c.logger) == (4, LrSchedule.COSINE, 1e-5, Tracker.WANDB)
    assert (c.ema_warmup, c.ema_inv_gamma, c.ema_power) == (True, 2.0, 0.75)
    assert load_config(save_config(c, tmp_path / "config.json")) == c
    assert json.loads((tmp_path / "config.json").read_text())["lr_schedule"] == "cosine"
    defaults = resolve_config(build_parser().parse_args(["train"]))[0]
    assert (defaults.grad_accum, defaults.lr_schedule, defaults.ema_warmup, defaults.logger) == \
        (1, LrSchedule.CONSTANT, False, Tracker.NONE)
    assert TrainConfig().ema_decay == 0.9999 and not TrainConfig().ema_warmup  # the paper's EMA


@pytest.mark.parametrize("key,value,message", [
    ("grad_accum", 0, "grad_accum must be an integer >= 1, got 0"),
    ("grad_accum", 3, "batch_size 8 must be divisible by grad_accum 3"),
    ("lr_schedule", "step", "unknown lr_schedule 'step'; choose one of constant, linear, cosine"),
    ("logger", "mlflow", "unknown logger 'mlflow'; choose one of none, tensorboard, wandb"),
    ("lr_min", 1.0, "lr_min must be in [0, lr=0.001], got 1.0"),
    ("ema_power", 0.0, "ema_power must be a finite number > 0, got 0.0"),
    ("ema_inv_gamma", -1.0, "ema_inv_gamma must be a finite number > 0, got -1.0"),
    ("ema_min_decay", 0.9, "ema_min_decay must be in [0, ema_decay=0.75], got 0.9"),
    ("ema_warmup", 1, "ema_warmup must be a bool, got 1"),
])
def test_bad_values_are_one_line_value_errors(noise_npz, key, value, message):
    base = config(noise_npz)
    with pytest.raises(ValueError, match=r"^" + message.replace("[", r"\[").replace("(", r"\(") + "$"):
        dataclasses.replace(base, **{key: value})


def test_cli_bad_grad_accum_exits_2(capsys):
    from ddpmkit.cli import main

    assert main(["train", "--grad-accum", "3", "--batch-size", "8", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "batch_size 8 must be divisible by grad_accum 3" in err and "Traceback" not in err
