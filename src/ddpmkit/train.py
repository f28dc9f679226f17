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

Callbacks. ``train(..., callbacks=[fn])`` calls each ``fn(event)`` on rank 0 with a ``TrainEvent``
after every update (``EventKind.UPDATE``), after every checkpoint (``CHECKPOINT``, with its folder)
and after every sample grid (``GRID``, with its PNG; a grid due at the step resumed from that a
kill cut short is written, with its event, before the first update). They run inside the loop: a callback that
raises stops the run with that exception, after the lock is released; nothing is saved for the
steps since the last checkpoint, which is complete (checkpoints are written atomically), so
``resume="auto"`` continues exactly as if the run had been killed there.

Safety. A non-finite loss, gradient norm or update result (a weight) skips the update (weights,
optimiser, EMA unchanged) and warns; ``max_nonfinite`` in a row stop the run with exit code
``EXIT_NONFINITE``. SIGTERM and SIGINT (Ctrl-C) are answered at once: the run finishes the current
step, saves a checkpoint and returns 128 + signal. A second one stops inside the step, without
saving, naming the checkpoint that ``resume="auto"`` continues from, and also returns 128 + signal.
"""

from __future__ import annotations

import enum
import functools
import math
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ddpmkit import checkpoint as ckpt
from ddpmkit.config import Precision, TrainConfig, save_config
from ddpmkit.distributed import DistInfo, all_reduce_max, barrier, init_distributed, shutdown_distributed
from ddpmkit.fileio import RunLock, check_output_path
from ddpmkit.nn import UNet
from ddpmkit.training.data import batch_indices, batch_stream, epoch_permutation
from ddpmkit.training.fit import check_fits
from ddpmkit.training.log import TrainLog, check_tracker
from ddpmkit.training.state import (
    PendingRng,
    TrainState,
    build_state,
    load_resumable,
    newest_resumable,
    prepare_run_dir,
    publish_models,
    restore,
    save,
    tidy_run_dir,
)
from ddpmkit.training.step import UpdateStep, autocast, learning_rate

__all__ = ["EXIT_NONFINITE", "EventKind", "TrainEvent", "TrainResult", "batch_indices", "epoch_permutation",
           "learning_rate", "load_resumable", "newest_resumable", "train"]

EXIT_NONFINITE = 3


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


class EventKind(enum.Enum):
    """What a callback is told about: an update done, a checkpoint written, a sample grid written."""

    UPDATE = "update"
    CHECKPOINT = "checkpoint"
    GRID = "grid"


@dataclass(frozen=True, kw_only=True)
class TrainEvent:
    """What a callback gets. ``step``: updates done (1-based); ``loss``: that update's global mean loss
    (None if it was skipped as non-finite); ``lr``: the lr it used; ``path``: the checkpoint folder
    or grid PNG (None for UPDATE). ``model`` / ``ema`` are the live networks: read, don't modify."""

    kind: EventKind
    step: int
    loss: float | None
    lr: float
    run_dir: Path
    model: UNet
    ema: UNet
    path: Path | None = None


TrainCallback = Callable[[TrainEvent], None]


class _StopNow(KeyboardInterrupt):
    """Raised by a second SIGINT / SIGTERM: stop inside the current step, without saving."""


def _signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class _StopFlag:
    """Records SIGTERM / SIGINT; the loop checks it after each step. The first signal is answered at
    once (``say``): the run stops after the current step and saves; a second one raises ``_StopNow``
    inside the step (nothing is saved; the newest checkpoint, ``resume_from()``, is where it resumes)."""

    def __init__(self, say: Callable[[str], None] = lambda _: None,
                 resume_from: Callable[[], str] = lambda: "its newest checkpoint") -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}
        self._say, self.resume_from = say, resume_from

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = _signal_name(signum)
        if self.signum:
            self.__exit__()  # a third signal gets the default action
            raise _StopNow(signum)
        self.signum = signum
        self._say(f"{name}: stopping after the current step, then saving a checkpoint; {name} again stops "
                  f"at once, and the run then resumes from {self.resume_from()}")

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


@dataclass
class _Run:
    """The parts of one run: its data, its resumable state, its update step and its feedback."""

    config: TrainConfig
    run_dir: Path
    info: DistInfo
    dataset: Any
    diffusion: Any
    state: TrainState
    update: UpdateStep
    log: TrainLog
    losses: dict[int, float] = field(default_factory=dict)
    callbacks: Sequence[TrainCallback] = ()
    last_loss: float | None = None  # of the latest update, for the events

    def save(self) -> None:
        save(self.state, self.run_dir, self.info, len(self.dataset), self.log.line)
        self.notify(EventKind.CHECKPOINT, ckpt.checkpoint_dir(self.run_dir) / f"step-{self.state.step:09d}")

    def notify(self, kind: EventKind, path: Path | None = None) -> None:
        """Each callback, on rank 0, in order."""
        if not self.info.is_main or not self.callbacks:
            return
        s = self.state
        event = TrainEvent(kind=kind, step=s.step, loss=self.last_loss,
                           lr=learning_rate(self.config, s.step - 1), run_dir=self.run_dir, model=s.model,
                           ema=s.ema.module, path=path)
        for fn in self.callbacks:
            fn(event)


def _build_run(config: TrainConfig, run_dir: Path, info: DistInfo, *, progress: bool) -> _Run:
    """The data source, the diffusion, the step-0 state (model, EMA, optimiser) and the update step."""
    from ddpmkit.data import open_source

    if config.batch_size % info.world_size:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the world size "
                         f"{info.world_size} (the global batch is kept across world sizes)")
    if config.batch_size % (info.world_size * config.grad_accum):
        raise ValueError(f"the per-rank batch {config.batch_size // info.world_size} must be divisible by "
                         f"grad_accum {config.grad_accum}")
    check_tracker(config.logger)  # a missing package, before any work
    if config.precision is Precision.FP16 and info.device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; use 'fp32' or 'bf16'")
    dataset = open_source(config.data, resolution=config.unet.resolution, channels=config.unet.in_channels,
                          split="train", on_bad_image=config.on_bad_image.value)
    diffusion = config.diffusion.build()
    state = build_state(config, info)
    device_ids = [info.device] if info.device.type == "cuda" else None
    net = DistributedDataParallel(state.model, device_ids=device_ids) if info.enabled else state.model
    return _Run(config=config, run_dir=run_dir, info=info, dataset=dataset, diffusion=diffusion, state=state,
                update=UpdateStep(state=state, diffusion=diffusion, net=net, info=info),
                log=TrainLog(run_dir, info, progress=progress))


def _start(run: _Run, resume: str | None) -> PendingRng | None:
    """Resume (or not), tidy the run folder, write config.json and a grid of the checkpoint's step that
    a kill cut short; returns the checkpoint's RNGs, still to apply."""
    run_dir, info, config = run.run_dir, run.info, run.config
    start = prepare_run_dir(run_dir, info, resume)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(info)
    pending = None
    if start is not None:
        pending = restore(run.state, start, info, len(run.dataset), log=run.log.line, warn=run.log.warn)
        if run.state.step > config.steps:  # nothing to train: say so rather than exit 0 in silence
            run.log.line(f"the checkpoint is at step {run.state.step}, past --steps {config.steps}: "
                         "nothing to train; the run stays as it is (pass a larger --steps to continue)")
    elif resume == "auto":
        run.log.line(f"no complete checkpoint in {run_dir}; starting from step 0")
    if info.is_main:
        tidy_run_dir(run_dir)
        if start is not None:
            publish_models(run.state, run_dir, only_if_stale=True, log=run.log.line)
            ckpt.prune(run_dir, config.keep_last)
        save_config(config, run_dir / "config.json")
        run.log.open(config, run.state.step)
    if start is not None and _grid_due(config, run.state.step):
        _sample_grid(run, only_if_missing=True)  # a kill after the step's checkpoint cut its grid short
    return pending


def _loop(run: _Run, stop: _StopFlag, pending: PendingRng | None) -> int:
    """Algorithm 1 from ``run.state.step`` to ``config.steps``: update, log, checkpoint, grid, stop.
    Returns 0, ``EXIT_NONFINITE`` (``max_nonfinite`` skipped updates in a row) or 128 + signal."""
    c, s, log = run.config, run.state, run.log
    log.start_loop(c, s.step)
    stream = batch_stream(run.dataset, c, run.info, s.step)
    if pending is not None:  # after the loader's iterator exists: the first dropout mask is the saved one
        pending.apply(s, run.info)
    nonfinite = 0
    try:
        for x0 in stream:
            result = run.update(x0, s.step)
            s.step += 1
            if result.finite:
                nonfinite = 0
                run.losses[s.step] = result.loss
            else:
                nonfinite += 1
                log.warn(f"step {s.step}: non-finite loss {result.loss}, gradient norm {result.grad_norm} or "
                         f"updated weights; update skipped ({nonfinite} in a row, limit {c.max_nonfinite})")
                if nonfinite >= c.max_nonfinite:
                    log.line(f"stopping: {nonfinite} non-finite steps in a row; the last good "
                             "checkpoint is kept (lower lr or check the data, then --resume auto)")
                    return EXIT_NONFINITE
            run.last_loss = result.loss if result.finite else None
            log.update(run.last_loss)
            if s.step % c.log_every == 0 or s.step == c.steps:
                log.log_point(s.step, grad_norm=result.grad_norm, lr=learning_rate(c, s.step - 1),
                              nonfinite_in_a_row=nonfinite, batch_size=c.batch_size)
            run.notify(EventKind.UPDATE)
            signum = all_reduce_max(stop.signum, run.info)
            if s.step % c.checkpoint_every == 0 or s.step == c.steps or signum:
                run.save()
            if _grid_due(c, s.step):
                _sample_grid(run)
            if signum:
                log.line(f"stopped by signal {signum} after step {s.step}; checkpoint saved; --resume auto "
                         f"resumes from {stop.resume_from()}")
                return 128 + signum
        return 0
    finally:
        log.close_loop()


def _resume_point(run_dir: Path) -> str:
    """Where ``resume="auto"`` would continue ``run_dir`` now: its newest complete checkpoint."""
    last = ckpt.latest_checkpoint(run_dir)
    if last is None:
        return "step 0 (no checkpoint yet)"
    return f"{last.relative_to(run_dir)} (step {int(last.name.split('-')[1])})"


def _grid_due(c: TrainConfig, step: int) -> bool:
    """Whether the loop writes a grid after update ``step`` (the last step's grid is ``_finish``'s)."""
    return step % c.sample_every == 0 and step != c.steps


def _sample_grid(run: _Run, *, only_if_missing: bool = False) -> Path | None:
    """A grid from the EMA weights with the same noise every time, written by rank 0 (others wait).
    ``only_if_missing``: on resume, the grid of the checkpoint's step, unless it is already there
    (the checkpoint is published before its step's grid is written, so a kill can fall between)."""
    from ddpmkit.images import save_image_grid, to_uint8_nhwc
    from ddpmkit.sampling import sample_ancestral
    from ddpmkit.seeds import sample_generators

    c, path, n = run.config, None, run.config.num_samples
    target = run.run_dir / "samples" / f"step-{run.state.step:09d}.png"
    if only_if_missing and target.is_file():
        n = 0
    elif only_if_missing and run.info.is_main and n > 0:
        run.log.line(f"the sample grid {target} is missing (the last run stopped before writing it); "
                     "writing it")
    if run.info.is_main and n > 0:
        net = run.state.ema.module.eval()
        res = c.unet.resolution
        shape = (n, c.unet.in_channels, res, res)
        noise = sample_generators(c.seed, range(n))  # the same noise at every grid
        with torch.no_grad(), autocast(c.precision, run.info.device):
            x = sample_ancestral(net, run.diffusion, shape, generator=noise, device=run.info.device)
        images = to_uint8_nhwc(x)  # (n, H, W, C)
        path = save_image_grid(images, target, nrow=math.ceil(math.sqrt(n)), scale=max(1, 64 // res),
                               min_width=512)
        run.log.image(path, run.state.step)
    barrier(run.info)
    if path is not None:
        run.notify(EventKind.GRID, path)
    return path


def _finish(run: _Run, code: int) -> TrainResult:
    """The final grid (after a complete run), the closing lines, the result."""
    grid = _sample_grid(run) if code == 0 else None
    if grid is not None:
        run.log.line(f"wrote sample grid {grid}")
    if run.dataset.num_skipped:
        run.log.line(f"skipped {run.dataset.num_skipped} unreadable image file(s)")
    run.log.close()
    return TrainResult(exit_code=code, step=run.state.step, run_dir=run.run_dir, model=run.state.model,
                       ema=run.state.ema.module, losses=run.losses, sample_grid=grid,
                       num_skipped=run.dataset.num_skipped)


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: str | None = None,
    device: str | None = None,
    progress: bool = True,
    callbacks: Sequence[TrainCallback] = (),
    deviations: bool = True,
) -> TrainResult:
    """Train ``config`` into ``run_dir``; ``resume``: None, "auto" (newest complete checkpoint) or a path.
    ``callbacks``: functions of a ``TrainEvent``, called on rank 0 (see the module docstring).
    ``deviations``: list how the recipe differs from the paper's at the start (a caller that trains
    many variants of one recipe lists them once itself).

    Under ``torchrun`` each process calls this; rank 0 writes. Returns a TrainResult whose
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
            for name in ("model", "model_raw"):  # replaced at every checkpoint: a symlink there is refused
                check_output_path(run_dir / name, folder=True)
        barrier(info)
        run = _build_run(config, run_dir, info, progress=progress)
        run.callbacks = tuple(callbacks)
        try:
            pending = _start(run, resume)
            run.log.summary(config, run.state.step, sum(p.numel() for p in run.state.model.parameters()),
                            run.dataset, deviations=deviations)
            with _StopFlag(run.log.line, functools.partial(_resume_point, run_dir)) as stop:
                try:
                    code = _loop(run, stop, pending)
                except _StopNow as now:
                    signum = int(now.args[0])
                    run.log.line(f"stopped at once by a second {_signal_name(signum)}, during step "
                                 f"{run.state.step + 1}; nothing saved since the last checkpoint; "
                                 f"--resume auto resumes from {stop.resume_from()}")
                    code = 128 + signum
            return _finish(run, code)
        finally:
            run.log.close()  # the tracker too, when a callback or an error stops the run
    finally:
        lock.release()
        shutdown_distributed(info)
