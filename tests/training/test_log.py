"""The trainer's feedback (training.log): the trackers (TensorBoard, W&B), the bar, metrics.jsonl."""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from json_inputs import FAST, json_bytes
from tiny_runs import (
    Boom,
    _copy,
    _resume,
    _steps,
    config,
    raise_at,
)

from ddpmkit.cli import main
from ddpmkit.config import TrainConfig
from ddpmkit.train import train
from ddpmkit.training import log as train_log
from ddpmkit.training.fit import config_for_data
from ddpmkit.training.log import TrainLog, estimate_lines, format_duration, plan_line, truncate_metrics


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
        train(c, tmp_path, progress=False, callbacks=[raise_at(4)])
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


# ------------------------------------------------------------------------- 4: torn metrics line
def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, tiny_npz, finished_run):
    run = _copy(finished_run, tmp_path)
    (run / "checkpoints" / "step-000000004").rename(run / "checkpoints" / ".gone")  # resume from step 2
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a power cut mid-append
    result, warned = _resume(run, tiny_npz)
    assert result.exit_code == 0 and result.step == 4
    assert any("metrics.jsonl" in w and "line 5" in w for w in warned), warned
    assert _steps(run) == [1, 2, 3, 4]


# ------------------------------------------------------------------------- metrics.jsonl lines
@FAST
@given(lines=st.lists(st.one_of(json_bytes, st.integers(0, 9).map(lambda s: json.dumps({"step": s}).encode())
                                 ), max_size=6))
def test_metrics_lines_are_kept_or_dropped_with_a_warning(tmp_path_factory, lines):
    path = tmp_path_factory.getbasetemp() / "metrics.jsonl"
    path.write_bytes(b"".join(x.replace(b"\n", b" ") + b"\n" for x in lines))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        truncate_metrics(path, 5)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert type(record["step"]) is int and record["step"] <= 5


TINY = ["--set", "unet.ch=32", "--set", "unet.ch_mult=1", "--set", "unet.num_res_blocks=1",
        "--set", "unet.attn_resolutions=", "--set", "diffusion.num_timesteps=20", "--batch-size", "8",
        "--steps", "6", "--log-every", "2", "--checkpoint-every", "100", "--sample-every", "1000",
        "--num-samples", "4"]
STEP_LINE = re.compile(r"step (\d+)/6  loss \d+\.\d{4}  lr [0-9.e-]+  \d+\.\d img/s  ETA \d+s$")
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) ddpmkit[.\w]*: ")


@pytest.fixture(autouse=True)
def _terminal_after():
    yield
    from ddpmkit.logs import set_output_mode

    set_output_mode("terminal")


def _logged_steps(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := STEP_LINE.search(line))]


@pytest.mark.usefixtures("one_thread")
def test_no_progress_prints_a_line_every_log_every_logged_steps(tmp_path, capsys):
    assert main(["train", *TINY, "--no-progress", "--output-dir", str(tmp_path / "run")]) == 0
    assert _logged_steps(capsys.readouterr().out.splitlines()) == [2, 4, 6]


@pytest.mark.usefixtures("one_thread")
def test_plain_stamps_every_line(tmp_path, capsys):
    assert main(["--log-format", "plain", "train", *TINY, "--output-dir", str(tmp_path / "run")]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert _logged_steps(lines) == [2, 4, 6]
    unstamped = [x for x in lines if not STAMP.match(x)]
    assert not unstamped, unstamped
    assert any("deviations from the paper's recipe" in x for x in lines)
    assert any("model (EMA weights)" in x for x in lines)


@pytest.mark.usefixtures("one_thread")
def test_format_duration():
    assert [format_duration(s) for s in (0, 45.4, 61, 3599, 3600, 11_107)] == \
        ["0s", "45s", "1m 01s", "59m 59s", "1h 00m", "3h 05m"]


# ------------------------------------------------------------------------- the plan and the estimate
def test_the_plan_line_names_the_net_steps_batch_and_device():
    c = config_for_data("f", 32, 3, device="cpu")
    assert plan_line(c, 1_954_243, 0, "cpu") == (
        "plan: U-Net 1.95M parameters, 500 steps of batch 32 on cpu; the estimated time follows after the "
        "first steps")
    assert plan_line(c, 35_746_307, 100, torch.device("cuda", 0)).startswith(
        "plan: U-Net 35.75M parameters, 400 steps of batch 32 on cuda:0;")


def test_the_estimate_warns_past_24_hours():
    assert estimate_lines(0.9, 500, "cpu") == (
        "estimated time: 7m 30s for the remaining 500 steps (0.9 s/step on cpu)", None)
    assert estimate_lines(86_400 / 1000, 1000, "cpu")[1] is None  # exactly 24 hours: no warning
    line, warning = estimate_lines(141.67, 799_999, "cpu")  # the CIFAR-10 recipe's step time on a CPU
    assert line == "estimated time: 31482h 10m for the remaining 799,999 steps (142 s/step on cpu)"
    assert warning == ("warning: this run would take about 1,311.8 days on cpu (more than 24 hours); stop it "
                       "(Ctrl-C) and pass fewer --steps, a smaller network (--net small with --data FOLDER) "
                       "or a GPU")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _timed_log(tmp_path, monkeypatch, step_times: list[float], steps: int, caplog) -> list[str]:
    """A TrainLog's lines after updates that took ``step_times`` seconds each (an injected clock)."""
    from ddpmkit.distributed import DistInfo

    clock = _Clock()
    monkeypatch.setattr(train_log, "time", clock)
    log = TrainLog(tmp_path, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")),
                   progress=False)
    log.start_loop(TrainConfig(steps=steps), 0)
    with caplog.at_level("INFO", logger=train_log.LOGGER_NAME):
        for dt in step_times:
            clock.now += dt
            log.update(0.1)
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == train_log.LOGGER_NAME]


def test_the_estimate_follows_the_steps_after_the_first(tmp_path, monkeypatch, caplog):
    # the first step pays for start-up (5 s); the next ETA_STEPS (3) take 2 s each
    lines = _timed_log(tmp_path, monkeypatch, [5.0, 2.0, 2.0, 2.0, 2.0, 2.0], 100, caplog)
    assert lines == [("INFO", "estimated time: 3m 12s for the remaining 96 steps (2 s/step on cpu)")]


def test_a_slow_first_step_is_the_estimate_and_past_24_hours_warns(tmp_path, monkeypatch, caplog):
    lines = _timed_log(tmp_path, monkeypatch, [141.67, 141.67], 800_000, caplog)
    assert [level for level, _ in lines] == ["INFO", "WARNING"]
    assert lines[0][1] == "estimated time: 31482h 10m for the remaining 799,999 steps (142 s/step on cpu)"
    assert lines[1][1].startswith("warning: this run would take about 1,311.8 days on cpu (more than 24 h")
