"""What a checkpoint holds of a run, and the run folder around it.

``TrainState``: the model, its EMA, the optimiser, the grad scaler, the shared flip/t/eps generator
and the step (which is also the data position: update s reads positions [s*B, (s+1)*B)).
``capture`` / ``restore`` turn it into a checkpoint's tensors and JSON and back; torch's global RNG
(dropout) is saved per rank and put back by ``PendingRng.apply`` once the data loader exists.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ddpmkit import checkpoint as ckpt
from ddpmkit import schema
from ddpmkit.checks import check_int
from ddpmkit.config import Precision, TrainConfig, changed_on_resume
from ddpmkit.distributed import DistInfo, all_gather_objects, barrier
from ddpmkit.fileio import full_disk_is_an_error, read_json_object
from ddpmkit.nn import UNet
from ddpmkit.seeds import Stream, derive_seed, derived_generator

__all__ = ["CHECKPOINT_FILES", "STATE_SCHEMA", "PendingRng", "TrainState", "build_state", "capture",
           "check_state", "ema_decay_at", "ema_initial_weight", "load_resumable", "newest_resumable",
           "prepare_run_dir", "publish_models", "restore", "save", "tidy_run_dir"]

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors",
                    ckpt.STATE)
_PARAM_GROUP = {"params": [int], "lr": float, "betas": (float, float), "eps": float, "weight_decay": float}
# state.json of this trainer (``capture``), field by field; what it does not say is checked by ``check_state``
STATE_SCHEMA = {
    "step": int, "config": dict, "world_size": int,
    "data": {"position": int, "num_examples": int, "epoch": int},
    "optimizer": {"param_groups": [_PARAM_GROUP],
                  "scalars": schema.DictOf(schema.DictOf(schema.OneOf(float, bool, None)))},
    "rng": schema.DictOf({"numpy": (str, [int], int, int, float),
                          "random": (int, [int], schema.OneOf(float, None))}),
    "ema_n_averaged": int, "scaler": schema.DictOf(float),
}
_SCALER_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}

Log = Callable[[str], None]


@dataclass
class TrainState:
    """The resumable state of one run (one rank's view of it)."""

    config: TrainConfig
    model: UNet
    ema: AveragedModel
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # flips, t and eps of the global batch (CPU)
    step: int = 0


def ema_decay_at(config: TrainConfig, update: int) -> float:
    """The EMA decay of 0-based update ``update``: ``ema_decay``, or with ``ema_warmup`` diffusers'
    ``EMAModel.get_decay``: min(ema_decay, max(ema_min_decay, 1 - (1 + update / inv_gamma) ** -power))."""
    if not config.ema_warmup:
        return config.ema_decay
    value = 1.0 - (1.0 + update / config.ema_inv_gamma) ** -config.ema_power
    return min(config.ema_decay, max(config.ema_min_decay, value))


def ema_initial_weight(config: TrainConfig, updates: int) -> float:
    """The share of the initial (random) weights still in the EMA after ``updates`` updates: the
    product of ``ema_decay_at`` over them (``ema_decay ** updates`` without warm-up)."""
    if not config.ema_warmup:
        return config.ema_decay ** updates
    share = 1.0
    for s in range(updates):
        share *= ema_decay_at(config, s)
        if share < 1e-12:  # the warm-up's first decay is ema_min_decay (0 by default)
            return share
    return share


def _ema_avg_fn(config: TrainConfig) -> Callable[..., None]:
    """AveragedModel's multi_avg_fn. It gets n_averaged, which is 1 + the updates averaged so far (the
    initial weights count one) and is checkpointed, so the warm-up decay resumes exactly."""
    if not config.ema_warmup:
        return get_ema_multi_avg_fn(config.ema_decay)

    def avg(ema: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        get_ema_multi_avg_fn(ema_decay_at(config, int(n_averaged) - 1))(ema, current, n_averaged)
    return avg


def build_state(config: TrainConfig, info: DistInfo) -> TrainState:
    """Step 0: the same initial weights on every rank, the EMA at those weights, a fresh optimiser."""
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = UNet(config=config.unet).to(info.device)
    torch.manual_seed(derive_seed(config.seed, Stream.DROPOUT + info.rank))  # dropout stream of this rank
    ema = AveragedModel(model, multi_avg_fn=_ema_avg_fn(config), use_buffers=True)
    ema.update_parameters(model)  # the EMA starts at the initial weights (TF's EMA)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.adam_betas,
                           eps=config.adam_eps, fused=True)  # fused: ~6x less CPU time than foreach
    scaler = torch.amp.GradScaler("cuda", enabled=config.precision is Precision.FP16)
    generator = derived_generator(config.seed, Stream.TRAINING_NOISE)
    return TrainState(config=config, model=model, ema=ema, opt=opt, scaler=scaler, generator=generator)


def capture(s: TrainState, info: DistInfo, num_examples: int) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                     dict[str, Any]]:
    """The checkpoint's tensors (model, ema, optimizer, every rank's RNGs) and its JSON state."""
    rng = all_gather_objects(ckpt.capture_rng_state(s.generator), info)  # every rank's RNGs
    opt_tensors, opt_meta = ckpt.optimizer_state_to_tensors(s.opt.state_dict())
    tensors = {"model": s.model.state_dict(), "ema": s.ema.module.state_dict(), "optimizer": opt_tensors,
               "rng": {f"rank{r}.{k}": v for r, (t, _) in enumerate(rng) for k, v in t.items()}}
    position = s.step * s.config.batch_size
    state = {"config": s.config.to_dict(), "world_size": info.world_size,
             "data": {"position": position, "num_examples": num_examples, "epoch": position // num_examples},
             "optimizer": opt_meta, "rng": {f"rank{r}": m for r, (_, m) in enumerate(rng)},
             "ema_n_averaged": int(s.ema.n_averaged.item()), "scaler": s.scaler.state_dict()}
    return tensors, state


def save(s: TrainState, run_dir: Path, info: DistInfo, num_examples: int, log: Log) -> None:
    """Checkpoint + RUN/model (EMA) + RUN/model_raw, by rank 0; every rank waits for it."""
    tensors, state = capture(s, info, num_examples)
    if info.is_main:
        for name in ("model", "ema"):
            bad = [k for k, v in tensors[name].items()
                   if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:  # cannot happen: non-finite updates are skipped
                raise RuntimeError(f"refusing to checkpoint non-finite {name} weights: {bad[:3]}")
        ckpt.save_checkpoint(run_dir, s.step, tensors=tensors, state=state, keep_last=s.config.keep_last)
        publish_models(s, run_dir, only_if_stale=False, log=log)
    barrier(info)


def publish_models(s: TrainState, run_dir: Path, *, only_if_stale: bool, log: Log) -> None:
    """Write RUN/model (EMA) and RUN/model_raw, each atomically; with ``only_if_stale``, only a
    folder that is missing, unreadable or not the current weights (a kill between the checkpoint's
    rename and these writes leaves them at an older checkpoint)."""
    diffusion = s.config.diffusion.to_dict()
    for net, name in ((s.ema.module, "model"), (s.model, "model_raw")):
        if only_if_stale and _model_folder_holds(run_dir / name, net, diffusion):
            continue
        if only_if_stale:
            log(f"{run_dir / name} is missing or older than the checkpoint; rewriting it")
        tmp = run_dir / f".tmp-{name}-{os.getpid()}"
        with full_disk_is_an_error(run_dir / name):
            try:
                net.save(tmp, diffusion=diffusion)
                ckpt.replace_dir_atomically(tmp, run_dir / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed save (a full disk) leaves no partial copy


@dataclass(frozen=True)
class PendingRng:
    """A checkpoint's RNG states for this rank, put back by ``apply`` after every object that may
    draw from them at construction (the data loader's iterator): the first dropout mask is the saved one."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    same_world: bool
    step: int

    def apply(self, s: TrainState, info: DistInfo) -> None:
        ckpt.restore_rng_state(self.tensors, self.meta, s.generator)
        if not self.same_world and info.rank > 0:  # new ranks: fresh dropout streams, same shared generator
            torch.manual_seed(derive_seed(s.config.seed, Stream.DROPOUT + info.rank, self.step))


def restore(s: TrainState, c: ckpt.Checkpoint, info: DistInfo, num_examples: int, *, log: Log,
            warn: Log) -> PendingRng:
    """Load checkpoint ``c`` into ``s`` (refused if a setting that must not change did); returns its RNGs."""
    changed = changed_on_resume(TrainConfig.from_dict(c.state["config"]), s.config)
    if changed:
        raise ValueError(f"cannot resume {c.path}: these settings differ from the checkpoint's: {changed}")
    s.model.load_state_dict(c.tensors["model"])
    s.ema.module.load_state_dict(c.tensors["ema"])
    s.ema.n_averaged.fill_(c.state["ema_n_averaged"])
    s.opt.load_state_dict(ckpt.optimizer_state_from_tensors(c.tensors["optimizer"], c.state["optimizer"]))
    _match_param_strides_(s.opt)
    if c.state["scaler"]:
        s.scaler.load_state_dict(c.state["scaler"])
    same_world = c.state["world_size"] == info.world_size
    me = f"rank{info.rank if same_world else 0}"
    rng = {k.split(".", 1)[1]: v for k, v in c.tensors["rng"].items() if k.startswith(me + ".")}
    if c.state["data"]["num_examples"] != num_examples:
        warn(f"the data set now holds {num_examples} images, the checkpoint's held "
             f"{c.state['data']['num_examples']}: the data order will differ from the original run")
    s.step = c.step
    world = "" if same_world else f" (world size {c.state['world_size']} -> {info.world_size})"
    log(f"resumed from {c.path} at step {c.step}{world}")
    return PendingRng(rng, c.state["rng"][me], same_world, c.step)


def _match_param_strides_(opt: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments) its parameter's strides. Saved state is
    contiguous while the U-Net's conv weights are channels_last, and the fused Adam kernel pairs
    elements by memory position, so a layout mismatch would silently scramble the update."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def check_state(c: ckpt.Checkpoint) -> None:
    """A ValueError naming ``state.json`` unless ``c`` holds all that ``restore`` reads, of the right
    types (``STATE_SCHEMA``), with RNG states the generators accept and a config that builds."""
    where = str(c.path / ckpt.STATE)
    schema.check(c.state, STATE_SCHEMA, where)
    state, rng = c.state, c.tensors.get("rng", {})
    try:
        check_int(state["world_size"], "world_size", low=1)
        check_int(state["data"]["num_examples"], "data.num_examples", low=1)
        check_int(state["ema_n_averaged"], "ema_n_averaged", low=1)
        if state["scaler"] and set(state["scaler"]) != _SCALER_KEYS:
            raise ValueError(f"scaler must be {{}} or hold {sorted(_SCALER_KEYS)}")
        if not all(k.isdecimal() for k in state["optimizer"]["scalars"]):
            raise ValueError("optimizer.scalars must be keyed by parameter index")
        TrainConfig.from_dict(state["config"])
        for r in range(state["world_size"]):
            kind, keys, pos, has_gauss, cached = state["rng"][f"rank{r}"]["numpy"]
            np.random.RandomState().set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, cached))
            version, internal, gauss_next = state["rng"][f"rank{r}"]["random"]
            random.Random().setstate((version, tuple(internal), gauss_next))
            for name in ("torch_cpu", "generator"):
                torch.Generator().set_state(rng[f"rank{r}.{name}"])
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, RuntimeError) as e:  # bad values
        raise ValueError(f"{where}: " + (f"missing {e}" if isinstance(e, KeyError) else str(e))) from None


def load_resumable(path: str | Path) -> ckpt.Checkpoint:
    """A checkpoint of this trainer, verified (SHA-256, every file it needs, ``check_state``)."""
    return ckpt.load_checkpoint(path, required=CHECKPOINT_FILES, validate=check_state)


def newest_resumable(run_dir: str | Path) -> ckpt.Checkpoint | None:
    """The newest checkpoint of ``run_dir`` that loads; each newer torn one is skipped with a warning."""
    def warn(msg: str) -> None:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return ckpt.newest_loadable(run_dir, required=CHECKPOINT_FILES, validate=check_state, warn=warn)


def prepare_run_dir(run_dir: Path, info: DistInfo, resume: str | None) -> ckpt.Checkpoint | None:
    """The checkpoint to resume from (or None); refuses to mix a new run into an old one."""
    if resume in (None, "none", "never"):
        if all_gather_objects(ckpt.latest_checkpoint(run_dir) is not None, info)[0]:  # rank 0 decides
            raise ValueError(f"{run_dir} already holds checkpoints; pass --resume auto to continue it, "
                             "or choose another --output-dir")
        return None
    if resume == "auto":
        found = newest_resumable(run_dir) if info.is_main else None
        path = all_gather_objects(str(found.path) if found else "", info)[0]  # rank 0 decides
        if not path:
            return None
        return found if info.is_main else load_resumable(path)
    try:
        return load_resumable(Path(resume))
    except ValueError as e:
        raise ValueError(f"--resume {resume!r}: {e}; expected 'auto' or a folder like "
                         f"{run_dir}/checkpoints/step-000001000") from None


def _model_folder_holds(folder: Path, net: UNet, diffusion: dict[str, Any]) -> bool:
    """True if the model folder ``folder`` stores exactly ``net``'s weights and ``diffusion``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        saved = load_file(folder / "model.safetensors")
        meta = read_json_object(folder / "config.json")
    except (OSError, ValueError, SafetensorError):
        return False
    current = net.state_dict()
    return (isinstance(meta, dict) and meta.get("diffusion") == diffusion and saved.keys() == current.keys()
            and all(torch.equal(saved[k], current[k].cpu()) for k in saved))


def tidy_run_dir(run_dir: Path) -> None:
    """Finish or undo what a kill left half done: a model folder renamed aside, temp folders and
    files (of the run folder and of its sample grids)."""
    for name in ("model", "model_raw"):
        old = sorted(run_dir.glob(f".old-{name}-*"))
        if old and not (run_dir / name).exists():
            os.rename(old[-1], run_dir / name)  # killed between the two renames: put it back
        for p in run_dir.glob(f".old-{name}-*"):
            shutil.rmtree(p, ignore_errors=True)
    # any atomic write cut short (a model folder, config.json, a grid PNG, ...); the run lock is
    # held, so none is in progress
    for p in [*run_dir.glob(".tmp-*"), *(run_dir / "samples").glob(".tmp-*")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
