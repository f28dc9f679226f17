"""The library's output goes through ``logging.getLogger("ddpmkit")`` (and its children).

Silence it with ``logging.getLogger("ddpmkit").setLevel(logging.WARNING)``; redirect it by adding
your own handler to that logger before the first message (then no console handler is added).
Without a handler of its own, the first ``logger()`` call adds one that writes the bare message
to the current ``sys.stdout`` (so ``ddpm`` prints what it always printed) and drops records of
every process but rank 0 under torchrun (the RANK environment variable). Records also propagate
to the root logger as usual.

Every progress bar is made by ``progress_bar`` (tqdm), so that one switch, ``set_output_mode``,
gives the CLI's quieter forms for log files: ``PLAIN`` (no bars; each line with its time, level
and source) and ``QUIET`` (no bars, warnings and errors only).
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from typing import Any

from ddpmkit.enums import parse_enum

__all__ = ["LOGGER_NAME", "ConsoleHandler", "OutputMode", "logger", "progress_bar", "set_output_mode"]

LOGGER_NAME = "ddpmkit"


class OutputMode(enum.Enum):
    """How the library's output looks: ``TERMINAL`` (bars, bare lines; the default), ``PLAIN``
    (no bars, timestamped lines: for log files) or ``QUIET`` (no bars, warnings and errors)."""

    TERMINAL = "terminal"
    PLAIN = "plain"
    QUIET = "quiet"


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_mode = OutputMode.TERMINAL


def _is_rank0(record: logging.LogRecord) -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


class ConsoleHandler(logging.StreamHandler):
    """The bare message to whatever ``sys.stdout`` is at the time (pytest's capture, a pipe), rank 0 only."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))
        self.addFilter(_is_rank0)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - the current stdout, never a stale one
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - StreamHandler.__init__ assigns it
        pass


def logger(name: str = LOGGER_NAME) -> logging.Logger:
    """``logging.getLogger(name)`` (under "ddpmkit"), the console handler added on first use."""
    root = logging.getLogger(LOGGER_NAME)
    if not root.handlers:
        root.addHandler(ConsoleHandler())
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    return logging.getLogger(name)


def set_output_mode(mode: OutputMode | str) -> OutputMode:
    """Switch every later bar and the console handler's form (see ``OutputMode``)."""
    global _mode
    _mode = parse_enum(OutputMode, mode, "output mode")
    root = logger()
    for h in root.handlers:
        if isinstance(h, ConsoleHandler):
            h.setFormatter(logging.Formatter(PLAIN_FORMAT if _mode is OutputMode.PLAIN else "%(message)s"))
    root.setLevel(logging.WARNING if _mode is OutputMode.QUIET else logging.INFO)
    return _mode


def progress_bar(*, disable: bool = False, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(**kwargs)``, shown only in ``TERMINAL`` mode (and when not ``disable``)."""
    from tqdm.auto import tqdm

    return tqdm(disable=disable or _mode is not OutputMode.TERMINAL, **kwargs)
