"""The library's output goes through ``logging.getLogger("ddpmkit")`` (and its children).

Silence it with ``logging.getLogger("ddpmkit").setLevel(logging.WARNING)``; redirect it by adding
your own handler to that logger before the first message (then no console handler is added).
Without a handler of its own, the first ``logger()`` call adds one that writes the bare message
to the current ``sys.stdout`` (so ``ddpm`` prints what it always printed) and drops records of
every process but rank 0 under torchrun (the RANK environment variable). Records also propagate
to the root logger as usual.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["LOGGER_NAME", "ConsoleHandler", "logger"]

LOGGER_NAME = "ddpmkit"


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
