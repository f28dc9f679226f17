"""Training checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A run directory holds ``checkpoints/step-000001000/``, each with

- ``model.safetensors``, ``ema.safetensors``: the raw and the EMA U-Net state dicts (float32);
- ``optimizer.safetensors``: the optimiser's per-parameter state tensors (``state.{i}.{name}``);
- ``rng.safetensors``: torch CPU / CUDA / training-generator states (uint8 tensors);
- ``state.json``: step, data order position, optimiser hyper-parameters, numpy and ``random``
  states, the config, anything else the trainer needs;
- ``manifest.json``, written last: the byte size and SHA-256 of every other file.

A checkpoint is written into ``checkpoints/.tmp-step-...``, every file fsynced, the manifest last,
then the folder is renamed into place and the parent fsynced. A folder without a manifest, or whose
files do not match it, is torn and is ignored by ``latest_checkpoint``; ``newest_loadable`` also
checks every SHA-256 and skips a corrupt one with a warning naming the file. Manifest names are
confined to the folder: each must be a regular file in it, never a symlink. Old checkpoints are
pruned only after the new one is complete, each renamed to ``.del-...`` before it is deleted. Nothing
is pickled: loading a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from ddpmkit.fileio import fsync_dir, full_disk_is_an_error, loads_json, read_json_object
from ddpmkit.schema import DictOf, problem

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "capture_rng_state",
    "checkpoint_dir",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "manifest_problem",
    "newest_loadable",
    "optimizer_state_from_tensors",
    "optimizer_state_to_tensors",
    "prune",
    "read_state",
    "replace_dir_atomically",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "ddpmkit.checkpoint"
CHECKPOINT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{9})$")


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``tensors[group][name]`` from ``group.safetensors``, and ``state.json``."""

    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _write_synced(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path``, flush and fsync; returns its manifest entry."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write the checkpoint of ``step`` atomically; then keep only the newest ``keep_last``.

    tensors: group name -> flat {name: Tensor}; each group becomes ``group.safetensors``.
    state: JSON-able dict, written as ``state.json`` with ``step`` added. Returns the folder.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    with full_disk_is_an_error(final):
        try:
            tmp.mkdir()
            _write_files(tmp, step, tensors, state)
            replace_dir_atomically(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed write (a full disk) leaves no partial copy
    _prune(root, keep_last)
    return final


def _write_files(tmp: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                 state: dict[str, Any]) -> None:
    """Every file of a checkpoint into ``tmp``, each fsynced, the manifest last; then ``tmp`` itself."""
    files: dict[str, Any] = {}
    for group, flat in tensors.items():
        data = save_safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in flat.items()})
        files[f"{group}.safetensors"] = _write_synced(tmp / f"{group}.safetensors", data)
    state_bytes = json.dumps({**state, "step": step}, indent=1, sort_keys=True).encode()
    files[STATE] = _write_synced(tmp / STATE, state_bytes)
    manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, "files": files}
    _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    fsync_dir(tmp)


def replace_dir_atomically(src: Path, dst: Path) -> None:
    """Rename the complete folder ``src`` to ``dst``, replacing any old ``dst``; fsync the parent.

    An old ``dst`` is first renamed aside and deleted only after ``src`` is in place, so at every
    instant one complete version exists under ``dst`` or beside it.
    """
    old = dst.with_name(f".old-{dst.name}-{os.getpid()}")
    if dst.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(dst, old)
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if old.exists():
        shutil.rmtree(old)


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Finish what a kill left of pruning: the rules of ``_prune`` applied to ``run_dir``."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        _prune(root, keep_last)


def _prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, torn ones older than the newest
    complete one, and temp folders. Each is first renamed to ``.del-...`` (atomic), so a kill
    mid-delete leaves a folder that the next prune finishes, never a half-deleted ``step-...``."""
    complete = list_checkpoints(root.parent)
    doomed = complete[:-keep_last]
    if complete:
        newest = complete[-1].name
        doomed += [p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir() and p.name < newest
                   and p not in complete and not p.is_symlink()]  # a link is not this run's to delete
    for path in doomed:
        aside = root / f".del-{path.name}"
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(path, aside)
    if doomed:
        fsync_dir(root)
    for path in root.iterdir():
        if path.name.startswith((".tmp-", ".old-", ".del-")) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _safe_name(name: Any) -> bool:
    """A manifest entry must name a plain file directly inside the checkpoint folder."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not name.startswith(".") and Path(name).name == name)


MANIFEST_SCHEMA = {"format": str, "version": int, "step": int, "files": DictOf({"bytes": int, "sha256": str})}


def manifest_problem(path: str | Path, *, required: tuple[str, ...] = (STATE,)) -> str | None:
    """Why ``path`` is not a complete checkpoint (manifest shape, names, sizes), or None when it is.

    ``required``: file names that the manifest must list. Names are confined to the folder.
    """
    path = Path(path)
    try:
        manifest = read_json_object(path / MANIFEST)
    except (OSError, ValueError) as e:  # the message names the file
        return str(e)
    if manifest.get("format") != CHECKPOINT_FORMAT:
        return f"{path / MANIFEST}: not a {CHECKPOINT_FORMAT} manifest"
    shape = problem(manifest, MANIFEST_SCHEMA)
    if shape is not None:
        return f"{path / MANIFEST}: {shape}"
    files = manifest["files"]
    missing = [n for n in required if n not in files]
    if missing:
        return f"{path / MANIFEST}: does not list {missing}"
    for name, entry in files.items():
        if not _safe_name(name):
            return f"{path / MANIFEST}: file name {name!r} is not a plain name inside the folder"
        if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            return f"{path / MANIFEST}: entry {name!r} is not {{bytes: int, sha256: hex}}"
        f = path / name
        try:
            info = f.lstat()  # a symlink is not followed: entries may not leave the folder
        except OSError:
            return f"{f}: missing"
        if not stat.S_ISREG(info.st_mode):
            return f"{f}: not a regular file (a symlink, folder or device)"
        if info.st_size != entry["bytes"]:
            return f"{f}: its size differs from the manifest"
    return None


def _read_entry(path: Path) -> bytes:
    """The bytes of a checkpoint entry, opened without following a link (swapped in since the check)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise ValueError(f"{path}: not a regular file or unreadable ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path}: not a regular file (a symlink, folder or device)")
        return f.read()


def is_complete(path: str | Path) -> bool:
    """True when ``path`` has a valid manifest and every file it lists with the listed size."""
    return manifest_problem(path) is None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first. Torn and temporary folders, and step folders
    that are symlinks (not this run's), are ignored."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir() and not p.is_symlink()]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, *, required: tuple[str, ...] = (STATE,),
                    validate: Callable[[Checkpoint], None] | None = None) -> Checkpoint:
    """Read a checkpoint folder, checking every file against the manifest's SHA-256.

    A torn or corrupt checkpoint (one lacking a ``required`` file, or one that ``validate``, the
    reader's own field-by-field check, refuses with a ValueError) is a ValueError naming the file.
    """
    path = Path(path)
    problem_ = manifest_problem(path, required=tuple({STATE, *required}))
    if problem_ is not None:
        raise ValueError(f"{path} is not a complete ddpmkit checkpoint: {problem_}")
    manifest = read_json_object(path / MANIFEST)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    state: Any = None
    for name, entry in manifest["files"].items():
        data = _read_entry(path / name)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{path / name}: SHA-256 does not match the manifest (corrupt checkpoint)")
        if name == STATE:
            state = loads_json(data, str(path / name))  # a ValueError naming the file
            continue
        try:
            if name.endswith(".safetensors"):
                tensors[name.removesuffix(".safetensors")] = load_safetensors_bytes(data)
        except Exception as e:  # noqa: BLE001 - any parse failure of a hashed file is a torn checkpoint
            raise ValueError(f"{path / name}: unreadable ({e})") from None
    if not isinstance(state, dict) or type(state.get("step")) is not int or state["step"] != manifest["step"]:
        raise ValueError(f"{path / STATE}: lacks a step matching the manifest")
    checkpoint = Checkpoint(path=path, step=state["step"], tensors=tensors, state=state)
    if validate is not None:
        validate(checkpoint)
    return checkpoint


def newest_loadable(run_dir: str | Path, *, required: tuple[str, ...] = (STATE,),
                    validate: Callable[[Checkpoint], None] | None = None,
                    warn: Any = None) -> Checkpoint | None:
    """The newest checkpoint of a run that loads (manifest, sizes, SHA-256, ``validate``).

    Each newer one that does not is torn: ``warn(message naming the file)`` and the next older is tried.
    """
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in root.iterdir()
                   if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    for _, path in reversed(found):
        try:
            return load_checkpoint(path, required=required, validate=validate)
        except ValueError as e:
            if warn is not None:
                warn(f"skipping torn checkpoint: {e}")
    return None


def optimizer_state_to_tensors(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors ``state.{i}.{name}``, JSON: param_groups + scalars)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in opt_state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``optimizer_state_to_tensors``: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def capture_rng_state(generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG of this process: (tensors: torch CPU, CUDA devices, ``generator``; JSON: numpy, random)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    if generator is not None:
        tensors["generator"] = generator.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "random": [version, list(internal), gauss_next],
    }
    return tensors, meta


def restore_rng_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], generator: torch.Generator | None = None
) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("torch_cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda][: torch.cuda.device_count()])
    if generator is not None and "generator" in tensors:
        generator.set_state(tensors["generator"])
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = meta["random"]
    random.setstate((version, tuple(internal), gauss_next))


def read_state(path: str | Path) -> dict[str, Any]:
    """``state.json`` of a complete checkpoint (step, config, ...) without reading its tensors."""
    path = Path(path)
    problem = manifest_problem(path)
    if problem is not None:
        raise ValueError(f"{path} is not a complete ddpmkit checkpoint: {problem}")
    return read_json_object(path / STATE)
