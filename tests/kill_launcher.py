"""Test-only launcher: ``python tests/kill_launcher.py KILL_AT LOG [--pause-after S] -- ddpm-train-args...``.

Runs ``ddpm train`` in this process with the file-system and step functions that a run's safety
depends on wrapped (monkeypatched here, nothing in ddpmkit knows): every call is an event, appended
to LOG as one line (its number and name) before it happens; the main process only. At event number
KILL_AT this process sends itself SIGKILL, exactly as a crash or ``kill -9`` at that moment would.
KILL_AT -1: never. KILL_AT ``KIND`` or ``KIND:TEXT`` (not a number): the first event of that kind
(whose argument holds TEXT), for moments whose event number varies from run to run.
``--pause-after S``: once the metrics line of step S is written, idle until SIGTERM / SIGINT arrives
(or a kill), so that a test can signal the run at a known step.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys


def main() -> int:
    kill_at, log_path = sys.argv[1], sys.argv[2]
    kill_at = int(kill_at) if kill_at.lstrip("-").isdecimal() else kill_at
    sep = sys.argv.index("--")
    pause_after = int(sys.argv[4]) if sys.argv[3:5] and sys.argv[3] == "--pause-after" else -1
    rest = sys.argv[sep + 1:]
    log = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    count, me = [0], os.getpid()

    def event(name: str) -> None:
        if os.getpid() != me:  # a data-loader worker (forked with these wrappers): not counted
            return
        count[0] += 1
        log.write(f"{count[0]} {name}\n")
        if count[0] == kill_at or isinstance(kill_at, str) and _matches(name, kill_at):
            log.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner: object, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            first = args[0] if args else ""
            event(f"{name} {os.fspath(first) if isinstance(first, (str, os.PathLike)) else ''}")
            return original(*args, **kwargs)

        setattr(owner, attr, wrapped)

    from ddpmkit import checkpoint, train
    from ddpmkit.training import log as train_log
    from ddpmkit.training import step as train_step

    for attr in ("rename", "replace", "unlink", "rmdir", "fsync"):
        wrap(os, attr, attr)
    wrap(shutil, "rmtree", "rmtree")
    wrap(checkpoint, "_write_synced", "checkpoint-file")
    wrap(train_step.UpdateStep, "__call__", "step")
    wrap(train, "_sample_grid", "grid")  # a kill here: the step's checkpoint is complete, its grid not begun
    _pause_after_metrics(train, train_log, pause_after)
    from ddpmkit.cli import main as cli_main

    return cli_main(["train", *rest])


def _matches(name: str, kill_at: str) -> bool:
    kind, _, arg = name.partition(" ")
    want, _, text = kill_at.partition(":")
    return kind == want and text in arg


def _pause_after_metrics(train: object, train_log: object, pause_after: int) -> None:
    import time

    got_signal = [False]
    handle, metrics = train._StopFlag._handle, train_log.TrainLog.metrics

    def handle_and_note(self, signum, frame):
        got_signal[0] = True
        handle(self, signum, frame)

    def metrics_then_pause(self, record):
        metrics(self, record)
        if record["step"] == pause_after:
            while not got_signal[0]:
                time.sleep(0.02)

    train._StopFlag._handle = handle_and_note
    train_log.TrainLog.metrics = metrics_then_pause


if __name__ == "__main__":
    sys.exit(main())
