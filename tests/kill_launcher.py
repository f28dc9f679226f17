"""Test-only launcher: ``python tests/kill_launcher.py KILL_AT LOG -- ddpm-train-args...``.

Runs ``ddpm train`` in this process with the file-system and step functions that a run's safety
depends on wrapped (monkeypatched here, nothing in ddpmkit knows): every call is an event, appended
to LOG as one line (its number and name) before it happens; the main process only. At event number KILL_AT this process
sends itself SIGKILL, exactly as a crash or ``kill -9`` at that moment would. KILL_AT -1: never.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys


def main() -> int:
    kill_at, log_path, rest = int(sys.argv[1]), sys.argv[2], sys.argv[4:]
    log = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    count, me = [0], os.getpid()

    def event(name: str) -> None:
        if os.getpid() != me:  # a data-loader worker (forked with these wrappers): not counted
            return
        count[0] += 1
        log.write(f"{count[0]} {name}\n")
        if count[0] == kill_at:
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

    for attr in ("rename", "replace", "unlink", "rmdir", "fsync"):
        wrap(os, attr, attr)
    wrap(shutil, "rmtree", "rmtree")
    wrap(checkpoint, "_write_synced", "checkpoint-file")
    wrap(train._Trainer, "train_step", "step")
    from ddpmkit.cli import main as cli_main

    return cli_main(["train", *rest])


if __name__ == "__main__":
    sys.exit(main())
