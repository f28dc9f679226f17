"""A tiny training run (its settings) and what its run folder holds: shared by the trainer tests."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from ddpmkit import checkpoint as ckpt
from ddpmkit.config import (
    apply_overrides,
    train_preset,
)
from ddpmkit.train import EventKind, TrainEvent, train


def tiny_overrides(npz: Path, **extra) -> dict[str, str]:
    """A one-level ch-32 U-Net with dropout and flips on (both draw random numbers to restore)."""
    over = {"data": str(npz), "unet.ch": "32", "unet.ch_mult": "1", "unet.num_res_blocks": "1",
            "unet.attn_resolutions": "", "unet.dropout": "0.1", "random_flip": "true",
            "diffusion.num_timesteps": "100", "batch_size": "16", "steps": "6", "checkpoint_every": "3",
            "log_every": "1", "sample_every": "1000", "num_samples": "0", "warmup_steps": "2", "lr": "1e-3"}
    over.update({k: str(v) for k, v in extra.items()})
    return over


def tiny_config(npz: Path, **extra):
    return apply_overrides(train_preset("digits"), tiny_overrides(npz, **extra))


def inject_nonfinite(monkeypatch, at) -> None:
    """Make the loss of every 0-based update ``step`` with ``at(step)`` NaN (a test seam: the update
    step's ``loss`` is wrapped here, production code has no hook)."""
    from ddpmkit.training.step import UpdateStep

    call, loss, current = UpdateStep.__call__, UpdateStep.loss, [None]

    def call_noting_the_step(self, x0, step):
        current[0] = step
        return call(self, x0, step)

    def nonfinite_loss(self, *args, **kwargs):
        out = loss(self, *args, **kwargs)
        return out * float("nan") if at(current[0]) else out

    monkeypatch.setattr(UpdateStep, "__call__", call_noting_the_step)
    monkeypatch.setattr(UpdateStep, "loss", nonfinite_loss)


def cli_args(over: dict[str, str]) -> list[str]:
    return [a for k, v in over.items() for a in ("--set", f"{k}={v}")]


def metric_losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines]
    assert steps == sorted(set(steps)), "metrics.jsonl must hold each step once, in order"
    return {r["step"]: r["loss"] for r in lines}


def final_state(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    c = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    return {"model": c.tensors["model"], "ema": c.tensors["ema"], "optimizer": c.tensors["optimizer"]}


def assert_states_equal(a, b) -> None:
    for group in ("model", "ema", "optimizer"):
        assert set(a[group]) == set(b[group])
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}/{k} differs"


N_IMAGES, RES = 24, 8


def config(npz: Path, **extra):
    over = {"data": str(npz), "unet.ch": "32", "unet.ch_mult": "1", "unet.num_res_blocks": "1",
            "unet.attn_resolutions": "", "unet.dropout": "0.0", "random_flip": "false",
            "diffusion.num_timesteps": "20", "batch_size": "8", "steps": "1", "checkpoint_every": "1000",
            "log_every": "1000", "sample_every": "1000", "num_samples": "0", "warmup_steps": "0",
            "lr": "1e-3", "ema_decay": "0.75", "keep_last": "1000"}
    over.update({k: str(v) for k, v in extra.items()})
    return apply_overrides(train_preset("digits"), over)


class Recorder:
    """What the trainer handed to the optimizer, the data set and the loss, step by step."""

    def __init__(self) -> None:
        self.w0: list[torch.Tensor] = []  # parameters when the optimizer was built
        self.raw_grads: list[list[torch.Tensor]] = []  # per update: grads as backward left them
        self.step_grads: list[list[torch.Tensor]] = []  # per update: grads the optimizer saw
        self.w_before: list[list[torch.Tensor]] = []  # per update: parameters just before step()
        self.lrs: list[float] = []  # per update: lr of the (single) param group at step()
        self.groups: list[dict] = []  # per update: betas, eps of the group at step()
        self.indices: list[np.ndarray] = []  # per get_batch call
        self.batches: list[torch.Tensor] = []  # get_batch outputs (B, C, H, W)
        self.x0: list[torch.Tensor] = []  # x0 reaching training_losses
        self.train_mode: list[bool] = []  # model.training at each training_losses call
        self.losses: list[tuple] = []  # (diffusion, x0, t, noise, loss) per training_losses call
        self.sampled: list[tuple[dict, bool]] = []  # (net weights, net.training) per grid


def named(result, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for (name, _), t in zip(result.model.named_parameters(), tensors, strict=True)}


def global_norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


class Boom(RuntimeError):
    pass


def raise_at(step: int):
    def callback(event: TrainEvent) -> None:
        if event.kind is EventKind.UPDATE and event.step == step:
            raise Boom(f"stop at {step}")
    return callback


def _copy(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst / "run")
    return dst / "run"


def _resume(run: Path, tiny_npz: Path, steps: int = 4):
    c = tiny_config(tiny_npz, steps=steps, checkpoint_every=2, keep_last=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(c, run, resume="auto", progress=False)
    return result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------- 5, 6, 7: torn checkpoints
def _corrupt_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------- strict reads
def _rehash(folder: Path, name: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": ckpt.hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _set(state: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        state = state[int(k)] if isinstance(state, list) else state[k]
    if isinstance(state, list):
        state[int(last)] = value
    else:
        state[last] = value
