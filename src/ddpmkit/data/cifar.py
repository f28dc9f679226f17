"""CIFAR-10 from its official python archive, without extracting it and without trusting pickle.

The official ``cifar-10-python.tar.gz`` (md5 c58f30108f718f92721af3b95e74349a) holds
``cifar-10-batches-py/{data_batch_1..5, test_batch}``, each a Python 2 pickle of a dict with
``b"data"`` (10000, 3072) uint8 (channel planes R, G, B of a 32x32 image, row-major) and
``b"labels"`` (10000 ints in 0..9). Pickle can run arbitrary code, so batches are read with an
unpickler that resolves only the few numpy functions an array needs and refuses anything else.

Where the named sources ("cifar10", "cifar10-train", "cifar10-test") look: ``data_root()``, that is
``$DDPMKIT_DATA`` or ``~/.cache/ddpmkit/data``, for ``cifar-10-python.tar.gz`` or an extracted
``cifar-10-batches-py/`` folder. Only ``download=True`` fetches the archive (and checks its md5).
"""

from __future__ import annotations

import codecs
import hashlib
import importlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ddpmkit.fileio import atomic_write

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)


def data_root() -> Path:
    """Where named data sets live: ``$DDPMKIT_DATA``, else ``~/.cache/ddpmkit/data``."""
    env = os.environ.get("DDPMKIT_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ddpmkit" / "data"


def _numpy_global(*modules: str, name: str):
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


_RECONSTRUCT = _numpy_global("numpy._core.multiarray", "numpy.core.multiarray", name="_reconstruct")
_FROMBUFFER = _numpy_global("numpy._core.numeric", "numpy.core.numeric", name="_frombuffer")
# (module, name) as written in a pickle -> the object it may resolve to. Nothing else loads.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Loads dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        obj = _SAFE_GLOBALS.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only a dict of numpy "
                "arrays and lists"
            )
        return obj


def unpickle_batch(raw: bytes, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file's bytes -> (images uint8 (N, 32, 32, 3), labels int64 (N,)).

    Raises ValueError naming ``name`` when the bytes are not a CIFAR-10 batch (or try to load
    anything but numpy arrays).
    """
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # UnpicklingError, EOFError, ValueError, ... from hostile or torn bytes
        raise ValueError(f"{name}: not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{name}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32 and labels.shape == (data.shape[0],)):
        raise ValueError(
            f"{name}: b'data' must be uint8 (N, 3072) with N labels, got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')} "
            f"and {labels.shape[0] if labels.ndim else 0} labels"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 3, H, W) -> (N, H, W, C)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def read_batch_files(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The raw bytes of those of ``names`` present in an archive (read in place) or a folder.

    path: ``cifar-10-python.tar.gz`` (any tar, members matched by base name) or an extracted
    ``cifar-10-batches-py`` folder. Absent names are absent from the result; an unreadable
    archive is a ValueError.
    """
    if path.is_dir():
        return {n: (path / n).read_bytes() for n in names if (path / n).is_file()}
    try:
        with tarfile.open(path, "r:*") as tar:
            found = {}
            for member in tar:  # one sequential pass over the (gzip) stream
                base = Path(member.name).name
                if member.isfile() and base in names and base not in found:
                    found[base] = tar.extractfile(member).read()
            return found
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a readable tar archive ({type(err).__name__}: {err})") from None


def read_cifar10(path: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The named batches, concatenated: (images uint8 (N, 32, 32, 3), labels int64 (N,))."""
    raws = read_batch_files(path, names)
    missing = [n for n in names if n not in raws]
    if missing:
        raise ValueError(f"{path} is not a complete CIFAR-10 archive or folder: no {', '.join(missing)}")
    parts = [unpickle_batch(raws[n], name=f"{path}:{n}") for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def verify_cifar10(path: Path) -> tuple[int, list[tuple[str, str]]]:
    """(number of images read, [(batch, reason)] for each missing or unreadable batch)."""
    names = CIFAR10_TRAIN_BATCHES + CIFAR10_TEST_BATCHES
    try:
        raws = read_batch_files(path, names)
    except ValueError as err:
        return 0, [(str(path), str(err).removeprefix(f"{path}: "))]
    count, bad = 0, []
    for n in names:
        where = f"{path}:{n}" if path.is_file() else str(path / n)
        if n not in raws:
            bad.append((where, "missing CIFAR-10 batch"))
            continue
        try:
            count += unpickle_batch(raws[n], name=n)[0].shape[0]
        except ValueError as err:
            bad.append((where, str(err).removeprefix(f"{n}: ")))
    return count, bad


def is_cifar10_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "data_batch_1").is_file() or (path / "test_batch").is_file())


def find_cifar10(root: Path | None = None, *, download: bool = False) -> Path:
    """The CIFAR-10 archive or extracted folder under ``root`` (default ``data_root()``).

    With ``download=True`` and no local copy, fetches ``CIFAR10_URL`` into ``root`` and checks its
    md5. Otherwise a missing copy is a ValueError saying what to fetch and where to put it.
    """
    root = Path(root) if root is not None else data_root()
    for candidate in (root / CIFAR10_FOLDER, root / CIFAR10_ARCHIVE):
        if candidate.exists():
            return candidate
    if download:
        return download_cifar10(root)
    raise ValueError(
        f"CIFAR-10 not found in {root}: download {CIFAR10_URL} (md5 {CIFAR10_MD5}) and put it at "
        f"{root / CIFAR10_ARCHIVE} (or pass --download, or set DDPMKIT_DATA to the folder holding it)"
    )


def download_cifar10(root: Path, *, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5,
                     timeout: float = 60.0) -> Path:
    """Fetch the archive into ``root/cifar-10-python.tar.gz`` atomically; verify its md5 first."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / CIFAR10_ARCHIVE

    def fetch_and_verify(out: Any) -> None:  # a mismatch raises inside the atomic write: nothing is renamed
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(
                f"downloaded {url} has md5 {digest.hexdigest()}, expected {md5}; "
                f"fetch it by hand and put it at {target}"
            )

    try:
        atomic_write(target, fetch_and_verify)
    except (urllib.error.URLError, OSError) as err:
        raise ValueError(
            f"could not download {url} ({err}); fetch it by hand (md5 {md5}) and put it at {target}"
        ) from None
    return target
