"""One update of Algorithm 1 (training.step) as train() runs it, pinned to values it does not
compute itself: the EMA, clipping, Adam, the flips, gradient accumulation, the configured loss."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from tiny_runs import config, global_norm, named, tiny_config

from ddpmkit.diffusion import GaussianDiffusion
from ddpmkit.train import train

_ORIGINAL_LOSSES = GaussianDiffusion.training_losses  # before any monkeypatch


# ------------------------------------------------------------------------- EMA
def test_ema_after_one_update_is_decay_w0_plus_one_minus_decay_w1(tmp_path, noise_npz, rec):
    c = config(noise_npz, ema_decay=0.75)
    result = train(c, tmp_path, progress=False)
    w0, w1 = named(result, rec.w0), dict(result.model.named_parameters())
    ema = dict(result.ema.named_parameters())
    moved = 0
    for k in w0:
        expected = 0.75 * w0[k].double() + 0.25 * w1[k].detach().double()
        torch.testing.assert_close(ema[k].detach().double(), expected, rtol=0, atol=1e-6, msg=k)
        moved += not torch.equal(w0[k], w1[k].detach())
    assert moved > len(w0) // 2, "the update must move the weights for the test to mean anything"


def test_update_0_under_the_papers_warmup_leaves_the_weights_unchanged(tmp_path, noise_npz, rec):
    c = config(noise_npz, steps=1, warmup_steps=5000)
    result = train(c, tmp_path, progress=False)
    for k, w in named(result, rec.w0).items():
        assert torch.equal(dict(result.model.named_parameters())[k].detach(), w), k
    assert global_norm(rec.step_grads[0]) > 0  # a real gradient was there and was not applied


# ------------------------------------------------------------------------- clipping and Adam
def test_the_optimizer_receives_the_gradient_clipped_to_global_norm_grad_clip(tmp_path, noise_npz, rec):
    clip = 0.05
    train(config(noise_npz, grad_clip=clip), tmp_path, progress=False)
    raw, seen = rec.raw_grads[0], rec.step_grads[0]
    raw_norm = global_norm(raw)
    assert raw_norm > 4 * clip, raw_norm  # the batch is above the clip
    assert global_norm(seen) == pytest.approx(min(raw_norm, clip), rel=1e-5)
    for g_raw, g_seen in zip(raw, seen, strict=True):  # the same direction, scaled
        torch.testing.assert_close(g_seen, g_raw * (clip / raw_norm), rtol=1e-4, atol=1e-9)


def test_a_gradient_below_the_clip_reaches_the_optimizer_unchanged(tmp_path, noise_npz, rec):
    train(config(noise_npz, grad_clip=1e6), tmp_path, progress=False)
    for g_raw, g_seen in zip(rec.raw_grads[0], rec.step_grads[0], strict=True):
        torch.testing.assert_close(g_seen, g_raw, rtol=1e-6, atol=0)


def test_adam_betas_and_eps_come_from_the_config_and_give_adams_steps(tmp_path, noise_npz, rec):
    """Two Adam steps written out in float64 from the recorded w0 and gradients, with the config's
    betas and a large eps (so that eps changes the step visibly)."""
    lr, eps, b1, b2 = 1e-3, 1e-4, 0.8, 0.95
    c = config(noise_npz, adam_betas="0.8,0.95", adam_eps=eps, lr=lr, grad_clip=1e6, steps=2)
    result = train(c, tmp_path, progress=False)
    assert rec.groups == [{"betas": (b1, b2), "eps": eps}] * 2
    w = [x.double() for x in rec.w0]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    for s, grads in enumerate(rec.step_grads, start=1):
        for i, g in enumerate(grads):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            w[i] = w[i] - lr * (m[i] / (1 - b1**s)) / ((v[i] / (1 - b2**s)).sqrt() + eps)
    for (name, p), expected in zip(result.model.named_parameters(), w, strict=True):
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6, msg=name)


# ------------------------------------------------------------------------- flips
def _flip_kinds(batches: list[torch.Tensor], seen: list[torch.Tensor]) -> dict[str, int]:
    kinds = {"none": 0, "left-right": 0, "other": 0}
    for orig, x in zip(torch.cat(batches), torch.cat(seen), strict=True):  # (C, H, W) each
        if torch.equal(x, orig):
            kinds["none"] += 1
        elif torch.equal(x, orig.flip(-1)):
            kinds["left-right"] += 1
        else:  # up-down, transposed, ...
            kinds["other"] += 1
    return kinds


def test_flips_are_left_right_with_probability_one_half(tmp_path, noise_npz, rec):
    """n = 256 images; under Binomial(n, 1/2) the count lies within 4 sd (= 32) of n/2 with
    probability 1 - 6e-5. An always-flip or never-flip trainer is 128 away."""
    c = config(noise_npz, random_flip="true", batch_size=64, steps=4)
    train(c, tmp_path, progress=False)
    kinds = _flip_kinds(rec.batches, rec.x0)
    n = 4 * 64
    assert kinds["other"] == 0, kinds
    assert abs(kinds["left-right"] - n / 2) <= 4 * math.sqrt(n * 0.25), kinds


def test_no_flips_when_random_flip_is_off(tmp_path, noise_npz, rec):
    train(config(noise_npz, random_flip="false", batch_size=64, steps=2), tmp_path, progress=False)
    assert _flip_kinds(rec.batches, rec.x0) == {"none": 128, "left-right": 0, "other": 0}


# ------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("loss_type, var_type", [("mse", "fixedlarge"), ("kl", "fixedsmall"),
                                                 ("hybrid", "learned_range")])
def test_the_configured_loss_and_variance_types_reach_the_loss(tmp_path, noise_npz, rec, loss_type, var_type):
    """The loss of update 0 equals that of a diffusion built in the test for (loss, var), evaluated
    on the initial weights and the same x0, t, eps."""
    from ddpmkit.diffusion import DiffusionConfig, LossType, VarType
    from ddpmkit.nn import UNet

    learned = str(var_type.startswith("learned")).lower()  # the U-Net's variance output, (B, 2C, H, W)
    c = config(noise_npz, **{"diffusion.loss_type": loss_type, "diffusion.var_type": var_type,
                             "unet.learned_variance": learned})
    result = train(c, tmp_path, progress=False)
    diffusion, x0, t, noise, loss = rec.losses[0]
    assert (diffusion.loss_type, diffusion.var_type) == (LossType(loss_type), VarType(var_type))
    mine = DiffusionConfig(num_timesteps=20, loss_type=LossType(loss_type), var_type=VarType(var_type),
                           schedule=c.diffusion.schedule, mean_type=c.diffusion.mean_type).build()
    net = UNet(config=c.unet)
    net.load_state_dict(named(result, rec.w0), strict=True)
    torch.testing.assert_close(loss, _original_training_losses(mine, net, x0, t, noise), rtol=1e-5, atol=1e-6)
    other = "kl" if loss_type != "kl" else "mse"
    wrong = DiffusionConfig(num_timesteps=20, loss_type=LossType(other), var_type=VarType(var_type),
                            schedule=c.diffusion.schedule, mean_type=c.diffusion.mean_type).build()
    assert not torch.allclose(_original_training_losses(wrong, net, x0, t, noise), loss, rtol=1e-3)


def _original_training_losses(diffusion, net, x0, t, noise) -> torch.Tensor:
    with torch.no_grad():
        return _ORIGINAL_LOSSES(diffusion, net, x0, t, noise)["loss"]


# ------------------------------------------------------------------------- gradient accumulation
def test_grad_accum_gives_the_optimizer_the_full_batch_gradient(tmp_path, noise_npz, rec):
    for accum in (1, 2, 4):
        train(config(noise_npz, grad_accum=accum, grad_clip=1e6), tmp_path / str(accum), progress=False)
    full, *accumulated = rec.step_grads
    assert [x.shape[0] for x in rec.x0] == [8] + [4] * 2 + [2] * 4  # the micro-batches reached the loss
    assert global_norm(full) > 0
    for grads in accumulated:
        for g_full, g in zip(full, grads, strict=True):
            torch.testing.assert_close(g, g_full, rtol=0, atol=1e-6)


def test_grad_accum_clips_the_accumulated_gradient(tmp_path, noise_npz, rec):
    clip = 0.05
    train(config(noise_npz, grad_clip=1e6), tmp_path / "full", progress=False)
    train(config(noise_npz, grad_accum=2, grad_clip=clip), tmp_path / "accum", progress=False)
    full, raw, seen = rec.raw_grads[0], rec.raw_grads[1], rec.step_grads[1]
    norm = global_norm(full)
    assert norm > 4 * clip
    assert global_norm(raw) == pytest.approx(norm, rel=1e-5)  # .grad holds the sum of both halves
    assert global_norm(seen) == pytest.approx(clip, rel=1e-5)
    for g_full, g_seen in zip(full, seen, strict=True):
        torch.testing.assert_close(g_seen, g_full * (clip / norm), rtol=1e-4, atol=1e-9)


def test_grad_accum_a_nan_in_one_micro_batch_skips_the_whole_update(tmp_path, noise_npz, monkeypatch):
    from ddpmkit.training.step import UpdateStep

    reference = train(config(noise_npz, steps=1), tmp_path / "ref", progress=False)
    loss, calls = UpdateStep.loss, [0]

    def nan_in_micro_batch_3(self, *args, **kwargs):  # update 2's second half
        calls[0] += 1
        out = loss(self, *args, **kwargs)
        return out * float("nan") if calls[0] == 4 else out

    monkeypatch.setattr(UpdateStep, "loss", nan_in_micro_batch_3)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        result = train(config(noise_npz, steps=2, grad_accum=2), tmp_path / "nan", progress=False)
    assert sorted(result.losses) == [1] and calls[0] == 4
    for k, v in reference.model.state_dict().items():  # update 1 equals the full batch's; update 2 skipped
        torch.testing.assert_close(result.model.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


def test_grad_accum_under_ddp_syncs_only_the_last_micro_batch(tmp_path, noise_npz, monkeypatch):
    """A stand-in for DistributedDataParallel (one process cannot build one) records which
    micro-batches ran inside ``no_sync``."""
    import ddpmkit.training.step as step_module
    from ddpmkit.distributed import DistInfo
    from ddpmkit.training.state import build_state
    from ddpmkit.training.step import UpdateStep

    inside: list[bool] = []

    class FakeDDP(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.syncing = module, True

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing = False
            try:
                yield
            finally:
                self.syncing = True

        def forward(self, *args, **kwargs):
            inside.append(not self.syncing)
            return self.module(*args, **kwargs)

    monkeypatch.setattr(step_module, "DistributedDataParallel", FakeDDP)
    c = config(noise_npz, grad_accum=4)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    state = build_state(c, info)
    update = UpdateStep(state=state, diffusion=c.diffusion.build(), net=FakeDDP(state.model), info=info)
    assert update(torch.zeros(8, 1, 8, 8), 0).finite
    assert inside == [True, True, True, False]


def test_ema_warmup_averages_with_the_decay_of_each_update(tmp_path, noise_npz, rec):
    c = config(noise_npz, steps=3, ema_warmup="true", ema_decay=0.9, ema_inv_gamma=2.0, ema_power=1.0)
    result = train(c, tmp_path, progress=False)
    weights = [named(result, w) for w in rec.w_before[1:]] + [dict(result.model.named_parameters())]
    ema = {k: v.double() for k, v in named(result, rec.w0).items()}
    for s, w in enumerate(weights):  # decay of update s: min(0.9, 1 - (1 + s / 2) ** -1)
        d = min(0.9, 1 - 1 / (1 + s / 2))
        ema = {k: d * ema[k] + (1 - d) * w[k].detach().double() for k in ema}
    for k, v in result.ema.named_parameters():
        torch.testing.assert_close(v.detach().double(), ema[k], rtol=0, atol=1e-6, msg=k)


def test_an_update_whose_result_is_non_finite_is_skipped_like_a_nan_loss(tmp_path, tiny_npz, monkeypatch):
    """Update 1 writes a NaN into one weight after Adam's step: the weights, the optimiser and the EMA
    must end exactly as in a run whose update 1 had a NaN loss (skipped)."""
    c = tiny_config(tiny_npz, steps=4, max_nonfinite=2)
    from tiny_runs import inject_nonfinite

    with monkeypatch.context() as m, pytest.warns(RuntimeWarning, match="non-finite"):
        inject_nonfinite(m, lambda step: step == 1)
        reference = train(c, tmp_path / "ref", progress=False)
    step_fn, calls = torch.optim.Adam.step, []

    def poisoning_step(self, *a, **k):
        out = step_fn(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:  # the second update (0-based update 1)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoning_step)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = train(c, tmp_path / "poison", progress=False)
    assert result.exit_code == 0 and sorted(result.losses) == sorted(reference.losses) == [1, 3, 4]
    from tiny_runs import assert_states_equal, final_state

    assert_states_equal(final_state(tmp_path / "poison"), final_state(tmp_path / "ref"))
