"""Ctrl-C that answers (train.py's stop flag), with real SIGINTs to a `ddpm train` subprocess: the first
is answered at once and the run saves after the current step; a second stops inside the step."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

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
