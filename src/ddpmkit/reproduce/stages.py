"""Resumable stages: each result is OUT/stages/NAME.json, written atomically when the stage ends.

A stage file holds the run's settings, the stage's inputs (what else changes its value: the weights
it evaluated, the samples it read), its wall and CPU seconds and its result; ``resume`` skips a stage
whose file exists with the same settings and inputs, and redoes one whose inputs changed or whose
file is torn (not JSON, or not of ``STAGE_SCHEMA``), with a warning naming the file. The report
reads only these files, and each of its numbers names its source as "stages/NAME.json#a.b.3"
(``resolve_source``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddpmkit.fileio import atomic_write_json, read_json_object
from ddpmkit.schema import Optional

__all__ = ["STAGE_FORMAT", "STAGE_SCHEMA", "Stages", "get_key", "resolve_source", "stage_budget",
           "write_json"]

STAGE_FORMAT = "ddpmkit.reproduce_stage"
STAGE_SCHEMA = {"format": str, "stage": str, "settings": dict, "inputs": Optional(dict),
                "wall_seconds": float, "cpu_seconds": float, "result": dict}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as JSON at ``path`` (atomically; the folder is made when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


class Stages:
    """Runs named stages once; each result is OUT/stages/NAME.json, written atomically at the end.

    ``bar``: a progress bar advanced by each stage's work weight (``update``, ``set_description``).
    """

    def __init__(self, out: Path, settings: dict[str, Any], *, resume: bool, bar: Any) -> None:
        self.dir, self.settings, self.resume, self.bar = out / "stages", settings, resume, bar

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def load(self, name: str) -> dict[str, Any]:
        return read_json_object(self.path(name), STAGE_SCHEMA)["result"]

    def _saved(self, p: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """The stage file's contents if it is to be kept, None if the stage is to be (re)done."""
        if not p.is_file():
            return None
        if not self.resume:
            raise ValueError(f"{p} exists from an earlier run; pass --resume to continue it or "
                             "choose another --output-dir")
        try:
            saved = read_json_object(p, STAGE_SCHEMA)
        except ValueError as err:  # cut by a crash, or damaged: the stage is simply done again
            warnings.warn(f"{err}; the stage is torn and is redone", RuntimeWarning, stacklevel=3)
            return None
        if saved["settings"] != self.settings:
            raise ValueError(f"{p} was made with other settings; choose another --output-dir")
        old = saved.get("inputs", {})
        changed = sorted(k for k in {*old, *inputs} if old.get(k) != inputs.get(k))
        if changed:
            warnings.warn(f"{p}: its inputs changed ({', '.join(changed)}); the stage is redone",
                          RuntimeWarning, stacklevel=3)
            return None
        return saved

    def run(self, name: str, work: float, fn: Callable[[], dict[str, Any]],
            inputs: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """``fn()``'s result, or the kept one; ``inputs()``: what besides the settings changes it."""
        p = self.path(name)
        now = {} if inputs is None else inputs()
        saved = self._saved(p, now)
        if saved is not None:
            self.bar.update(work)
            return saved["result"]
        self.bar.set_description(name)
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        write_json(p, {"format": STAGE_FORMAT, "stage": name, "settings": self.settings, "inputs": now,
                       "wall_seconds": wall, "cpu_seconds": cpu, "result": result})
        self.bar.update(work)
        return result


def get_key(result: Any, key: str) -> Any:
    """The value at dotted ``key`` ("a.b.3": list items by index) in a stage's result."""
    for part in key.split("."):
        result = result[int(part)] if isinstance(result, list) else result[part]
    return result


def resolve_source(out: Path, source: str) -> Any:
    """The value a report source "stages/NAME.json#a.b.3" points at (list items by index)."""
    path, _, key = source.partition("#")
    return get_key(read_json_object(Path(out) / path, STAGE_SCHEMA)["result"], key)


def stage_budget(stages: Stages, names: list[str]) -> dict[str, Any]:
    """Each stage's measured wall and CPU seconds, and their sums."""
    rows = {}
    for n in names:
        d = read_json_object(stages.path(n), STAGE_SCHEMA)
        rows[n] = {"wall_seconds": d["wall_seconds"], "cpu_seconds": d["cpu_seconds"]}
    return {"stages": rows, "wall_seconds": float(sum(r["wall_seconds"] for r in rows.values())),
            "cpu_seconds": float(sum(r["cpu_seconds"] for r in rows.values()))}
