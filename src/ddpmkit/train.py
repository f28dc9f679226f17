"""The training loop (Algorithm 1): resumable bit for bit, guarded against NaNs, one to many GPUs.

Reproducibility. Everything random is a pure function of the seed and restored state:
- the data order: epoch e is ``numpy.random.default_rng([seed, e]).permutation(N)``, and step s
  reads the global positions [s * B, (s + 1) * B) of the concatenated epochs (``batch_indices``),
  so a run cut anywhere, mid-epoch included, resumes on the same examples;
- flips, timesteps and noise of the whole global batch come from one CPU ``torch.Generator``
  whose state is checkpointed; each rank takes its slice, so N ranks see the numbers one
  process would;
- dropout draws from torch's global RNG (per rank), whose state is checkpointed per rank.
On the CPU a resumed run therefore equals an uninterrupted one: same losses, ``torch.equal`` weights.

Safety. A non-finite loss, gradient norm or update result (a weight) skips the update (weights,
optimiser, EMA unchanged) and warns; ``max_nonfinite`` in a row stop the run with exit code ``EXIT_NONFINITE``. SIGTERM and
SIGINT finish the current step, save a checkpoint and return 128 + signal.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ddpmkit import checkpoint as ckpt
from ddpmkit.config import (
    Precision,
    TrainConfig,
    changed_on_resume,
    check_fits,
    deviations_from_paper,
    save_config,
)
from ddpmkit.data.convert import horizontal_flip_where, to_uint8_nhwc
from ddpmkit.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from ddpmkit.fileio import RunLock, append_line_synced, atomic_write_bytes
from ddpmkit.nn import UNet

__all__ = ["EXIT_NONFINITE", "TrainResult", "batch_indices", "epoch_permutation", "learning_rate", "train"]

EXIT_NONFINITE = 3


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


@dataclass
class TrainResult:
    """What ``train`` leaves behind. ``losses``: {step: global mean loss} of the steps run here."""

    exit_code: int
    step: int
    run_dir: Path
    model: UNet
    ema: UNet
    losses: dict[int, float] = field(default_factory=dict)
    sample_grid: Path | None = None
    num_skipped: int = 0


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The data order of ``epoch``: a permutation of range(N), a pure function of (seed, epoch)."""
    return _epoch_permutation(seed, epoch, num_examples).copy()


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(step: int, *, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
    """Dataset indices of global batch ``step``: positions [step*B, (step+1)*B) of the epoch stream."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)  # (B,)
    epochs = pos // num_examples
    out = np.empty_like(pos)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _epoch_permutation(seed, int(e), num_examples)[pos[sel] % num_examples]
    return out


def learning_rate(config: TrainConfig, step: int) -> float:
    """The authors' warm-up: lr * min(1, step / warmup_steps) at 0-based update ``step``."""
    if config.warmup_steps == 0:
        return config.lr
    return config.lr * min(1.0, step / config.warmup_steps)


def _derived_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _Batches(torch.utils.data.Dataset):
    """Adapts an ImageDataset so that one DataLoader item is one rank's batch: indices -> (b, C, H, W)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, indices: np.ndarray) -> torch.Tensor | _DataError:
        try:
            return self.dataset.get_batch(indices)
        except (ValueError, OSError) as e:  # a data error: sent back as such, re-raised as one line
            return _DataError(type(e).__name__, str(e))


@dataclass(frozen=True)
class _DataError:
    """A data error raised in a loader worker, carried to the main process (whose DataLoader would wrap
    the exception in a multi-line worker traceback)."""

    kind: str
    message: str

    def reraise(self) -> None:
        exc = {"FileNotFoundError": FileNotFoundError, "OSError": OSError}.get(self.kind, ValueError)
        raise exc(self.message)


def _unwrap(loader: Any) -> Iterator[torch.Tensor]:
    for item in loader:
        if isinstance(item, _DataError):
            item.reraise()
        yield item


class _RankBatchSampler(torch.utils.data.Sampler):
    """This rank's slice of global batch s, for s = start .. steps - 1, computed lazily."""

    def __init__(self, num_examples: int, config: TrainConfig, info: DistInfo, start: int) -> None:
        self.n, self.config, self.start = num_examples, config, start
        self.b = config.batch_size // info.world_size
        self.lo = info.rank * self.b

    def __len__(self) -> int:
        return max(0, self.config.steps - self.start)

    def __iter__(self) -> Iterator[np.ndarray]:
        c = self.config
        for s in range(self.start, c.steps):
            idx = batch_indices(s, batch_size=c.batch_size, num_examples=self.n, seed=c.seed)  # (B,)
            yield idx[self.lo:self.lo + self.b]


def _batch_stream(dataset: Any, config: TrainConfig, info: DistInfo, start: int) -> Iterator[torch.Tensor]:
    """This rank's slice of each global batch from ``start`` on: (B / world, C, H, W)."""
    sampler = _RankBatchSampler(len(dataset), config, info, start)
    if config.num_workers == 0:
        return (dataset.get_batch(idx) for idx in sampler)
    loader = torch.utils.data.DataLoader(
        _Batches(dataset), sampler=sampler, batch_size=None, num_workers=config.num_workers,
        pin_memory=info.device.type == "cuda", prefetch_factor=4,
        generator=torch.Generator().manual_seed(_derived_seed(config.seed, 2)),  # not torch's global RNG
    )
    return _unwrap(iter(loader))


class _StopFlag:
    """Records SIGTERM / SIGINT; the loop checks it after each step."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class _Trainer:
    """The state of one run; ``run`` is the loop."""

    def __init__(self, config: TrainConfig, run_dir: Path, info: DistInfo, *, progress: bool,
                 inject_nonfinite: Callable[[int], bool] | None) -> None:
        from ddpmkit.data import open_source

        if config.batch_size % info.world_size:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the world size "
                             f"{info.world_size} (the global batch is kept across world sizes)")
        if config.precision is Precision.FP16 and info.device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device; use 'fp32' or 'bf16'")
        self.config, self.run_dir, self.info = config, run_dir, info
        self.progress, self.inject_nonfinite = progress, inject_nonfinite
        self.dataset = open_source(config.data, resolution=config.unet.resolution,
                                   channels=config.unet.in_channels, split="train",
                                   on_bad_image=config.on_bad_image.value)
        self.diffusion = config.diffusion.build()
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.model = UNet(config=config.unet).to(info.device)
        torch.manual_seed(_derived_seed(config.seed, 1000 + info.rank))  # dropout stream of this rank
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay),
                                 use_buffers=True)
        self.ema.update_parameters(self.model)  # the EMA starts at the initial weights (TF's EMA)
        self.ddp = (DistributedDataParallel(self.model, device_ids=[info.device] if info.device.type == "cuda"
                                            else None) if info.enabled else self.model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=config.adam_betas,
                                    eps=config.adam_eps, fused=True)  # fused: ~6x less CPU time than foreach
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision is Precision.FP16)
        self.generator = torch.Generator().manual_seed(_derived_seed(config.seed, 1))
        self.step, self.nonfinite, self.losses = 0, 0, {}
        self.tb, self.pending_rng = None, None

    # -------------------------------------------------------------------------- checkpoints
    def state_tensors_and_json(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        rng = all_gather_objects(ckpt.capture_rng_state(self.generator), self.info)  # every rank's RNGs
        opt_tensors, opt_meta = ckpt.optimizer_state_to_tensors(self.opt.state_dict())
        tensors = {"model": self.model.state_dict(), "ema": self.ema.module.state_dict(),
                   "optimizer": opt_tensors,
                   "rng": {f"rank{r}.{k}": v for r, (t, _) in enumerate(rng) for k, v in t.items()}}
        state = {"config": self.config.to_dict(), "world_size": self.info.world_size,
                 "data": {"position": self.step * self.config.batch_size, "num_examples": len(self.dataset),
                          "epoch": self.step * self.config.batch_size // len(self.dataset)},
                 "optimizer": opt_meta, "rng": {f"rank{r}": m for r, (_, m) in enumerate(rng)},
                 "ema_n_averaged": int(self.ema.n_averaged.item()), "scaler": self.scaler.state_dict()}
        return tensors, state

    def save(self) -> None:
        """Checkpoint + RUN/model (EMA) + RUN/model_raw, by rank 0; every rank waits for it."""
        tensors, state = self.state_tensors_and_json()
        if self.info.is_main:
            for name in ("model", "ema"):
                bad = [k for k, v in tensors[name].items()
                       if v.is_floating_point() and not torch.isfinite(v).all()]
                if bad:  # cannot happen: non-finite updates are skipped
                    raise RuntimeError(f"refusing to checkpoint non-finite {name} weights: {bad[:3]}")
            ckpt.save_checkpoint(self.run_dir, self.step, tensors=tensors, state=state,
                                 keep_last=self.config.keep_last)
            self.publish_models(only_if_stale=False)
        barrier(self.info)

    def publish_models(self, *, only_if_stale: bool) -> None:
        """Write RUN/model (EMA) and RUN/model_raw, each atomically; with ``only_if_stale``, only a
        folder that is missing, unreadable or not the current weights (a kill between the checkpoint's
        rename and these writes leaves them at an older checkpoint)."""
        diffusion = self.config.diffusion.to_dict()
        for net, name in ((self.ema.module, "model"), (self.model, "model_raw")):
            if only_if_stale and _model_folder_holds(self.run_dir / name, net, diffusion):
                continue
            if only_if_stale:
                self._log(f"{self.run_dir / name} is missing or older than the checkpoint; rewriting it")
            tmp = self.run_dir / f".tmp-{name}-{os.getpid()}"
            net.save(tmp, diffusion=diffusion)
            ckpt.replace_dir_atomically(tmp, self.run_dir / name)

    def restore(self, c: ckpt.Checkpoint) -> None:
        path = c.path
        saved = TrainConfig.from_dict(c.state["config"])
        changed = changed_on_resume(saved, self.config)
        if changed:
            raise ValueError(f"cannot resume {path}: these settings differ from the checkpoint's: {changed}")
        self.model.load_state_dict(c.tensors["model"])
        self.ema.module.load_state_dict(c.tensors["ema"])
        self.ema.n_averaged.fill_(c.state["ema_n_averaged"])
        opt_state = ckpt.optimizer_state_from_tensors(c.tensors["optimizer"], c.state["optimizer"])
        self.opt.load_state_dict(opt_state)
        _match_param_strides_(self.opt)
        if c.state["scaler"]:
            self.scaler.load_state_dict(c.state["scaler"])
        same_world = c.state["world_size"] == self.info.world_size
        me = f"rank{self.info.rank if same_world else 0}"
        rng = {k.split(".", 1)[1]: v for k, v in c.tensors["rng"].items() if k.startswith(me + ".")}
        self.pending_rng = (rng, c.state["rng"][me], same_world, c.step)  # applied by run(), see restore_rng
        if c.state["data"]["num_examples"] != len(self.dataset):
            self._warn(f"the data set now holds {len(self.dataset)} images, the checkpoint's held "
                       f"{c.state['data']['num_examples']}: the data order will differ from the original run")
        self.step = c.step
        world = "" if same_world else f" (world size {c.state['world_size']} -> {self.info.world_size})"
        self._log(f"resumed from {path} at step {c.step}{world}")

    def restore_rng(self) -> None:
        """Put back the checkpoint's RNG states. Called after every object that may draw from them at
        construction (the data loader's iterator), so that the first dropout mask is the saved one."""
        if self.pending_rng is None:
            return
        rng, meta, same_world, step = self.pending_rng
        ckpt.restore_rng_state(rng, meta, self.generator)
        if not same_world and self.info.rank > 0:  # new ranks: fresh dropout streams, same shared generator
            torch.manual_seed(_derived_seed(self.config.seed, 1000 + self.info.rank + 7919 * step))
        self.pending_rng = None

    # -------------------------------------------------------------------------- feedback
    def _log(self, msg: str) -> None:
        if self.info.is_main:  # through logging.getLogger("ddpmkit.train") (see ddpmkit.logs)
            from ddpmkit.logs import logger

            logger(__name__).info(msg)

    def summary(self) -> None:
        c, info = self.config, self.info
        n_params = sum(p.numel() for p in self.model.parameters())
        lines = [f"run directory: {self.run_dir}",
                 f"data: {self.dataset!r}" + (f", {self.dataset.num_skipped} unreadable skipped so far"
                                             if self.dataset.num_skipped else ""),
                 f"model: U-Net {n_params:,} parameters; {c.diffusion.num_timesteps} timesteps, "
                 f"{c.diffusion.schedule} betas, {c.diffusion.mean_type.value}-prediction, "
                 f"{c.diffusion.loss_type.value} loss",
                 f"device: {info.device}, world size {info.world_size}, global batch {c.batch_size} "
                 f"({c.batch_size // info.world_size} per rank), precision {c.precision.value}",
                 f"steps: {self.step} -> {c.steps}"]
        devs = deviations_from_paper(c)
        lines.append(f"deviations from the paper's recipe: {len(devs) or 'none'}")
        lines += [f"  - {d}" for d in devs]
        self._log("\n".join(lines))

    def metrics(self, record: dict[str, Any]) -> None:
        append_line_synced(self.run_dir / "metrics.jsonl", json.dumps(record))
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def sample_grid(self) -> Path | None:
        """A grid from the EMA weights with the same noise every time; rank 0 only."""
        from ddpmkit.figures import save_image_grid
        from ddpmkit.sampling import sample_ancestral, sample_generators

        path = None
        n = self.config.num_samples
        if self.info.is_main and n > 0:
            net = self.ema.module.eval()
            res = self.config.unet.resolution
            shape = (n, self.config.unet.in_channels, res, res)
            noise = sample_generators(self.config.seed, range(n))  # the same noise at every grid
            with torch.no_grad(), self._autocast():
                x = sample_ancestral(net, self.diffusion, shape, generator=noise, device=self.info.device)
            images = to_uint8_nhwc(x).cpu()  # (n, H, W, C)
            path = save_image_grid(images.numpy(), self.run_dir / "samples" / f"step-{self.step:09d}.png",
                                   nrow=math.ceil(math.sqrt(n)), scale=max(1, 64 // res),
                                   min_width=512)
        barrier(self.info)
        return path

    def _autocast(self) -> Any:
        dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(self.config.precision)
        return torch.autocast(self.info.device.type, dtype=dtype) if dtype is not None else nullcontext()

    # -------------------------------------------------------------------------- one step
    def draw(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flip, t and eps of the whole global batch from the shared generator; this rank's slice."""
        c, g = self.config, self.generator
        B = c.batch_size
        flip = torch.rand(B, generator=g) < 0.5  # (B,)
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=g)  # (B,)
        noise = torch.randn((B, *x0.shape[1:]), generator=g)  # (B, C, H, W)
        b, lo = x0.shape[0], self.info.rank * x0.shape[0]
        dev = self.info.device
        if c.random_flip:
            x0 = horizontal_flip_where(x0, flip[lo:lo + b])
        return x0, t[lo:lo + b].to(dev), noise[lo:lo + b].to(dev)

    def train_step(self, x0: torch.Tensor) -> tuple[float, float, bool]:
        """One update on this rank's batch (b, C, H, W); returns (global mean loss, grad norm, finite)."""
        x0, t, noise = self.draw(x0.to(self.info.device, non_blocking=True))
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(self.config, self.step)
        with self._autocast():
            loss = self.diffusion.training_losses(self.ddp, x0, t, noise)["loss"].mean()
        if self.inject_nonfinite is not None and self.inject_nonfinite(self.step):
            loss = loss * float("nan")
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip))
        loss_value = float(all_reduce_mean(loss.detach().float(), self.info))
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            finite = self._update_or_undo()
        elif self.scaler.is_enabled():  # the scaler skips inf/NaN gradients itself
            self.scaler.step(self.opt)
            self.scaler.update()
        if finite:
            self.ema.update_parameters(self.model)
        self.opt.zero_grad(set_to_none=True)
        return loss_value, grad_norm, finite

    def _update_tensors(self) -> list[torch.Tensor]:
        """Everything one optimiser step writes: the parameters, then the optimiser's state tensors."""
        params = list(self.model.parameters())
        state = [v for p in params for v in self.opt.state.get(p, {}).values() if torch.is_tensor(v)]
        return params + state

    def _update_or_undo(self) -> bool:
        """The optimiser step; if it leaves a weight non-finite, the parameters and the optimiser state
        are put back, so a non-finite update result is skipped like a non-finite loss. True if kept."""
        had_state = bool(self.opt.state)
        before = [t.clone() for t in self._update_tensors()]  # one copy: ~3x the weights, device-side
        self.scaler.step(self.opt)
        self.scaler.update()
        params = list(self.model.parameters())
        if bool(torch.stack(torch._foreach_norm(params, float("inf"))).isfinite().all()):
            return True
        if not had_state:  # the first update: Adam had no state before it
            self.opt.state.clear()
        with torch.no_grad():
            torch._foreach_copy_(self._update_tensors(), before[:len(self._update_tensors())])
        return False

    # -------------------------------------------------------------------------- the loop
    def run(self, stop: _StopFlag) -> int:
        c = self.config
        bar = _progress_bar(c, self.step, enabled=self.progress and self.info.is_main)
        t_last, s_last, window = time.perf_counter(), self.step, []
        stream = _batch_stream(self.dataset, c, self.info, self.step)
        self.restore_rng()
        for x0 in stream:
            loss, grad_norm, finite = self.train_step(x0)
            self.step += 1
            if finite:
                self.nonfinite = 0
                window.append(loss)
                self.losses[self.step] = loss
            else:
                self.nonfinite += 1
                self._warn(f"step {self.step}: non-finite loss {loss}, gradient norm {grad_norm} or "
                           f"updated weights; update skipped ({self.nonfinite} in a row, limit {c.max_nonfinite})")
                if self.nonfinite >= c.max_nonfinite:
                    self._log(f"stopping: {self.nonfinite} non-finite steps in a row; the last good "
                              "checkpoint is kept (lower lr or check the data, then --resume auto)")
                    bar.close()
                    return EXIT_NONFINITE
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == c.steps:
                now = time.perf_counter()
                rate = (self.step - s_last) / max(now - t_last, 1e-9)
                record = {"step": self.step, "loss": float(np.mean(window)) if window else float("nan"),
                          "grad_norm": grad_norm, "lr": learning_rate(c, self.step - 1), "steps_per_s": rate,
                          "img_per_s": rate * c.batch_size, "nonfinite_in_a_row": self.nonfinite}
                if self.info.is_main:
                    self.metrics(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate * c.batch_size:.0f}")
                t_last, s_last, window = now, self.step, []
            signum = all_reduce_max(stop.signum, self.info)
            if self.step % c.checkpoint_every == 0 or self.step == c.steps or signum:
                self.save()
            if self.step % c.sample_every == 0 and self.step != c.steps:
                self.sample_grid()
            if signum:
                self._log(f"stopped by signal {signum} after step {self.step}; checkpoint saved")
                bar.close()
                return 128 + signum
        bar.close()
        return 0

    def _warn(self, msg: str) -> None:
        if self.info.is_main:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)


def _progress_bar(config: TrainConfig, start: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()  # in a log file, one line every 30 s instead of a redraw per step
    return tqdm(total=config.steps, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                smoothing=0.05, file=sys.stderr, mininterval=0.1 if tty else 30.0)


CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors",
                    ckpt.STATE)
STATE_KEYS = ("config", "world_size", "data", "optimizer", "rng", "ema_n_averaged", "scaler")


def load_resumable(path: str | Path) -> ckpt.Checkpoint:
    """A checkpoint of this trainer, verified (SHA-256, every file and state key it needs)."""
    return ckpt.load_checkpoint(path, required=CHECKPOINT_FILES, state_keys=STATE_KEYS)


def newest_resumable(run_dir: str | Path) -> ckpt.Checkpoint | None:
    """The newest checkpoint of ``run_dir`` that loads; each newer torn one is skipped with a warning."""
    def warn(msg: str) -> None:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return ckpt.newest_loadable(run_dir, required=CHECKPOINT_FILES, state_keys=STATE_KEYS, warn=warn)


def _prepare_run_dir(trainer: _Trainer, resume: str | None) -> ckpt.Checkpoint | None:
    """The checkpoint to resume from (or None); refuses to mix a new run into an old one."""
    run_dir, info = trainer.run_dir, trainer.info
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
    path = Path(resume)
    try:
        return load_resumable(path)
    except ValueError as e:
        raise ValueError(f"--resume {resume!r}: {e}; expected 'auto' or a folder like "
                         f"{run_dir}/checkpoints/step-000001000") from None


def _model_folder_holds(folder: Path, net: UNet, diffusion: dict[str, Any]) -> bool:
    """True if the model folder ``folder`` stores exactly ``net``'s weights and ``diffusion``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        saved = load_file(folder / "model.safetensors")
        meta = json.loads((folder / "config.json").read_bytes())
    except (OSError, ValueError, SafetensorError):
        return False
    current = net.state_dict()
    return (isinstance(meta, dict) and meta.get("diffusion") == diffusion and saved.keys() == current.keys()
            and all(torch.equal(saved[k], current[k].cpu()) for k in saved))


def _tidy_run_dir(run_dir: Path) -> None:
    """Finish or undo what a kill left half done: a model folder renamed aside, temp folders."""
    for name in ("model", "model_raw"):
        old = sorted(run_dir.glob(f".old-{name}-*"))
        if old and not (run_dir / name).exists():
            os.rename(old[-1], run_dir / name)  # killed between the two renames: put it back
        for p in run_dir.glob(f".old-{name}-*"):
            shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(".tmp-*"):  # any atomic write cut short (a model folder, config.json, ...);
        if p.is_dir() and not p.is_symlink():  # the run lock is held, so none is in progress
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written by a run killed after its last checkpoint), and lines
    torn by a power cut or a full disk (with a warning naming the file and line); rewritten atomically."""
    if not path.is_file():
        return
    keep = []
    for number, line in enumerate(path.read_bytes().decode(errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
            record_step = record["step"] if isinstance(record, dict) else None
        except ValueError:
            record_step = None
        if type(record_step) is not int:
            warnings.warn(f"{path} line {number}: torn or invalid record dropped: {line[:80]!r}",
                          RuntimeWarning, stacklevel=2)
        elif record_step <= step:
            keep.append(line)
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: str | None = None,
    device: str | None = None,
    progress: bool = True,
    inject_nonfinite: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Train ``config`` into ``run_dir``; ``resume``: None, "auto" (newest complete checkpoint) or a path.

    Under ``torchrun`` each process calls this; rank 0 writes. ``inject_nonfinite(step)``, for tests,
    turns the loss of the 0-based update ``step`` into NaN. Returns a TrainResult whose
    ``exit_code`` is 0, ``EXIT_NONFINITE``, or 128 + signal.
    """
    info = init_distributed(device)
    run_dir = Path(run_dir)
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    lock = RunLock(run_dir)
    try:
        check_fits(config.unet, config.diffusion.num_timesteps, config.batch_size // info.world_size,
                   training=True, device=info.device)
        if info.is_main:
            lock.acquire()  # one trainer per run dir; also the check that it can be written, before any work
        barrier(info)
        trainer = _Trainer(config, run_dir, info, progress=progress, inject_nonfinite=inject_nonfinite)
        start = _prepare_run_dir(trainer, resume)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        barrier(info)
        if start is not None:
            trainer.restore(start)
        elif resume == "auto":
            trainer._log(f"no complete checkpoint in {run_dir}; starting from step 0")
        if info.is_main:
            _tidy_run_dir(run_dir)
            if start is not None:
                trainer.publish_models(only_if_stale=True)
                ckpt.prune(run_dir, config.keep_last)
            save_config(config, run_dir / "config.json")
            _truncate_metrics(run_dir / "metrics.jsonl", trainer.step)
            trainer.tb = _tensorboard(run_dir)
        trainer.summary()
        with _StopFlag() as stop:
            code = trainer.run(stop)
        grid = None
        if code == 0:
            grid = trainer.sample_grid()
            if grid is not None:
                trainer._log(f"wrote sample grid {grid}")
        if trainer.dataset.num_skipped:
            trainer._log(f"skipped {trainer.dataset.num_skipped} unreadable image file(s)")
        if trainer.tb is not None:
            trainer.tb.close()
        return TrainResult(exit_code=code, step=trainer.step, run_dir=run_dir, model=trainer.model,
                           ema=trainer.ema.module, losses=trainer.losses, sample_grid=grid,
                           num_skipped=trainer.dataset.num_skipped)
    finally:
        lock.release()
        shutdown_distributed(info)


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: pip install 'ddpmkit[tensorboard]'
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
