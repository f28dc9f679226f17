"""Data sources -> ``ImageDataset``: (C, H, W) float32 images in [-1, 1], un-augmented.

Sources (``open_source(src, ...)``):
- ``None`` or ``"digits"``: scikit-learn's 8x8 digits (1797 images, 16 gray levels v in 0..16
  stored as ``round(v * 255 / 16)``, so 8 -> 128 and 16 -> 255). Splits: ``"train"`` is the first
  1437 images, ``"test"`` the last 360 (20%, 33-37 of each class), ``"all"`` all 1797.
- ``"cifar10"``, ``"cifar10-train"``, ``"cifar10-test"``: CIFAR-10 from ``data_root()`` (see
  ``ddpmkit.data.cifar``); a ``-train``/``-test`` suffix takes precedence over ``split``.
- a CIFAR-10 archive (``*.tar.gz``, ``*.tgz``, ``*.tar``) or an extracted folder holding
  ``data_batch_1``/``test_batch``: ``"train"`` = data_batch_1..5 (50000), ``"test"`` =
  test_batch (10000), ``"all"`` = both.
- an ``.npz`` file: uint8 (N, H, W, C), C in {1, 3}, under ``arr_0`` or as its only array.
- an image folder (see ``ddpmkit.data.image_files``): decoded lazily, one file per item.
Folders and ``.npz`` files have no test split: ``split="test"`` is an error; ``"all"`` = ``"train"``.

Every source is fitted to ``resolution`` x ``resolution`` x ``channels`` the same way: center crop
to a square, Pillow bicubic (antialiased) resize, RGB -> gray by ITU-R 601-2 luma, gray -> RGB by
repetition. Data already at the size (digits at 8, CIFAR-10 at 32) is used as is.

Unreadable files in an image folder (``on_bad_image="skip"``, the default): item ``i`` whose file
cannot be decoded is replaced by the next readable file in order, ``(i + 1) % N``, ``(i + 2) % N``,
...; the file is named in a ``BadImageWarning`` the first time and counted in ``num_skipped``. The
replacement depends only on which files are unreadable, never on the order items are asked for,
so a resumed run reads exactly the images an uninterrupted one does. The record of bad files is a
shared-memory tensor, so DataLoader worker processes update the count the main process reads.
``on_bad_image="error"`` decodes every file before returning and raises a ValueError naming the
unreadable ones.
"""

from __future__ import annotations

import math
import operator
import os
import stat
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddpmkit.checks import check_int
from ddpmkit.data import cifar
from ddpmkit.data.convert import from_uint8_nhwc
from ddpmkit.data.image_files import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    check_images,
    decode_image,
    fit_array,
    fit_image,
    image_header,
    list_image_files,
)
from ddpmkit.enums import parse_enum

DIGITS_NUM_TEST = 360  # the last 360 of sklearn's 1797 digits are the held-out "test" split
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_SOURCE_HELP = (
    "expected 'digits', 'cifar10', 'cifar10-train', 'cifar10-test', an image folder, a CIFAR-10 "
    "archive (cifar-10-python.tar.gz) or folder (cifar-10-batches-py), or an .npz file"
)


class Split(str, Enum):
    TRAIN = "train"
    TEST = "test"
    ALL = "all"


class OnBadImage(str, Enum):
    """What a corrupt image file does: skipped with a warning naming it, or an error before step 1
    (``TrainConfig.on_bad_image``)."""

    SKIP = "skip"  # warn, count, and use the next readable file (deterministic)
    ERROR = "error"  # check every file up front; raise before training starts


class SourceKind(str, Enum):
    DIGITS = "digits"
    CIFAR10 = "cifar10"
    NPZ = "npz"
    FOLDER = "folder"


class BadImageWarning(UserWarning):
    """An image file that could not be decoded was skipped."""


# ----------------------------------------------------------------------------------------------
# Datasets


class ImageDataset(Dataset):
    """Images of one source, fitted to (channels, resolution, resolution).

    ``ds[i]`` -> (C, H, W) float32 in [-1, 1]; ``ds.get_batch(idx)`` -> (B, C, H, W);
    ``ds.uint8_images(idx)`` -> uint8 (B, H, W, C) for statistics (FID reference sets).
    ``labels`` is an int64 (N,) array for digits and CIFAR-10, else None.
    """

    kind: SourceKind

    def __init__(self, *, description: str, resolution: int, channels: int,
                 labels: np.ndarray | None = None):
        self.description = description
        self.resolution = resolution
        self.channels = channels
        self.labels = labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files found (and skipped) so far, by every process."""
        return 0

    @property
    def skipped_files(self) -> list[str]:
        return []

    def __len__(self) -> int:
        raise NotImplementedError

    def load_uint8(self, index: int) -> np.ndarray:
        """Item ``index`` as uint8 (H, W, C)."""
        raise NotImplementedError

    def _check_index(self, index) -> int:
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        return i % n

    def __getitem__(self, index) -> Tensor:
        return from_uint8_nhwc(self.load_uint8(self._check_index(index)))  # (C, H, W)

    def uint8_images(self, indices: Sequence[int] | Tensor | None = None) -> np.ndarray:
        """uint8 (B, H, W, C) for ``indices`` (default: all, in order)."""
        indices = range(len(self)) if indices is None else [int(i) for i in indices]
        out = np.empty((len(indices), self.resolution, self.resolution, self.channels), np.uint8)
        for k, i in enumerate(indices):
            out[k] = self.load_uint8(self._check_index(i))
        return out

    def get_batch(self, indices: Sequence[int] | Tensor) -> Tensor:
        """(B, C, H, W) float32 in [-1, 1] for ``indices``."""
        return from_uint8_nhwc(self.uint8_images(indices))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, {len(self)} images, shape {self.image_shape})"


class ArrayImageDataset(ImageDataset):
    """Images held in memory as one uint8 (N, H, W, C) tensor (digits, CIFAR-10, .npz)."""

    def __init__(self, images: np.ndarray, *, kind: SourceKind, description: str,
                 labels: np.ndarray | None = None):
        n, h, w, c = images.shape
        assert h == w and images.dtype == np.uint8, (images.shape, images.dtype)
        super().__init__(description=description, resolution=h, channels=c, labels=labels)
        self.kind = kind
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # (N, H, W, C) uint8

    def __len__(self) -> int:
        return self.images.shape[0]

    def load_uint8(self, index: int) -> np.ndarray:
        return self.images[index].numpy()

    def uint8_images(self, indices: Sequence[int] | Tensor | None = None) -> np.ndarray:
        if indices is None:
            return self.images.numpy().copy()
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)  # (B,)
        if idx.numel() and not (-len(self) <= int(idx.min()) and int(idx.max()) < len(self)):
            raise IndexError(f"indices out of range for {len(self)} images")
        return self.images[idx].numpy()

    def get_batch(self, indices: Sequence[int] | Tensor) -> Tensor:
        return from_uint8_nhwc(torch.from_numpy(self.uint8_images(indices)))


class FolderImageDataset(ImageDataset):
    """An image folder, decoded lazily with Pillow; unreadable files handled per ``on_bad_image``."""

    kind = SourceKind.FOLDER

    def __init__(self, folder: Path, files: list[Path], *, resolution: int, channels: int,
                 on_bad_image: OnBadImage):
        super().__init__(description=f"image folder {folder}", resolution=resolution, channels=channels)
        self.folder = folder
        self.files = files
        self.on_bad_image = on_bad_image
        self._bad = torch.zeros(len(files), dtype=torch.bool).share_memory_()  # (N,) skipped files

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_skipped(self) -> int:
        return int(self._bad.sum())

    @property
    def skipped_files(self) -> list[str]:
        return [str(self.files[i]) for i in torch.nonzero(self._bad).flatten().tolist()]

    def load_uint8(self, index: int) -> np.ndarray:
        n = len(self.files)
        for k in range(n):
            j = (index + k) % n  # the next readable file stands in for an unreadable one
            if self._bad[j]:
                continue
            try:
                im = decode_image(self.files[j])
            except UnreadableImageError as err:
                if self.on_bad_image is OnBadImage.ERROR:
                    raise ValueError(f"unreadable image {self.files[j]}: {err}") from None
                self._bad[j] = True
                warnings.warn(f"skipping unreadable image {self.files[j]}: {err} "
                              f"({self.num_skipped} skipped so far)", BadImageWarning, stacklevel=3)
                continue
            return fit_image(im, resolution=self.resolution, channels=self.channels)
        raise ValueError(f"none of the {n} image files in {self.folder} is readable "
                         f"(run `ddpm data verify {self.folder}`)")


# ----------------------------------------------------------------------------------------------
# Resolving and opening a source


@dataclass(frozen=True)
class _Resolved:
    kind: SourceKind
    path: Path | None = None
    split: Split | None = None  # forced by a name such as "cifar10-test"


def _resolve(src: str | os.PathLike | None, *, download: bool) -> _Resolved:
    if src is None or str(src).lower() == "digits":
        return _Resolved(SourceKind.DIGITS)
    name = str(src)
    named = {"cifar10": None, "cifar10-train": Split.TRAIN, "cifar10-test": Split.TEST}
    if name.lower() in named:
        return _Resolved(SourceKind.CIFAR10, cifar.find_cifar10(download=download), named[name.lower()])
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"data source {name!r} not found: {_SOURCE_HELP}")
    if path.is_dir():
        kind = SourceKind.CIFAR10 if cifar.is_cifar10_folder(path) else SourceKind.FOLDER
        return _Resolved(kind, path)
    lower = path.name.lower()
    if lower.endswith(".npz"):
        return _Resolved(SourceKind.NPZ, path)
    if lower.endswith(_TAR_SUFFIXES):
        return _Resolved(SourceKind.CIFAR10, path)
    hint = " (a single image; put it in a folder)" if path.suffix.lower() in IMAGE_EXTENSIONS else ""
    raise ValueError(f"data source {name!r} is a file of unknown kind{hint}: {_SOURCE_HELP}")


def load_digits_uint8(split: Split | str = Split.ALL) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits -> (images uint8 (N, 8, 8, 1) = round(v * 255 / 16), labels (N,))."""
    split = parse_enum(Split, split, "split")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("the digits need scikit-learn: pip install 'ddpmkit[digits]'") from None
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    labels = digits.target.astype(np.int64)
    n_train = images.shape[0] - DIGITS_NUM_TEST
    if split is Split.TRAIN:
        return images[:n_train], labels[:n_train]
    if split is Split.TEST:
        return images[n_train:], labels[n_train:]
    if split is Split.ALL:
        return images, labels
    raise NotImplementedError(split)


def load_npz_uint8(path: Path) -> np.ndarray:
    """An .npz file's uint8 (N, H, W, C) images, C in {1, 3}; a ValueError says what is wrong.

    Only a regular file is opened, and the array's header (shape, dtype, and the bytes it would
    need against those the archive holds) is checked before anything is allocated.
    """
    path = Path(path)
    try:
        with _open_npz(path) as f, zipfile.ZipFile(f) as z:
            member = _npz_member(path, z)
            with z.open(member) as m:
                _check_npy_header(path, m, member.file_size)
            with z.open(member) as m:
                return np.lib.format.read_array(m, allow_pickle=False)
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable .npz file ({err})") from None


def _open_npz(path: Path) -> Any:
    """``path`` opened for reading if it is a regular file holding a zip archive (an .npz)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block us
    except OSError as err:
        raise ValueError(f"{path}: cannot read file ({err.strerror or err})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ValueError(f"{path}: not a regular file (a FIFO, device or socket)")
    magic = f.read(6)
    f.seek(0)
    if magic == b"\x93NUMPY":
        f.close()
        raise ValueError(f"{path}: not a readable .npz file (a .npy file: save the images with np.savez)")
    if not zipfile.is_zipfile(f):
        f.close()
        raise ValueError(f"{path}: not a readable .npz file (an .npz is a zip archive of .npy arrays)")
    f.seek(0)
    return f


def _npz_member(path: Path, z: zipfile.ZipFile) -> zipfile.ZipInfo:
    """The images' member of an .npz archive: ``arr_0.npy``, or its only array."""
    keys = [n.removesuffix(".npy") for n in z.namelist()]
    if "arr_0" in keys or len(keys) == 1:
        key = "arr_0" if "arr_0" in keys else keys[0]
    else:
        raise ValueError(f"{path}: expected the images under 'arr_0' or as the only array, found {keys}")
    try:
        return z.getinfo(f"{key}.npy")
    except KeyError:
        raise ValueError(f"{path}: member {key!r} is not an .npy array") from None


def _check_npy_header(path: Path, m: Any, stored: int) -> None:
    """The .npy header of member ``m`` (``stored`` bytes uncompressed) describes uint8 NHWC images
    that the member holds in full and that fit in this machine's memory."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    version = np.lib.format.read_magic(m)
    if version not in readers:
        raise ValueError(f"{path}: .npy format version {version} is not supported")
    shape, _, dtype = readers[version](m)
    need = f"{path}: expected uint8 images shaped (N, H, W, C) with C = 1 or 3 (NHWC)"
    if dtype != np.uint8:
        raise ValueError(f"{need}, got dtype {dtype}; convert with "
                         "ddpmkit.data.convert.quantize_uint8 (floor((x + 1) * 127.5 + 1/2), clamped)")
    if len(shape) != 4:
        raise ValueError(f"{need}, got shape {shape}")
    if shape[-1] not in (1, 3):
        nchw = " (this looks like NCHW: use a.transpose(0, 2, 3, 1))" if shape[1] in (1, 3) else ""
        raise ValueError(f"{need}, got shape {shape}{nchw}")
    if shape[0] == 0:
        raise ValueError(f"{path}: the array holds no images (shape {shape})")
    nbytes, held = math.prod(shape), stored - m.tell()
    if nbytes != held:
        raise ValueError(f"{path}: the array header claims shape {shape} ({nbytes} bytes) but the file "
                         f"holds {held} bytes of it (truncated or corrupt)")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > memory:
        raise ValueError(f"{path}: shape {shape} needs {nbytes / 2**30:.1f} GiB, more than this machine's "
                         f"{memory / 2**30:.1f} GiB of memory")


def _split_for_unsplit_source(split: Split, r: _Resolved) -> None:
    if split is Split.TEST:
        raise ValueError(f"{r.path} ({r.kind.value}) has no test split; use split 'train' or 'all', "
                         "and give held-out images as a separate source")


def open_source(
    src: str | os.PathLike | None,
    *,
    resolution: int,
    channels: int,
    split: Split | str = Split.TRAIN,
    on_bad_image: OnBadImage | str = OnBadImage.SKIP,
    download: bool = False,
    progress: bool = False,
) -> ImageDataset:
    """Open a data source as an ``ImageDataset`` of (channels, resolution, resolution) images.

    Raises a ValueError, before reading any pixels, for a missing, unknown or empty source. With
    ``on_bad_image="error"`` an image folder is decoded in full first and any unreadable file is a
    ValueError. ``download=True`` lets "cifar10" fetch the archive when no local copy exists.
    """
    split = parse_enum(Split, split, "split")
    on_bad_image = parse_enum(OnBadImage, on_bad_image, "on_bad_image")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    check_int(resolution, "resolution", low=1)
    r = _resolve(src, download=download)
    if r.kind is SourceKind.DIGITS:
        images, labels = load_digits_uint8(split)
        desc = f"digits ({split.value})"
    elif r.kind is SourceKind.CIFAR10:
        split = r.split or split
        batches = {Split.TRAIN: cifar.CIFAR10_TRAIN_BATCHES, Split.TEST: cifar.CIFAR10_TEST_BATCHES,
                   Split.ALL: cifar.CIFAR10_TRAIN_BATCHES + cifar.CIFAR10_TEST_BATCHES}[split]
        images, labels = cifar.read_cifar10(r.path, batches)
        desc = f"CIFAR-10 {split.value} ({r.path})"
    elif r.kind is SourceKind.NPZ:
        _split_for_unsplit_source(split, r)
        images, labels, desc = load_npz_uint8(r.path), None, f"npz {r.path}"
    elif r.kind is SourceKind.FOLDER:
        _split_for_unsplit_source(split, r)
        return _open_folder(r.path, resolution=resolution, channels=channels,
                            on_bad_image=on_bad_image, progress=progress)
    else:
        raise NotImplementedError(r.kind)
    images = fit_array(images, resolution=resolution, channels=channels)
    return ArrayImageDataset(images, kind=r.kind, description=desc, labels=labels)


def _open_folder(folder: Path, *, resolution: int, channels: int, on_bad_image: OnBadImage,
                 progress: bool) -> FolderImageDataset:
    files, ignored = list_image_files(folder)
    if not files:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"no image files in {folder} (looked recursively for {exts}, any case; "
                         f"{ignored} other files ignored)")
    if on_bad_image is OnBadImage.ERROR:
        bad = check_images(files, progress=progress)
        if bad:
            listing = "; ".join(f"{p}: {why}" for p, why in bad[:3])
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise ValueError(f"{len(bad)} of {len(files)} image files in {folder} are unreadable "
                             f"({listing}{more}); run `ddpm data verify {folder}` for the list, "
                             "or use --on-bad-image skip")
    return FolderImageDataset(folder, files, resolution=resolution, channels=channels,
                              on_bad_image=on_bad_image)


@dataclass(frozen=True)
class SourceShape:
    """The stored size of a source's images, read from headers (folders) or the array (npz).

    sizes: the distinct (width, height); channels: 3 when any image is colour, else 1.
    """

    kind: SourceKind
    description: str
    sizes: tuple[tuple[int, int], ...]
    channels: int


def source_shape(src: str | os.PathLike | None, *, max_files: int = 4096) -> SourceShape:
    """The size and channels a source's images have as stored, without decoding pixels.

    An image folder reads the headers of up to ``max_files`` files, evenly spread over its sorted
    list (unreadable ones are left to training's ``on_bad_image``). Digits are 8x8 gray and
    CIFAR-10 32x32 colour by definition.
    """
    named_cifar = src is not None and str(src).lower() in ("cifar10", "cifar10-train", "cifar10-test")
    r = None if named_cifar else _resolve(src, download=False)
    if r is None or r.kind is SourceKind.CIFAR10:
        return SourceShape(SourceKind.CIFAR10, "CIFAR-10", ((32, 32),), 3)
    if r.kind is SourceKind.DIGITS:
        return SourceShape(r.kind, "digits", ((8, 8),), 1)
    if r.kind is SourceKind.NPZ:
        n, h, w, c = load_npz_uint8(r.path).shape
        return SourceShape(r.kind, f"npz {r.path}", ((w, h),), c)
    if r.kind is SourceKind.FOLDER:
        files, _ = list_image_files(r.path)
        if not files:
            _open_folder(r.path, resolution=1, channels=1, on_bad_image=OnBadImage.SKIP, progress=False)
        step = max(1, len(files) // max_files)
        sizes, colour = set(), False
        for path in files[::step][:max_files]:
            try:
                size, mode = image_header(path)
            except UnreadableImageError:  # a bomb, a FIFO, ...: left to on_bad_image when training
                continue
            sizes.add(size)
            colour |= mode not in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
        if not sizes:
            raise ValueError(f"none of the image files in {r.path} is readable "
                             f"(run `ddpm data verify {r.path}`)")
        return SourceShape(r.kind, f"image folder {r.path}", tuple(sorted(sizes)), 3 if colour else 1)
    raise NotImplementedError(r.kind)


@dataclass(frozen=True)
class SourceReport:
    """What ``inspect_source`` found: how many files/images were read, and which were unreadable."""

    kind: SourceKind
    description: str
    num_checked: int  # image files decoded (folders) or images read (digits, CIFAR-10, npz)
    num_ignored: int = 0  # files in a folder passed over for their extension
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def inspect_source(src: str | os.PathLike | None, *, download: bool = False,
                   workers: int | None = None, progress: bool = False) -> SourceReport:
    """Read every file of a source; a missing, unknown or empty source is a ValueError."""
    r = _resolve(src, download=download)
    if r.kind is SourceKind.DIGITS:
        return SourceReport(r.kind, "digits", load_digits_uint8(Split.ALL)[0].shape[0])
    if r.kind is SourceKind.CIFAR10:
        count, bad = cifar.verify_cifar10(r.path)
        return SourceReport(r.kind, f"CIFAR-10 {r.path}", count, bad=bad)
    if r.kind is SourceKind.NPZ:
        try:
            return SourceReport(r.kind, f"npz {r.path}", load_npz_uint8(r.path).shape[0])
        except ValueError as err:
            return SourceReport(r.kind, f"npz {r.path}", 0,
                                bad=[(str(r.path), str(err).removeprefix(f"{r.path}: "))])
    if r.kind is SourceKind.FOLDER:
        files, ignored = list_image_files(r.path)
        if not files:
            _open_folder(r.path, resolution=1, channels=1, on_bad_image=OnBadImage.SKIP, progress=False)
        bad = check_images(files, workers=workers, progress=progress)
        return SourceReport(r.kind, f"image folder {r.path}", len(files), ignored, bad)
    raise NotImplementedError(r.kind)


def verify_source(src: str | os.PathLike | None, *, download: bool = False,
                  workers: int | None = None, progress: bool = False) -> list[tuple[str, str]]:
    """(path, reason) for every unreadable file of a source, in order; [] when all are readable."""
    return inspect_source(src, download=download, workers=workers, progress=progress).bad
