"""Resumable stages: each result is OUT/stages/NAME.json, written atomically when the stage ends.

A stage file holds the run's settings, the stage's wall and CPU seconds and its result; ``resume``
skips a stage whose file exists with the same settings. The report reads only these files, and
each of its numbers names its source as "stages/NAME.json#a.b.3" (``resolve_source``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddpmkit.fileio import atomic_write_json, read_json_object

__all__ = ["STAGE_FORMAT", "Stages", "get_key", "resolve_source", "stage_budget", "write_json"]

STAGE_FORMAT = "ddpmkit.reproduce_stage"


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
        return read_json_object(self.path(name))["result"]

    def run(self, name: str, work: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        p = self.path(name)
        if p.is_file():
            saved = read_json_object(p)
            if self.resume and saved.get("settings") == self.settings:
                self.bar.update(work)
                return saved["result"]
            if not self.resume:
                raise ValueError(f"{p} exists from an earlier run; pass --resume to continue it or "
                                 "choose another --output-dir")
            raise ValueError(f"{p} was made with other settings; choose another --output-dir")
        self.bar.set_description(name)
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        write_json(p, {"format": STAGE_FORMAT, "stage": name, "settings": self.settings,
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
    return get_key(read_json_object(Path(out) / path)["result"], key)


def stage_budget(stages: Stages, names: list[str]) -> dict[str, Any]:
    """Each stage's measured wall and CPU seconds, and their sums."""
    rows = {}
    for n in names:
        d = read_json_object(stages.path(n))
        rows[n] = {"wall_seconds": d["wall_seconds"], "cpu_seconds": d["cpu_seconds"]}
    return {"stages": rows, "wall_seconds": float(sum(r["wall_seconds"] for r in rows.values())),
            "cpu_seconds": float(sum(r["cpu_seconds"] for r in rows.values()))}
