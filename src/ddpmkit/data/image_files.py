"""Image files with Pillow: find them, decode them safely, center-crop and resize them.

The data sources' side of images (``ddpmkit.images`` is uint8 grids and PNG writes).

A folder source is every file under the folder (recursively, hidden files and folders excluded)
whose extension is one of ``IMAGE_EXTENSIONS``, matched case-insensitively. A file counts as
readable only when Pillow identifies it as one of ``ACCEPTED_FORMATS`` (whatever its extension
says) and decodes every pixel of it (its first frame, for animations): a ``.png`` holding text, a
zero-byte file, a truncated JPEG and a file of another format (an ``.ico`` renamed ``.png``) are
all unreadable, and so is a decompression bomb. Pillow is only asked to try the accepted formats,
so no other decoder ever runs; and only regular files are read, so a FIFO never hangs a scan.
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
# Pillow format names. "MPO" is what Pillow calls a multi-picture JPEG, as many cameras write.
ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "BMP", "GIF", "WEBP", "TIFF")
_OPEN_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")  # MPO is opened by the JPEG plugin
_CHANNEL_MODES = {1: "L", 3: "RGB"}


class UnreadableImageError(Exception):
    """A file that is not a readable image of an accepted type; ``str(err)`` is the reason."""


def list_image_files(folder: Path) -> tuple[list[Path], int]:
    """All image files under ``folder``, sorted by their path relative to it.

    Returns (files, num_ignored): files with an image extension (case-insensitive), and how many
    other regular files were passed over. Hidden files and folders (name starting with ".", such
    as macOS ``._x.jpg`` resource forks) are skipped; symlinked folders are not followed.
    """
    files: list[Path] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(Path(dirpath, name))
            else:
                ignored += 1
    files.sort(key=lambda p: p.relative_to(folder).as_posix())
    return files, ignored


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file (a symlink to one is fine); a FIFO, a
    device or a socket is refused without blocking on it (O_NONBLOCK), never read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise UnreadableImageError(f"cannot read file: {err.strerror or err}") from None
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise UnreadableImageError(f"not a regular file ({kind})")
    return f


def image_header(path: str | os.PathLike) -> tuple[tuple[int, int], str]:
    """((width, height), Pillow mode) from an image file's header, without decoding its pixels;
    ``UnreadableImageError`` as ``decode_image`` raises it (decompression bombs included)."""
    with _open_regular(Path(path)) as f:
        try:
            with Image.open(f, formats=_OPEN_FORMATS) as im:
                return im.size, im.mode
        except Image.DecompressionBombError as err:
            raise UnreadableImageError(f"image too large to decode safely: {err}") from None
        except Exception as err:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ...
            raise UnreadableImageError(f"not a readable image ({type(err).__name__}: {err})") from None


def decode_image(path: str | os.PathLike) -> Image.Image:
    """Decode a whole image file into a loaded Pillow image of mode "L" or "RGB".

    16-bit grayscale is scaled to 8 bits (v / 257); a palette or alpha image is converted through
    RGBA and its alpha dropped; EXIF orientation is applied. Raises ``UnreadableImageError`` with
    a one-line reason for anything that is not a readable image of an accepted type, and for what
    is not a regular file (a FIFO is never opened for a blocking read).
    """
    with _open_regular(Path(path)) as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise UnreadableImageError("empty file (0 bytes)")
        return _decode(f)


def _decode(f: BinaryIO) -> Image.Image:
    fmt = "image"
    try:
        with Image.open(f, formats=_OPEN_FORMATS) as im:
            fmt = im.format or fmt
            im.load()  # decodes every pixel of the first frame; raises on truncated data
            if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                im = ImageOps.exif_transpose(im)  # a camera photo stored sideways
            return _normalise_mode(im)
    except UnidentifiedImageError:
        raise UnreadableImageError(
            f"not an image of an accepted type ({', '.join(_OPEN_FORMATS)})"
        ) from None
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(f"{fmt} image too large to decode safely: {err}") from None
    except UnreadableImageError:
        raise
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, EOFError, struct.error, ...
        raise UnreadableImageError(f"corrupt or truncated {fmt} data ({type(err).__name__}: {err})") from None


def _normalise_mode(im: Image.Image) -> Image.Image:
    """Any decoded mode -> "L" (grayscale) or "RGB"."""
    if im.mode in ("L", "RGB"):
        return im
    if im.mode in ("1",):
        return im.convert("L")
    if im.mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale: scale 0..65535 -> 0..255
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "F":
        raise UnreadableImageError("floating-point images are not supported; save it as 8 or 16 bits")
    if im.mode in ("LA", "La"):
        return im.convert("L")
    if im.mode in ("P", "PA") or "A" in im.mode or "a" in im.mode:
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def fit_image(im: Image.Image, *, resolution: int, channels: int) -> np.ndarray:
    """Center-crop to a square, then resize to ``resolution`` (Pillow bicubic, antialiased); set channels.

    im: any mode "L"/"RGB" image  ->  (resolution, resolution, channels) uint8.
    RGB -> 1 channel is Pillow's ITU-R 601-2 luma; 1 -> 3 channels repeats the gray value.
    An image already square at ``resolution`` is not resampled.
    """
    mode = _CHANNEL_MODES[channels]
    if im.mode != mode:
        im = im.convert(mode)
    w, h = im.size
    if w != h:  # the centered square, integer offsets (the extra pixel of an odd margin on the right/bottom)
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
    a = np.array(im, dtype=np.uint8)  # a writable copy
    return a.reshape(resolution, resolution, channels)  # (H, W, C)


def fit_array(images: np.ndarray, *, resolution: int, channels: int) -> np.ndarray:
    """``fit_image`` over a uint8 (N, H, W, C) array with C in {1, 3}; a no-op when it already fits."""
    n, h, w, c = images.shape
    if (h, w, c) == (resolution, resolution, channels):
        return images
    out = np.empty((n, resolution, resolution, channels), dtype=np.uint8)
    for i in range(n):
        im = Image.fromarray(images[i, :, :, 0] if c == 1 else images[i], mode=_CHANNEL_MODES[c])
        out[i] = fit_image(im, resolution=resolution, channels=channels)
    return out


def check_image(path: Path) -> str | None:
    """None when ``path`` decodes as an accepted image, else the reason it does not."""
    try:
        decode_image(path)
    except UnreadableImageError as err:
        return str(err)
    return None


def check_images(
    files: list[Path], *, workers: int | None = None, progress: bool = False
) -> list[tuple[str, str]]:
    """(path, reason) for every unreadable file, in the order of ``files``.

    Decodes in a thread pool (Pillow releases the GIL while decoding), a bounded chunk at a time
    so that millions of files do not mean millions of pending futures.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    chunk = 256 * workers
    bar = None
    if progress:
        from ddpmkit.logs import progress_bar

        bar = progress_bar(total=len(files), desc="checking images", unit="file")
    bad: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(files), chunk):
            part = files[start:start + chunk]
            bad += [(str(p), r) for p, r in zip(part, pool.map(check_image, part), strict=True) if r]
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
    return bad
