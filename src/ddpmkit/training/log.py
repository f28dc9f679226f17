"""The trainer's feedback behind one object: log lines, metrics.jsonl, the tracker, the progress bar.

Log lines and warnings come from rank 0; the tracker is the one ``config.logger`` asks for (none,
TensorBoard or Weights & Biases; never opened unasked). Lines go to
``logging.getLogger("ddpmkit.train")``."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ddpmkit.config import Tracker, TrainConfig, deviations_from_paper
from ddpmkit.distributed import DistInfo
from ddpmkit.fileio import append_line_synced, atomic_write_bytes, read_json_lines

__all__ = ["LOGGER_NAME", "TrainLog", "check_tracker", "deviation_lines", "estimate_lines", "format_duration",
           "plan_line", "truncate_metrics"]

LOGGER_NAME = "ddpmkit.train"
ETA_STEPS = 3  # steps timed after the first (which also pays for start-up) before the estimate
_SLOW_FIRST_S = 10.0  # a first step this slow is the estimate itself: start-up is then negligible
_WARN_AFTER_S = 24 * 3600


class TrainLog:
    """Feedback of one run. Everything is a no-op on ranks other than 0 (``info.is_main``)."""

    def __init__(self, run_dir: Path, info: DistInfo, *, progress: bool) -> None:
        self.run_dir, self.info, self.progress = run_dir, info, progress
        self.tb: Any = None
        self.bar: Any = None
        self._window: list[float] = []
        self._t_last, self._s_last = time.perf_counter(), 0
        self._t_start, self._s_start, self._steps = self._t_last, 0, 0
        self._t_first: float | None = None  # when the first update of this loop ended
        self._updates, self._estimated = 0, False

    def line(self, msg: str) -> None:
        """Log lines (through logging.getLogger("ddpmkit.train"), see ddpmkit.logs): one record per
        line of ``msg``, so that ``--log-format plain`` stamps each."""
        if self.info.is_main:
            from ddpmkit.logs import logger

            for text in msg.split("\n"):
                logger(LOGGER_NAME).info(text)

    def warn(self, msg: str) -> None:
        if self.info.is_main:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def open(self, config: TrainConfig, start: int) -> None:
        """Rank 0, before the first update: metrics.jsonl cut back to ``start``, the tracker opened
        (TensorBoard drops its points past ``start``) and given the config."""
        if self.info.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", start)
            self.tb = _open_tracker(config, self.run_dir, start)

    def image(self, path: Path, step: int) -> None:
        """A sample grid (PNG) to the tracker, rank 0."""
        if self.info.is_main and self.tb is not None:
            self.tb.image(path, step)

    def start_loop(self, config: TrainConfig, start: int) -> None:
        """The progress bar and the first metrics window, from update ``start`` on."""
        self.bar = _progress_bar(config, start, enabled=self.progress and self.info.is_main)
        self._t_last, self._s_last, self._window = time.perf_counter(), start, []
        self._t_start, self._s_start, self._steps = self._t_last, start, config.steps
        self._t_first, self._updates, self._estimated = None, 0, False

    def summary(self, config: TrainConfig, step: int, n_params: int, dataset: Any, *,
                deviations: bool = True) -> None:
        """The run's start: folder, data, model, device, steps and (``deviations``) how the recipe
        differs from the paper's."""
        c = config
        lines = [f"run directory: {self.run_dir}",
                 f"data: {dataset!r}" + (f", {dataset.num_skipped} unreadable skipped so far"
                                        if dataset.num_skipped else ""),
                 f"model: U-Net {n_params:,} parameters; {c.diffusion.num_timesteps} timesteps, "
                 f"{c.diffusion.schedule} betas, {c.diffusion.mean_type.value}-prediction, "
                 f"{c.diffusion.loss_type.value} loss",
                 f"device: {self.info.device}, world size {self.info.world_size}, "
                 f"global batch {c.batch_size} ({c.batch_size // self.info.world_size} per rank), "
                 f"precision {c.precision.value}",
                 f"steps: {step} -> {c.steps}"]
        if deviations:
            lines += deviation_lines(c)
        self.line("\n".join([*lines, plan_line(c, n_params, step, self.info.device)]))

    def update(self, loss: float | None) -> None:
        """One update done; ``loss`` is its global mean loss, None if it was skipped."""
        if loss is not None:
            self._window.append(loss)
        if self.bar is not None:
            self.bar.update(1)
        self._updates += 1
        self._estimate(time.perf_counter())

    def _estimate(self, now: float) -> None:
        """Once per loop, after the first steps: the estimated time (``estimate_lines``), from the
        first step if it took ``_SLOW_FIRST_S`` or more, else from the ``ETA_STEPS`` after it."""
        if self._estimated or not self.info.is_main:
            return
        done = self._updates
        if done == 1:
            self._t_first = now
            if now - self._t_start < _SLOW_FIRST_S:
                return
            per_step = now - self._t_start
        elif done == 1 + ETA_STEPS and self._t_first is not None:
            per_step = (now - self._t_first) / ETA_STEPS
        else:
            return
        self._estimated = True
        info, warning = estimate_lines(per_step, self._steps - self._s_start - done, self.info.device)
        self.line(info)
        if warning is not None:
            from ddpmkit.logs import logger

            logger(LOGGER_NAME).warning(warning)

    def log_point(self, step: int, *, grad_norm: float, lr: float, nonfinite_in_a_row: int,
                  batch_size: int) -> None:
        """The metrics record of the updates since the last one (mean loss, rates), written by rank 0."""
        now = time.perf_counter()
        rate = (step - self._s_last) / max(now - self._t_last, 1e-9)
        record = {"step": step, "loss": float(np.mean(self._window)) if self._window else float("nan"),
                  "grad_norm": grad_norm, "lr": lr, "steps_per_s": rate, "img_per_s": rate * batch_size,
                  "nonfinite_in_a_row": nonfinite_in_a_row}
        if self.info.is_main:
            self.metrics(record)
            if self.bar is not None and not self.bar.disable:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate * batch_size:.0f}")
            else:  # no bar (--no-progress, --log-format plain): a line instead
                self.line(self._step_line(record, now))
        self._t_last, self._s_last, self._window = now, step, []

    def _step_line(self, record: dict[str, Any], now: float) -> str:
        """"step S/N  loss L  lr X  R img/s  ETA T", the ETA from the mean rate since the loop started."""
        step = record["step"]
        per_step = (now - self._t_start) / max(1, step - self._s_start)
        return (f"step {step}/{self._steps}  loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
                f"{record['img_per_s']:.1f} img/s  ETA {format_duration(per_step * (self._steps - step))}")

    def metrics(self, record: dict[str, Any]) -> None:
        """One record: a line of metrics.jsonl (fsynced) and TensorBoard scalars ``train/<key>``."""
        append_line_synced(self.run_dir / "metrics.jsonl", json.dumps(record))
        if self.tb is not None:
            self.tb.scalars({f"train/{k}": v for k, v in record.items()
                             if k != "step" and isinstance(v, (int, float))}, record["step"])

    def close_loop(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_loop()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _progress_bar(config: TrainConfig, start: int, *, enabled: bool) -> Any:
    from ddpmkit.logs import progress_bar  # hidden by ddpm --log-format plain and -q like every bar

    tty = sys.stderr.isatty()  # in a log file, one line every 30 s instead of a redraw per step
    return progress_bar(total=config.steps, initial=start, disable=not enabled, unit="step",
                        dynamic_ncols=True, smoothing=0.05, file=sys.stderr, mininterval=0.1 if tty else 30.0)


def format_duration(seconds: float) -> str:
    """``3h 05m``, ``12m 30s`` or ``45s``."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def plan_line(config: TrainConfig, n_params: int, step: int, device: Any) -> str:
    """"plan: U-Net N parameters, S steps of batch B on DEVICE ...": what the run is about to do."""
    left = config.steps - step
    return (f"plan: U-Net {n_params / 1e6:.2f}M parameters, {left:,} steps of batch {config.batch_size} "
            f"on {device}; the estimated time follows after the first steps")


def estimate_lines(per_step_s: float, steps_left: int, device: Any) -> tuple[str, str | None]:
    """The estimated time of ``steps_left`` steps of ``per_step_s`` seconds each, and a one-line
    warning when it exceeds 24 hours (else None)."""
    total = per_step_s * steps_left
    line = (f"estimated time: {format_duration(total)} for the remaining {steps_left:,} steps "
            f"({per_step_s:.3g} s/step on {device})")
    if total <= _WARN_AFTER_S:
        return line, None
    days = total / 86400
    return line, (f"warning: this run would take about {days:,.1f} days on {device} (more than 24 hours); "
                  "stop it (Ctrl-C) and pass fewer --steps, a smaller network (--net small with --data "
                  "FOLDER) or a GPU")


def deviation_lines(config: TrainConfig) -> list[str]:
    """"deviations from the paper's recipe: N" and one "  - ..." line for each."""
    devs = deviations_from_paper(config)
    return [f"deviations from the paper's recipe: {len(devs) or 'none'}"] + [f"  - {d}" for d in devs]


_PACKAGES = {Tracker.TENSORBOARD: ("tensorboard", "tensorboard"), Tracker.WANDB: ("wandb", "wandb")}


def check_tracker(kind: Tracker) -> None:
    """A ValueError naming the pip install if ``kind``'s package is missing (checked before any work)."""
    if kind is Tracker.NONE:
        return
    module, extra = _PACKAGES[kind]
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"--logger {kind.value} needs the {module} package: pip install 'ddpmkit[{extra}]'")


class _TensorBoard:
    def __init__(self, config: TrainConfig, run_dir: Path, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers drop the points >= it that a killed run wrote past its checkpoint at
        # ``start`` (the point at ``start`` itself is kept, as in metrics.jsonl)
        purge = start + 1 if start else None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        self.writer.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=2) + "\n```", start)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, path: Path, step: int) -> None:
        from PIL import Image

        self.writer.add_image("samples", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, config: TrainConfig, run_dir: Path, start: int) -> None:
        import wandb

        # a new W&B run per (re)start: W&B refuses steps below one it has seen; WANDB_MODE etc. apply
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ddpmkit"), name=run_dir.name,
                              dir=str(run_dir), config=config.to_dict())  # finished in close()

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, path: Path, step: int) -> None:
        self.run.log({"samples": self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def _open_tracker(config: TrainConfig, run_dir: Path, start: int) -> Any:
    kind = config.logger
    if kind is Tracker.NONE:
        return None
    if kind is Tracker.TENSORBOARD:  # the package was checked by check_tracker before any work
        return _TensorBoard(config, run_dir, start)
    if kind is Tracker.WANDB:
        return _Wandb(config, run_dir, start)
    raise NotImplementedError(kind)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written by a run killed after its last checkpoint), and lines
    torn by a power cut or a full disk (with a warning naming the file and line); rewritten atomically."""
    if not path.is_file():
        return
    keep = []
    for number, (line, record) in enumerate(read_json_lines(path), start=1):
        record_step = record.get("step") if isinstance(record, dict) else None
        if type(record_step) is not int:
            warnings.warn(f"{path} line {number}: torn or invalid record dropped: {line[:80]!r}",
                          RuntimeWarning, stacklevel=2)
        elif record_step <= step:
            keep.append(line)
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())
