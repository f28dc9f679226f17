"""The sample folder: a model's samples drawn into PNG files, a grid and an FID-ready npz (`ddpm sample`).

Sample i (global index) is written to ``DIR/{i:06d}.png`` and draws all of its noise from its own
stream seeded by (seed, i), so the images do not depend on the batch size, and a run can be split
into shards (``start_index``) or resumed: indices whose PNG exists are skipped, and a torn one
(empty, cut short) is drawn again. At the end, ``DIR/samples_NxHxWxC.npz`` (uint8 NHWC under
``arr_0``, index order) covers every index PNG in DIR, and ``DIR/grid.png`` shows the first 64 of
them. ``DIR/sampling.json`` records the settings; a later run into the same DIR must use the same
ones. One process at a time holds a folder (``fileio.RunLock``).
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpmkit.checks import check_float, check_int
from ddpmkit.distributed import resolve_device
from ddpmkit.enums import parse_enum
from ddpmkit.fileio import RunLock, atomic_write_bytes, atomic_write_json, read_json_object
from ddpmkit.respace import Timesteps
from ddpmkit.sampling import SamplerType, resolve_timesteps
from ddpmkit.schema import Optional

__all__ = ["GRID_SIZE", "SETTINGS_NAME", "SampleFolderResult", "default_output_dir", "drop_torn_pngs",
           "ema_warning", "existing_indices", "sample_folder", "samples_provenance", "write_npz_and_grid"]

INDEX_PNG = re.compile(r"^(\d+)\.png$")
NPZ_NAME = re.compile(r"^samples_(\d+)x\d+x\d+x\d+\.npz$")
SETTINGS_NAME = "sampling.json"
GRID_SIZE = 64
# Every setting that changes the samples: the weights, the diffusion they are read with, the sampler
# and its noise, and bf16 arithmetic. A folder written before one was recorded is refused (None there).
_SETTINGS_KEYS = ("sampler", "steps", "timesteps", "eta", "seed", "clip_denoised", "ema", "image_shape",
                  "num_timesteps", "model_sha256", "diffusion", "bf16", "gamma")
_SETTINGS_SCHEMA = {"sampler": str, "steps": int, "timesteps": Optional([int]), "eta": float, "seed": int,
                    "clip_denoised": bool, "ema": bool, "image_shape": [int], "num_timesteps": int,
                    "model_sha256": Optional(str), "diffusion": Optional(dict), "bf16": Optional(bool),
                    "gamma": Optional(dict)}


@dataclass(frozen=True)
class SampleFolderResult:
    """What ``sample_folder`` did: the files it wrote, how many samples it drew and skipped, how fast."""

    npz: Path
    grid: Path
    sampled: int
    skipped: int
    seconds: float
    batch_size: int
    device: torch.device


def default_output_dir(model: str | Path, *, sampler: SamplerType | str = SamplerType.DDPM,
                       steps: int | None = None, timesteps: Timesteps = None, eta: float | None = None,
                       seed: int = 0, ema: bool = True, clip_denoised: bool = True) -> Path:
    """Where samples of a training run go without an ``out_dir``: one folder per setting inside the
    run, ``RUN/samples/<sampler>-<S>[-timesteps][-eta<E>][-seed<N>][-raw][-noclip]`` (S: the number of
    sampling steps), next to the training grids; ``ddpm report RUN`` finds their evaluations there."""
    from ddpmkit.config import load_config

    run = Path(model)
    if not (run / "config.json").is_file() or not (run / "model").is_dir():
        raise ValueError(f"{run} is not a training run directory, so samples have no default folder; "
                         "pass --output-dir DIR")
    sampler = parse_enum(SamplerType, sampler, "sampler")
    diffusion = load_config(run / "config.json").diffusion.build()
    kept = resolve_timesteps(sampler, diffusion, steps=steps, timesteps=timesteps)
    name = f"{sampler.value}-{len(kept)}" + ("-timesteps" if timesteps is not None else "")
    name += (f"-eta{eta:g}" if eta else "") + (f"-seed{seed}" if seed else "")
    name += ("" if ema else "-raw") + ("" if clip_denoised else "-noclip")
    return run / "samples" / name


def ema_warning(model: str | Path) -> str | None:
    """One line when ``model`` is a training run whose EMA still holds more than a tenth of the initial
    (random) weights, computed from its config.json and newest checkpoint; else None."""
    from ddpmkit.checkpoint import latest_checkpoint
    from ddpmkit.config import load_config
    from ddpmkit.training.state import ema_initial_weight

    run = Path(model)
    if not (run / "model").is_dir() or not (run / "config.json").is_file():
        return None  # a model folder or a diffusers folder: one set of weights, no run to read
    try:
        config = load_config(run / "config.json")
    except ValueError:
        return None
    last = latest_checkpoint(run)
    steps = int(last.name.split("-")[1]) if last is not None else config.steps
    share = ema_initial_weight(config, steps)
    if share <= 0.1:
        return None
    how = "with warm-up" if config.ema_warmup else "no warm-up"
    return (f"the EMA weights of {run} still hold {share:.0%} of the initial random weights after {steps} "
            f"steps (ema_decay {config.ema_decay}, {how}), so the samples may be noise; --no-ema samples "
            "the raw weights")


def existing_indices(out_dir: Path) -> set[int]:
    """Indices of the sample PNGs (``000123.png``) in ``out_dir``."""
    if not out_dir.is_dir():
        return set()
    return {int(m.group(1)) for p in out_dir.iterdir() if (m := INDEX_PNG.match(p.name))}


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Write DIR/sampling.json, or check that the samples already there were made the same way."""
    path = out_dir / SETTINGS_NAME
    if path.is_file():
        old = read_json_object(path, _SETTINGS_SCHEMA)
        diff = [k for k in _SETTINGS_KEYS if old.get(k) != settings.get(k)]
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} there vs {settings.get(k)!r} now" for k in diff)
            raise ValueError(f"{out_dir} holds samples made with other settings ({changes}); "
                             "use another --output-dir")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings, sort_keys=False)


def samples_provenance(path: str | Path, images: np.ndarray) -> dict[str, Any]:
    """What an evaluation of samples records about them: the SHA-256 of the uint8 images as scored and,
    for a sample folder (or an npz in one), its sampling.json (the model's weights hash, the sampler,
    the seed, the diffusion); None where there is none or it does not read."""
    path = Path(path)
    settings_path = (path if path.is_dir() else path.parent) / SETTINGS_NAME
    try:
        settings = read_json_object(settings_path, _SETTINGS_SCHEMA) if settings_path.is_file() else None
    except ValueError:
        settings = None
    return {"samples_sha256": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(),
            "sampling": settings}


def drop_torn_pngs(out_dir: Path, done: set[int], shape: tuple[int, int, int],
                   on_redraw: Callable[[Path], Any] | None = None) -> set[int]:
    """The indices in ``done`` whose PNG decodes to ``shape`` (C, H, W); each other one (empty or cut
    short by a power cut, say) is deleted, after ``on_redraw(path)``, so that it is drawn again."""
    from PIL import Image

    good = set()
    for i in sorted(done):
        path = out_dir / f"{i:06d}.png"
        try:
            with Image.open(path) as im:
                im.load()
                ok = im.size == (shape[2], shape[1]) and len(im.getbands()) == shape[0]
        except (OSError, ValueError, SyntaxError):
            ok = False
        if ok:
            good.add(i)
        else:
            if on_redraw is not None:
                on_redraw(path)
            path.unlink(missing_ok=True)
    return good


def write_npz_and_grid(out_dir: Path) -> tuple[Path, Path]:
    """``samples_NxHxWxC.npz`` of every index PNG in out_dir (index order) and ``grid.png`` of the
    first 64; older ``samples_*.npz`` files (fewer indices) are removed."""
    from PIL import Image

    from ddpmkit.images import save_image_grid

    indices = sorted(existing_indices(out_dir))
    if not indices:
        raise ValueError(f"{out_dir}: no sample PNGs to collect")
    arrays = []
    for i in indices:
        with Image.open(out_dir / f"{i:06d}.png") as im:
            a = np.asarray(im)
        arrays.append(a[..., None] if a.ndim == 2 else a)  # (H, W, C)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{out_dir}: the sample PNGs differ in shape {sorted(shapes)}")
    images = np.stack(arrays)  # (N, H, W, C) uint8
    name = "samples_{}x{}x{}x{}.npz".format(*images.shape)
    npz = out_dir / name
    buf = io.BytesIO()
    np.savez(buf, arr_0=images)
    atomic_write_bytes(npz, buf.getvalue())
    for old in out_dir.iterdir():  # superseded: they cover fewer indices
        m = NPZ_NAME.match(old.name)
        if m and old.name != name and int(m.group(1)) < len(images):
            old.unlink(missing_ok=True)
    grid = save_image_grid(images[:GRID_SIZE], out_dir / "grid.png", min_width=512)  # upscaled to be legible
    return npz, grid


@dataclass(frozen=True, kw_only=True)
class _Request:
    """The checked arguments of one ``sample_folder`` call."""

    model: str
    out_dir: Path
    wanted: range
    sampler: SamplerType
    steps: int | None
    timesteps: Timesteps
    eta: float
    seed: int
    batch_size: int | None
    ema: bool
    clip_denoised: bool
    device: str | torch.device | None
    speed: dict[str, bool]
    gamma_data: str | None = None  # Analytic-DPM's Gamma_t: the training data (None: the run's own)
    gamma_samples: int = 200


def sample_folder(
    model: str | Path,
    out_dir: str | Path | None = None,
    *,
    n: int,
    sampler: SamplerType | str = SamplerType.DDPM,
    steps: int | None = None,
    timesteps: Timesteps = None,
    eta: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    start_index: int = 0,
    ema: bool = True,
    clip_denoised: bool = True,
    device: str | torch.device | None = None,
    compile: bool = False,
    bf16: bool = False,
    cuda_graphs: bool = False,
    step_progress: bool = False,
    on_redraw: Callable[[Path], Any] | None = None,
    gamma_data: str | None = None,
    gamma_samples: int = 200,
) -> SampleFolderResult:
    """Draw samples start_index .. start_index + n - 1 of ``model`` (``models.load_model``'s path)
    into ``out_dir`` (see the module docstring; None: ``default_output_dir``, for a training run);
    the missing ones only. ``batch_size`` None: all
    at once within a memory bound (``training.fit.auto_batch_size``). ``eta`` is DDIM's (None: 0).
    ``step_progress`` adds a per-step bar; ``on_redraw(path)`` hears of each torn PNG drawn again.
    The analytic samplers' Gamma_t comes from ``gamma_file.model_gamma`` (``gamma_data``, default
    the run's training data; ``gamma_samples`` Monte-Carlo images)."""
    sampler = parse_enum(SamplerType, sampler, "sampler")
    check_int(n, "n", low=1)
    if batch_size is not None:
        check_int(batch_size, "batch_size", low=1)
    check_int(start_index, "start_index", low=0)
    check_int(seed, "seed", low=0)
    if eta is not None and not sampler.takes_eta:
        raise ValueError(f"eta applies to the {' and '.join(s.value for s in SamplerType if s.takes_eta)} "
                         "samplers only")
    eta = 0.0 if eta is None else check_float(eta, "eta", low=0)
    if out_dir is None:
        out_dir = default_output_dir(model, sampler=sampler, steps=steps, timesteps=timesteps, eta=eta,
                                     seed=seed, ema=ema, clip_denoised=clip_denoised)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {out_dir}: exists and is not a folder")
    req = _Request(model=str(model), out_dir=out_dir, wanted=range(start_index, start_index + n),
                   sampler=sampler, steps=steps, timesteps=timesteps, eta=eta,
                   seed=seed, batch_size=batch_size, ema=ema, clip_denoised=clip_denoised, device=device,
                   speed={"compile": compile, "bf16": bf16, "cuda_graphs": cuda_graphs},
                   gamma_data=gamma_data, gamma_samples=check_int(gamma_samples, "gamma_samples", low=2))
    with RunLock(out_dir):  # one sampler per folder; an unwritable folder fails here, before any work
        return _sample_into(req, step_progress=step_progress, on_redraw=on_redraw)


def _sample_into(req: _Request, *, step_progress: bool,
         on_redraw: Callable[[Path], Any] | None) -> SampleFolderResult:
    from ddpmkit.accel import prepare_model
    from ddpmkit.models import load_model
    from ddpmkit.nn.folder import weights_sha256
    from ddpmkit.training.fit import auto_batch_size, check_fits

    device = resolve_device(req.device)
    loaded = load_model(req.model, ema=req.ema)
    # the automatic batch (None) is chosen within the memory bound later; one image must fit
    check_fits(loaded.unet.config, loaded.diffusion.num_timesteps, req.batch_size or 1, training=False,
               device=device)
    diffusion = loaded.diffusion.build()
    T = diffusion.num_timesteps
    kept = resolve_timesteps(req.sampler, diffusion, steps=req.steps, timesteps=req.timesteps)
    cfg = loaded.unet.config
    shape = (cfg.in_channels, cfg.resolution, cfg.resolution)  # (C, H, W)
    sha = weights_sha256(loaded.unet)
    gamma, gamma_settings = _gamma(req, loaded, diffusion, sha, device)
    _check_settings(req.out_dir, {
        **gamma_settings, "model": loaded.source, "sampler": req.sampler.value, "steps": len(kept),
        **({"timesteps": kept} if req.timesteps is not None else {}), "eta": req.eta, "seed": req.seed,
        "clip_denoised": req.clip_denoised, "ema": req.ema, "image_shape": list(shape), "num_timesteps": T,
        "model_sha256": sha, "diffusion": loaded.diffusion.to_dict(), "bf16": req.speed["bf16"],
    })
    done = drop_torn_pngs(req.out_dir, existing_indices(req.out_dir), shape, on_redraw)
    todo = [i for i in req.wanted if i not in done]
    net = prepare_model(loaded.unet, device=device, **req.speed)
    batch = req.batch_size or auto_batch_size(cfg, max(1, len(todo)), device)
    start = time.perf_counter()
    _draw(req, net, diffusion, kept, gamma, shape, todo, batch, device, step_progress=step_progress)
    elapsed = time.perf_counter() - start
    npz, grid = write_npz_and_grid(req.out_dir)
    return SampleFolderResult(npz=npz, grid=grid, sampled=len(todo), skipped=len(req.wanted) - len(todo),
                              seconds=elapsed, batch_size=batch, device=device)


def _gamma(req: _Request, loaded: Any, diffusion: Any, sha: str, device: Any) -> tuple[Any, dict[str, Any]]:
    """Analytic-DPM's Gamma_t for the analytic samplers (else None), and what sampling.json records of it."""
    from ddpmkit.gamma_file import model_gamma, training_data_of
    from ddpmkit.models import resolve_model_path

    if not req.sampler.needs_gamma:
        return None, {}
    data = req.gamma_data if req.gamma_data is not None else training_data_of(req.model)
    folder = resolve_model_path(req.model, ema=req.ema)[1]
    gamma = model_gamma(loaded.unet, diffusion, folder, weights_sha256=sha, data=data,
                        num_samples=req.gamma_samples, device=device, progress=True)
    return gamma, {"gamma": {"data": data, "num_samples": req.gamma_samples}}


def _draw(req: _Request, net: Any, diffusion: Any, kept: list[int], gamma: Any, shape: tuple[int, int, int],
          todo: list[int], batch: int, device: torch.device, *, step_progress: bool) -> None:
    """Sample the indices ``todo``, ``batch`` at a time, each into its PNG."""
    from ddpmkit.images import save_image
    from ddpmkit.logs import progress_bar
    from ddpmkit.sampling import sample
    from ddpmkit.seeds import sample_generators

    with progress_bar(total=len(todo), desc="samples", unit="img", disable=not todo) as bar:
        for k in range(0, len(todo), batch):
            idx = todo[k : k + batch]
            x0 = sample(net, diffusion, (len(idx), *shape), sampler=req.sampler, eta=req.eta, timesteps=kept,
                        gamma=gamma, generator=sample_generators(req.seed, idx),
                        clip_denoised=req.clip_denoised, device=device, progress=step_progress)
            for i, img in zip(idx, x0.float().cpu(), strict=True):
                save_image(img, req.out_dir / f"{i:06d}.png")
            bar.update(len(idx))
