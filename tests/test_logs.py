"""Library output goes through logging.getLogger("ddpmkit"): silenced or redirected by the user,
printed bare to stdout by default (the CLI's terminal output), and only on rank 0."""

from __future__ import annotations

import logging
import re
import types

import pytest

from ddpmkit.logs import ConsoleHandler, logger
from ddpmkit.training.log import TrainLog


@pytest.fixture(autouse=True)
def _fresh_logger():
    root = logging.getLogger("ddpmkit")
    saved = root.handlers[:], root.level
    root.handlers.clear()
    root.setLevel(logging.NOTSET)
    yield root
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def _trainer_log(msg: str, is_main: bool = True) -> None:
    """The trainer's feedback line, on a stand-in for the trainer's log (only ``info.is_main`` is read)."""
    TrainLog.line(types.SimpleNamespace(info=types.SimpleNamespace(is_main=is_main)), msg)


def test_default_prints_the_bare_message_to_stdout(capsys) -> None:
    _trainer_log("resumed from x at step 3")
    assert capsys.readouterr().out == "resumed from x at step 3\n"
    assert [type(h) for h in logging.getLogger("ddpmkit").handlers] == [ConsoleHandler]
    _trainer_log("again")
    assert capsys.readouterr().out == "again\n"  # one handler, not one per call


def test_users_can_silence_or_redirect_it(capsys, _fresh_logger) -> None:
    _fresh_logger.setLevel(logging.WARNING)
    _trainer_log("hidden")
    assert capsys.readouterr().out == ""
    _fresh_logger.handlers.clear()
    _fresh_logger.setLevel(logging.NOTSET)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.name}: {record.getMessage()}")

    _fresh_logger.addHandler(Collect())
    _fresh_logger.setLevel(logging.INFO)
    _trainer_log("to my handler")
    assert records == ["ddpmkit.train: to my handler"]
    assert capsys.readouterr().out == ""  # no console handler was added next to the user's


def test_only_rank_0_prints(capsys, monkeypatch) -> None:
    _trainer_log("not main", is_main=False)
    monkeypatch.setenv("RANK", "1")
    logger("ddpmkit.evaluate").info("rank 1 library message")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    logger("ddpmkit.evaluate").info("rank 0")
    assert capsys.readouterr().out == "rank 0\n"


@pytest.fixture
def _mode_restored():
    from ddpmkit import logs

    yield logs
    logs.set_output_mode("terminal")


def test_plain_mode_timestamps_lines_and_hides_bars(capsys, _mode_restored) -> None:
    logs = _mode_restored
    assert not logs.progress_bar(total=3).disable  # terminal: the bar is shown
    logs.set_output_mode("plain")
    _trainer_log("step 5")
    line = capsys.readouterr().out
    # e.g. "2026-12-02 01:59:03,123 INFO ddpmkit.train: step 5"
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(stamp + r" INFO ddpmkit\.train: step 5\n", line), line
    bar = logs.progress_bar(total=3)
    assert bar.disable
    bar.close()


def test_quiet_mode_keeps_warnings_only(capsys, _mode_restored) -> None:
    logs = _mode_restored
    logs.set_output_mode(logs.OutputMode.QUIET)
    _trainer_log("chatter")
    logger("ddpmkit.train").warning("a warning")
    assert capsys.readouterr().out == "a warning\n"
    assert logs.progress_bar(total=3).disable
    with pytest.raises(ValueError, match="unknown output mode 'loud'; choose one of terminal, plain, quiet"):
        logs.set_output_mode("loud")


def test_the_cli_switches_the_mode(capsys, _mode_restored, tmp_path) -> None:
    from ddpmkit.cli import main

    (tmp_path / "a.png").write_bytes(b"not a png")
    main(["--log-format", "plain", "data", "verify", str(tmp_path)])
    assert _mode_restored._mode is _mode_restored.OutputMode.PLAIN
    main(["-q", "data", "verify", str(tmp_path)])
    assert _mode_restored._mode is _mode_restored.OutputMode.QUIET
    main(["data", "verify", str(tmp_path)])
    assert _mode_restored._mode is _mode_restored.OutputMode.TERMINAL
    with pytest.raises(SystemExit):
        main(["-q", "--log-format", "plain", "data", "verify", str(tmp_path)])  # one or the other
