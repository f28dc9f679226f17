"""Library output goes through logging.getLogger("ddpmkit"): silenced or redirected by the user,
printed bare to stdout by default (the CLI's terminal output), and only on rank 0."""

from __future__ import annotations

import logging
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
