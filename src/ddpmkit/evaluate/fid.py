"""FID and IS of a set of samples against a reference (Heusel et al. 2017; Salimans et al. 2016).

Done the way the paper's numbers were made: samples are 8-bit images (float tensors are rounded,
never truncated), the feature network is in eval mode, statistics are float64 over every feature
(so the batch size does not matter), and the reference statistics come from un-augmented data,
computed once and cached under ``cache_dir()/fid_stats`` keyed by the source, its content and the
feature network. The feature network is injected (``extractor``), so tests use a small stand-in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpmkit.checks import check_int
from ddpmkit.evaluate.frechet import FeatureStats, frechet_distance, inception_score
from ddpmkit.fileio import atomic_write
from ddpmkit.images import to_uint8_nhwc

__all__ = [
    "PAPER_NUM_SAMPLES",
    "FewSamplesWarning",
    "cache_dir",
    "compute_fid",
    "feature_statistics",
    "load_samples",
    "reference_statistics",
]

PAPER_NUM_SAMPLES = 50_000
# extractor(x uint8 (B, C, H, W)) -> {"pool": (B, D) features, optionally "logits": (B, K)}
Extractor = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class FewSamplesWarning(UserWarning):
    """FID/IS from fewer than 50,000 samples: biased, not comparable with the paper."""


def cache_dir() -> Path:
    """``$DDPMKIT_CACHE``, else ``$XDG_CACHE_HOME/ddpmkit``, else ``~/.cache/ddpmkit``."""
    if os.environ.get("DDPMKIT_CACHE"):
        return Path(os.environ["DDPMKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "ddpmkit"


def _sample_images(x: Any) -> np.ndarray:
    """Samples (``images.to_uint8_nhwc``: uint8 NHWC passes, floats are rounded, never truncated)
    as uint8 (N, H, W, C) with the 1 or 3 channels the feature networks take."""
    a = to_uint8_nhwc(x)
    if a.shape[-1] not in (1, 3):
        raise ValueError(f"expected images shaped (N, H, W, C) with C = 1 or 3, got {a.shape}")
    return a


def load_samples(path: str | os.PathLike) -> np.ndarray:
    """An ``.npz`` (uint8 NHWC under arr_0) or an image folder -> uint8 (N, H, W, C).

    Every image of a folder must have the size and channel count of the first (no resizing). In a
    folder written by ``ddpm sample`` (it holds ``sampling.json``) only the sample PNGs
    ``000123.png`` count, not ``grid.png``.
    """
    from ddpmkit.data import load_npz_uint8
    from ddpmkit.data.image_files import UnreadableImageError, decode_image, list_image_files

    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"samples {str(path)!r} not found: expected an .npz file or an image folder")
    if p.is_file():
        if p.suffix.lower() != ".npz":
            raise ValueError(f"samples {p}: expected an .npz file (uint8 NHWC under arr_0) or an "
                             "image folder")
        return _sample_images(load_npz_uint8(p))
    files, _ = list_image_files(p)
    if (p / "sampling.json").is_file():  # a `ddpm sample` folder: the index PNGs, not grid.png
        files = [f for f in files if f.parent == p and re.fullmatch(r"\d+\.png", f.name)]
    if not files:
        raise ValueError(f"the sample set is empty: no image files in {p}")
    images = []
    for f in files:
        try:
            a = np.asarray(decode_image(f))
        except UnreadableImageError as err:
            raise ValueError(f"unreadable sample image {f}: {err}") from None
        a = a[..., None] if a.ndim == 2 else a  # (H, W, C)
        if images and a.shape != images[0].shape:
            raise ValueError(f"mismatched image sizes in {p}: {files[0].name} is {images[0].shape} "
                             f"(H, W, C) but {f.name} is {a.shape}")
        images.append(a)
    return np.stack(images)  # (N, H, W, C)


def _batches(images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    for s in range(0, images.shape[0], batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).permute(0, 3, 1, 2)


def feature_statistics(
    images: Any, extractor: Extractor, *, batch_size: int = 100, device: str | torch.device = "cpu",
    want_logits: bool = False, progress: bool = False, desc: str = "features",
) -> tuple[FeatureStats, torch.Tensor | None]:
    """Run ``extractor`` over uint8 (N, H, W, C) images (an array, or an iterable of such batches).

    Returns the float64 statistics of the "pool" features and, with ``want_logits``, all logits
    (N, K) for the Inception Score.
    """
    from ddpmkit.logs import progress_bar

    check_int(batch_size, "batch_size", low=1)
    chunks = _batches(images, batch_size) if isinstance(images, np.ndarray) else images
    total = images.shape[0] if isinstance(images, np.ndarray) else None
    stats: FeatureStats | None = None
    logits: list[torch.Tensor] = []
    with progress_bar(total=total, disable=not progress, desc=desc, unit="img") as bar:
        for x in chunks:  # (B, C, H, W) uint8
            out = extractor(x.to(device))
            feats = out["pool"]
            if stats is None:
                stats = FeatureStats(feats.shape[1])
            stats.update(feats)
            if want_logits:
                if "logits" not in out:
                    raise ValueError("the feature network gives no logits, so no Inception Score")
                logits.append(out["logits"].detach().cpu())
            bar.update(x.shape[0])
    if stats is None:
        raise ValueError("the image set is empty (0 images)")
    return stats, (torch.cat(logits) if want_logits else None)


def _source_fingerprint(ds: Any) -> str:
    """A hash of a data set's content: pixels for in-memory sets, (path, size, mtime) for folders."""
    h = hashlib.sha256(f"{type(ds).__name__}|{ds.description}|{ds.image_shape}|{len(ds)}".encode())
    files = getattr(ds, "files", None)
    if files is not None:
        for f in files:
            st = Path(f).stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    else:
        for s in range(0, len(ds), 4096):
            h.update(np.ascontiguousarray(ds.uint8_images(range(s, min(s + 4096, len(ds))))).tobytes())
    return h.hexdigest()


def _native_image_shape(ref: str) -> tuple[int, int] | None:
    """(resolution, channels) of a data source as stored, without resizing; None if unknown."""
    from ddpmkit.data.image_files import decode_image, list_image_files
    from ddpmkit.data.sources import load_npz_uint8

    name = str(ref).lower()
    if name == "digits":
        return 8, 1
    if name.startswith("cifar10") or name.endswith((".tar.gz", ".tgz", ".tar")):
        return 32, 3
    p = Path(ref).expanduser()
    if p.is_file() and name.endswith(".npz"):
        a = load_npz_uint8(p)
        if a.shape[1] != a.shape[2]:
            raise ValueError(f"reference {p}: images are {a.shape[1]}x{a.shape[2]}; expected square images")
        return a.shape[1], a.shape[3]
    if p.is_dir():
        files, _ = list_image_files(p)
        if files:
            im = decode_image(files[0])
            if im.size[0] != im.size[1]:
                return None  # fitted (center crop) by the data module
            return im.size[0], 1 if im.mode == "L" else 3
    return None


def reference_statistics(
    ref: str | os.PathLike, extractor: Extractor, *, resolution: int, channels: int, split: str = "train",
    batch_size: int = 100, device: str | torch.device = "cpu", extractor_id: str | None = None,
    use_cache: bool = True, progress: bool = False,
) -> dict[str, Any]:
    """mu, sigma (float64) of a reference: a precomputed ``.npz`` with ``mu`` and ``sigma``, or a data
    source (``ddpmkit.data.open_source``: "cifar10-train", "digits", a folder, an ``.npz`` of images)
    read un-augmented at the samples' size. Returns {"mu", "sigma", "n", "source", "cached"}.
    """
    from ddpmkit.data import open_source

    p = Path(str(ref)).expanduser()
    if p.is_file() and p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                if "mu" in z.files and "sigma" in z.files:
                    n = int(z["n"]) if "n" in z.files else None
                    return {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64),
                            "n": n, "source": str(p), "cached": True}
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"reference {p}: not a readable .npz file ({err})") from None
    native = _native_image_shape(str(ref))
    if native is not None and native[0] != resolution:
        raise ValueError(f"mismatched image sizes: the samples are {resolution}x{resolution} but the "
                         f"reference {ref} holds {native[0]}x{native[0]} images")
    ds = open_source(str(ref), resolution=resolution, channels=channels, split=split)
    if len(ds) < 2:
        raise ValueError(f"reference {ref}: need at least 2 images, got {len(ds)}")
    key = hashlib.sha256(f"{extractor_id}|{_source_fingerprint(ds)}".encode()).hexdigest()[:32]
    path = cache_dir() / "fid_stats" / f"{key}.npz"
    if use_cache and extractor_id is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {"mu": z["mu"], "sigma": z["sigma"], "n": int(z["n"]), "source": ds.description,
                    "cached": True, "cache_file": str(path)}

    def chunks() -> Iterator[torch.Tensor]:
        for s in range(0, len(ds), batch_size):
            a = ds.uint8_images(range(s, min(s + batch_size, len(ds))))  # (B, H, W, C)
            yield torch.from_numpy(a).permute(0, 3, 1, 2)  # (B, C, H, W)

    stats, _ = feature_statistics(chunks(), extractor, batch_size=batch_size, device=device,
                                  progress=progress, desc="reference features")
    mu, sigma = stats.mean_cov()
    out = {"mu": mu, "sigma": sigma, "n": stats.n, "source": ds.description, "cached": False}
    if use_cache and extractor_id is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = np.array(json.dumps({"source": ds.description, "extractor": extractor_id, "split": split}))
        atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, n=np.int64(stats.n), meta=meta))
        out["cache_file"] = str(path)
    return out


def compute_fid(
    samples: Any, ref: str | os.PathLike, *, extractor: Extractor | None = None, batch_size: int = 100,
    split: str = "train", device: str | torch.device = "cpu", inception_weights: str | None = None,
    download: bool = False, use_cache: bool = True, is_splits: int = 10, is_shuffle_seed: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """FID of ``samples`` against ``ref`` and their Inception Score.

    samples: a path (``.npz`` or image folder), uint8 (N, H, W, C), or float (N, C, H, W) in
    [-1, 1] (rounded to 8 bits). ``extractor`` defaults to torch-fidelity's TF-compatible Inception
    (``InceptionFeatures``). IS splits the samples in order, as the original code; torch-fidelity
    shuffles them first, which ``is_shuffle_seed=2020`` reproduces (``inception_score``).
    Returns {"fid", "is_mean", "is_std", "num_samples", "num_ref", ...};
    with fewer than 50,000 samples a ``FewSamplesWarning`` is issued and recorded in "warnings".
    """
    images = load_samples(samples) if isinstance(samples, str | os.PathLike) else _sample_images(samples)
    n, h, w, c = images.shape
    if h != w:
        raise ValueError(f"expected square samples, got {h}x{w}")
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples, got {n}")
    extractor_id = getattr(extractor, "name", None)
    if extractor is None:
        from ddpmkit.evaluate.inception import InceptionFeatures

        extractor = InceptionFeatures(inception_weights, download=download).to(device)
        extractor_id = InceptionFeatures.name
    ref_stats = reference_statistics(ref, extractor, resolution=h, channels=c, split=split,
                                     batch_size=batch_size, device=device, extractor_id=extractor_id,
                                     use_cache=use_cache, progress=progress)
    stats, logits = feature_statistics(images, extractor, batch_size=batch_size, device=device,
                                       want_logits=True, progress=progress, desc="sample features")
    mu, sigma = stats.mean_cov()
    if mu.shape != ref_stats["mu"].shape:
        raise ValueError(f"the reference statistics have {ref_stats['mu'].shape[0]} features, the feature "
                         f"network gives {mu.shape[0]}")
    result: dict[str, Any] = {
        "fid": frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"]),
        "num_samples": n, "num_ref": ref_stats["n"], "ref": ref_stats["source"],
        "ref_cached": ref_stats["cached"], "feature_network": extractor_id, "warnings": [],
    }
    if n >= is_splits:
        result["is_mean"], result["is_std"] = inception_score(logits, splits=is_splits,
                                                                     shuffle_seed=is_shuffle_seed)
    if n < PAPER_NUM_SAMPLES:
        msg = (f"FID/IS from {n} samples (< {PAPER_NUM_SAMPLES}): biased upward, not comparable with "
               "the paper's numbers (50,000 samples)")
        warnings.warn(msg, FewSamplesWarning, stacklevel=2)
        result["warnings"].append(msg)
    return result
