"""training/log.py in log mode: a line every log_every steps (step, loss, lr, img/s, ETA) without a bar,
and under --log-format plain every line stamped with its time, level and source."""

from __future__ import annotations

import re

import pytest

from ddpmkit.cli import main
from ddpmkit.training.log import format_duration

pytestmark = pytest.mark.usefixtures("one_thread")

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


def _steps(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := STEP_LINE.search(line))]


def test_no_progress_prints_a_line_every_log_every_steps(tmp_path, capsys):
    assert main(["train", *TINY, "--no-progress", "--output-dir", str(tmp_path / "run")]) == 0
    assert _steps(capsys.readouterr().out.splitlines()) == [2, 4, 6]


def test_plain_stamps_every_line(tmp_path, capsys):
    assert main(["--log-format", "plain", "train", *TINY, "--output-dir", str(tmp_path / "run")]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert _steps(lines) == [2, 4, 6]
    unstamped = [x for x in lines if not STAMP.match(x)]
    assert not unstamped, unstamped
    assert any("deviations from the paper's recipe" in x for x in lines)
    assert any("model (EMA weights)" in x for x in lines)


def test_format_duration():
    assert [format_duration(s) for s in (0, 45.4, 61, 3599, 3600, 11_107)] == \
        ["0s", "45s", "1m 01s", "59m 59s", "1h 00m", "3h 05m"]
