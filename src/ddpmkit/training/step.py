"""One update of Algorithm 1: draw flip, t and eps; the loss; backward; clip; the optimiser step; EMA.

With ``grad_accum`` N the rank's batch is split into N micro-batches whose gradients add up in
``.grad`` (each loss scaled by 1/N, so the sum is the batch mean's gradient); the NaN guard, the
clipping and the optimiser act once, on the sum. Under DDP only the last micro-batch all-reduces.

A non-finite loss, gradient norm or update result (a weight) skips the update: the weights, the
optimiser state and the EMA are left as they were (``UpdateResult.finite`` is False).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ddpmkit.config import LrSchedule, Precision, TrainConfig
from ddpmkit.data.convert import horizontal_flip_where
from ddpmkit.distributed import DistInfo, all_reduce_mean
from ddpmkit.training.state import TrainState

__all__ = ["UpdateResult", "UpdateStep", "autocast", "learning_rate"]


def learning_rate(config: TrainConfig, step: int) -> float:
    """The lr at 0-based update ``step``: the authors' warm-up lr * min(1, step / warmup_steps), then
    ``lr_schedule``: constant, or from lr at ``warmup_steps`` to ``lr_min`` at ``steps`` with progress
    p = (step - warmup) / (steps - warmup): linear lr_min + (lr - lr_min) (1 - p), cosine
    lr_min + (lr - lr_min) (1 + cos(pi p)) / 2 (diffusers' ``get_*_schedule_with_warmup`` shapes)."""
    c, w = config, config.warmup_steps
    if step < w or c.lr_schedule is LrSchedule.CONSTANT:
        return c.lr if w == 0 else c.lr * min(1.0, step / w)
    p = min(1.0, (step - w) / max(1, c.steps - w))
    if c.lr_schedule is LrSchedule.LINEAR:
        return c.lr_min + (c.lr - c.lr_min) * (1.0 - p)
    if c.lr_schedule is LrSchedule.COSINE:
        return c.lr_min + (c.lr - c.lr_min) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise NotImplementedError(c.lr_schedule)


def autocast(precision: Precision, device: torch.device) -> Any:
    """The autocast context of ``precision`` on ``device`` (none for fp32)."""
    dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass(frozen=True)
class UpdateResult:
    """``loss``: the global mean loss of the batch; ``grad_norm``: before clipping; ``finite``: kept."""

    loss: float
    grad_norm: float
    finite: bool


class UpdateStep:
    """One update on this rank's batch. ``net`` is what the loss calls (the model, or its DDP wrapper)."""

    def __init__(self, *, state: TrainState, diffusion: Any, net: torch.nn.Module, info: DistInfo) -> None:
        self.state, self.diffusion, self.net, self.info = state, diffusion, net, info

    def __call__(self, x0: torch.Tensor, step: int) -> UpdateResult:
        """0-based update ``step`` on x0: (b, C, H, W) in [-1, 1], this rank's slice of the global batch."""
        s, c = self.state, self.state.config
        x0, t, noise = self.draw(x0.to(self.info.device, non_blocking=True))
        for group in s.opt.param_groups:
            group["lr"] = learning_rate(c, step)
        loss = self.accumulate(x0, t, noise)
        s.scaler.unscale_(s.opt)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(s.model.parameters(), c.grad_clip))
        loss_value = float(all_reduce_mean(loss, self.info))
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            finite = self._update_or_undo()
        elif s.scaler.is_enabled():  # the scaler skips inf/NaN gradients itself
            s.scaler.step(s.opt)
            s.scaler.update()
        if finite:
            s.ema.update_parameters(s.model)
        s.opt.zero_grad(set_to_none=True)
        return UpdateResult(loss=loss_value, grad_norm=grad_norm, finite=finite)

    def draw(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flip, t and eps of the whole global batch from the shared generator; this rank's slice."""
        c, g = self.state.config, self.state.generator
        B = c.batch_size
        flip = torch.rand(B, generator=g) < 0.5  # (B,)
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=g)  # (B,)
        noise = torch.randn((B, *x0.shape[1:]), generator=g)  # (B, C, H, W)
        b, lo = x0.shape[0], self.info.rank * x0.shape[0]
        dev = self.info.device
        if c.random_flip:
            x0 = horizontal_flip_where(x0, flip[lo:lo + b])
        return x0, t[lo:lo + b].to(dev), noise[lo:lo + b].to(dev)

    def accumulate(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Backward of the batch mean loss as ``grad_accum`` micro-batches of b / N; the gradients add up
        in ``.grad``. x0, noise: (b, C, H, W); t: (b,). Returns the batch mean loss, detached, float32."""
        s, n = self.state, self.state.config.grad_accum
        ddp = isinstance(self.net, DistributedDataParallel)
        total = None
        for i, (x, tt, e) in enumerate(zip(x0.chunk(n), t.chunk(n), noise.chunk(n), strict=True)):  # b/N each
            with self.net.no_sync() if ddp and i < n - 1 else nullcontext():  # all-reduce once, at the last
                loss = self.loss(x, tt, e)
                if n > 1:  # not for N = 1: the same float ops as before grad_accum existed
                    loss = loss / n
                s.scaler.scale(loss).backward()
            total = loss.detach().float() if total is None else total + loss.detach().float()
        return total

    def loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The batch mean of the configured loss (L_simple, L_vlb or hybrid): a 0-dim tensor."""
        with autocast(self.state.config.precision, self.info.device):
            # t and noise come from ``draw``: no per-step checks (t's range check is a device sync on a GPU)
            return self.diffusion.training_losses(self.net, x0, t, noise, check=False)["loss"].mean()

    def _update_tensors(self) -> list[torch.Tensor]:
        """Everything one optimiser step writes: the parameters, then the optimiser's state tensors."""
        params = list(self.state.model.parameters())
        state = [v for p in params for v in self.state.opt.state.get(p, {}).values() if torch.is_tensor(v)]
        return params + state

    def _update_or_undo(self) -> bool:
        """The optimiser step; if it leaves a weight non-finite, the parameters and the optimiser state
        are put back, so a non-finite update result is skipped like a non-finite loss. True if kept."""
        opt, scaler = self.state.opt, self.state.scaler
        had_state = bool(opt.state)
        before = [t.clone() for t in self._update_tensors()]  # one copy: ~3x the weights, device-side
        scaler.step(opt)
        scaler.update()
        params = list(self.state.model.parameters())
        if bool(torch.stack(torch._foreach_norm(params, float("inf"))).isfinite().all()):
            return True
        if not had_state:  # the first update: Adam had no state before it
            opt.state.clear()
        with torch.no_grad():
            torch._foreach_copy_(self._update_tensors(), before[:len(self._update_tensors())])
        return False
