"""Crash-safe file I/O: fsynced writes renamed into place, strict JSON reads naming the file, locks.

Every published artefact goes through ``atomic_write_bytes`` (temporary file in the same folder,
flush, fsync, rename, fsync of the folder), so after a kill or a power cut a path holds either its
old complete bytes or its new complete bytes, never a prefix.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from ddpmkit.schema import check

__all__ = ["RunLock", "append_line_synced", "atomic_write", "atomic_write_bytes", "atomic_write_folder",
           "atomic_write_json", "check_output_path", "fsync_dir", "full_disk_is_an_error", "loads_json",
           "read_json_lines", "read_json_object"]

# Bounds of every JSON read: far above what ddpmkit writes (a bits/dim partial file of CIFAR-10's
# training set is ~30 MB; nothing nests 10 deep), far below what exhausts memory or the C stack.
MAX_JSON_BYTES = 256 * 2**20
MAX_JSON_LINE_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 64


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so that renames and new entries in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def full_disk_is_an_error(path: str | Path) -> Iterator[None]:
    """A write under this context that finds the disk (or the quota, or the file size limit) full is
    a one-line ValueError naming ``path``; any other OSError passes through. The caller removes its
    temporary files on the way out."""
    try:
        yield
    except OSError as e:
        if e.errno not in _FULL_DISK:
            raise
        raise ValueError(f"cannot write {path}: {e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)}); "
                         "free some space and run again") from None


def check_output_path(path: str | Path, *, folder: bool = False) -> Path:
    """``path``, once it is known that a file (``folder`` False) or a folder can be written there,
    before any work: a folder where a file goes (or a file where a folder goes), a symlink where a
    folder goes (ddpmkit replaces folders, and would replace the link's target), and a folder that
    cannot be written (a probe file is made and removed) are each a one-line ValueError."""
    path = Path(path)
    if folder and path.is_symlink():
        raise ValueError(f"{path} is a symlink; ddpmkit replaces this folder and does not follow links: "
                         "remove the link or choose another path")
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name")
    where = path if folder and path.is_dir() else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=where, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write to {where}: {e.strerror or e}") from None
    return path


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` into ``.tmp-NAME-PID`` in ``path``'s folder, fsync, rename onto ``path``, fsync the
    folder: the one implementation of an atomic write in ddpmkit (a cut write leaves only the temp file,
    which a resumed run removes)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with full_disk_is_an_error(path):
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        fsync_dir(path.parent)


def atomic_write_folder(path: str | Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` fills the folder ``.tmp-NAME-PID`` beside ``path``, which is then renamed onto
    ``path`` (absent, or an empty folder): a cut or failed write leaves no partial folder at
    ``path``, so a rerun just works. The temporary folder is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with full_disk_is_an_error(path):
        try:
            write(tmp)
            if path.is_dir():
                path.rmdir()  # only an empty folder can be replaced: rmdir refuses anything else
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` to ``path`` atomically (``atomic_write``)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int = 2, sort_keys: bool = True) -> None:
    """``obj`` as JSON (then a newline) to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n").encode())


def append_line_synced(path: str | Path, line: str) -> None:
    """Append one line and fsync it (metrics.jsonl): a power cut or a full disk tears at most the last
    line (a reader drops it)."""
    with full_disk_is_an_error(path), open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _nesting_depth(data: bytes) -> int:
    """How deeply arrays and objects nest in JSON text (strings removed first), without parsing it."""
    import numpy as np

    step = np.zeros(256, np.int64)  # +1 for [ and {, -1 for ] and }
    step[[ord("["), ord("{")]], step[[ord("]"), ord("}")]] = 1, -1
    code = np.frombuffer(_JSON_STRING.sub(b"", data), np.uint8)
    return int(np.cumsum(step[code]).max(initial=0))


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def loads_json(data: bytes | str, where: str, *, max_bytes: int | None = None) -> Any:
    """Strict JSON: a ValueError ``"{where}: ..."`` for text over ``max_bytes`` (default
    ``MAX_JSON_BYTES``), nested deeper than ``MAX_JSON_DEPTH`` (checked before parsing, so never a
    RecursionError), or not valid JSON."""
    max_bytes, max_depth = MAX_JSON_BYTES if max_bytes is None else max_bytes, MAX_JSON_DEPTH
    data = data.encode() if isinstance(data, str) else bytes(data)
    if len(data) > max_bytes:
        raise ValueError(f"{where}: {len(data)} bytes of JSON, more than the {max_bytes} accepted")
    if _nesting_depth(data) > max_depth:
        raise ValueError(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{where}: not valid JSON ({err})") from None


def read_json_object(path: str | Path, schema: Any = None) -> dict[str, Any]:
    """A JSON object from ``path`` (``loads_json``'s bounds), of ``schema`` when given (see
    ``ddpmkit.schema``): FileNotFoundError if there is no file, else a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as err:
        raise ValueError(f"{path}: cannot read JSON ({err})") from None
    data = loads_json(data, str(path))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data if schema is None else check(data, schema, str(path))


def read_json_lines(path: str | Path) -> list[tuple[str, Any]]:
    """(line, value) for every line of a JSON-lines file (metrics.jsonl, a bits/dim partial file),
    [] if there is none. A line torn by an interruption or a full disk, or one outside
    ``loads_json``'s bounds, reads as value None (ddpmkit never writes a bare null); each caller
    decides what a torn line means for it."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_bytes().decode(errors="replace").splitlines():
        try:
            out.append((line, loads_json(line, str(path), max_bytes=MAX_JSON_LINE_BYTES)))
        except ValueError:
            out.append((line, None))
    return out


class RunLock:
    """An exclusive POSIX lock (``fcntl.lockf``) on ``FOLDER/.lock`` (or another ``name``), holding
    ``PID@host`` of its owner: one ddpmkit process per run folder, sample folder or bits/dim file.

    The kernel drops the lock when its process dies (kill -9 included), and forked children (data
    loader workers) do not inherit it (a ``flock`` they would keep), so a lock left by a dead
    run is stale by construction and simply taken over. ``acquire`` also checks that the folder can
    be written, before any work: a clear ValueError names the folder, or the live holder.
    """

    def __init__(self, folder: str | Path, *, name: str = ".lock", what: str | None = None) -> None:
        """``name``: the lock file in ``folder``; ``what``: what it guards, for messages (the folder)."""
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = str(self.folder) if what is None else what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a symlink planted at .lock must not redirect our write; O_NONBLOCK: nor a FIFO hang
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise ValueError(f"{self.path} is not a plain file (a symlink, folder or device); "
                                 "remove it and run again") from None
            raise ValueError(f"cannot write to {self.folder}: {e.strerror or e}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"{self.path} is not a plain file (a symlink, folder or device); "
                             "remove it and run again")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # POSIX lock: not inherited by forked workers
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ValueError(f"cannot lock {self.path}: {e.strerror or e}") from None
            raise ValueError(f"{self.what} is in use by another ddpmkit process (PID@host {holder}); "
                             "wait for it to end or choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
