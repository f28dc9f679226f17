"""The trainer pinned to values it does not compute itself.

test_train.py compares runs with runs (resumed vs straight, NaN vs reference); here each test
checks what one run did against a closed form written in the test: the EMA formula, the authors'
warm-up numbers, the clipped norm, the flip statistics, the data-order invariants, which weights
the grid and the model folders hold, Adam's first step. Nothing in the trainer is modified: the
tests watch it through monkeypatched seams (the optimizer class, the dataset's ``get_batch``, the
diffusion's ``training_losses``, the sampler), all through the public ``train()``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_runs import N_IMAGES, config, global_norm, named

from ddpmkit import checkpoint as ckpt
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


# ------------------------------------------------------------------------- learning rate
def test_lr_used_at_updates_0_1_and_warmup_is_the_authors(tmp_path, noise_npz, rec):
    """lr * min(1, s / warmup) at 0-based update s (the authors' TF code); written out by hand."""
    c = config(noise_npz, steps=5, warmup_steps=4, lr=2e-3)
    train(c, tmp_path, progress=False)
    assert len(rec.lrs) == 5
    assert rec.lrs[0] == 0.0 and rec.lrs[1] == pytest.approx(5e-4, rel=1e-12)
    assert rec.lrs[4] == pytest.approx(2e-3, rel=1e-12)
    assert rec.lrs == pytest.approx([0.0, 5e-4, 1e-3, 1.5e-3, 2e-3], rel=1e-12)


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


# ------------------------------------------------------------------------- data order
def test_each_epoch_sees_every_example_once_and_seeds_give_different_orders(tmp_path, noise_npz, rec):
    steps = 3 * N_IMAGES // 8  # three epochs of batch 8
    train(config(noise_npz, steps=steps, seed=1), tmp_path / "a", progress=False)
    order_a = np.concatenate(rec.indices)
    rec.indices.clear()
    train(config(noise_npz, steps=steps, seed=2), tmp_path / "b", progress=False)
    order_b = np.concatenate(rec.indices)
    for order in (order_a, order_b):
        assert order.shape == (3 * N_IMAGES,)
        epochs = order.reshape(3, N_IMAGES)
        for e in epochs:
            assert sorted(e.tolist()) == list(range(N_IMAGES))
        assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert not np.array_equal(order_a, order_b)


def test_resume_keeps_the_data_order(tmp_path, noise_npz, rec):
    steps = 5  # 40 examples: the resume point (step 2) and the end straddle an epoch boundary
    train(config(noise_npz, steps=steps, seed=3), tmp_path / "straight", progress=False)
    straight = np.concatenate(rec.indices)
    rec.indices.clear()
    run = tmp_path / "cut"
    train(config(noise_npz, steps=2, seed=3, checkpoint_every=1), run, progress=False)
    train(config(noise_npz, steps=steps, seed=3), run, resume="auto", progress=False)
    np.testing.assert_array_equal(np.concatenate(rec.indices), straight)


# ------------------------------------------------------------------------- which weights go where
def test_grid_and_model_folder_hold_the_ema_model_raw_the_raw_weights(tmp_path, noise_npz, rec):
    """One update, so the EMA is known in closed form (decay w0 + (1 - decay) w1) and differs from
    w1; a grid mid-run (after step 1) and one at the end; training goes on in train mode."""
    from safetensors.torch import load_file

    c = config(noise_npz, steps=2, sample_every=1, num_samples=4, ema_decay=0.5, lr=1e-2)
    result = train(c, tmp_path, progress=False)
    assert len(rec.sampled) == 2 and all(not training for _, training in rec.sampled)
    assert rec.train_mode == [True, True]  # the step after the mid-run grid too
    assert result.model.training
    final_ema = {k: v.detach() for k, v in result.ema.state_dict().items()}
    raw = {k: v.detach() for k, v in result.model.state_dict().items()}
    grid_weights = rec.sampled[-1][0]
    assert any(not torch.equal(final_ema[k], raw[k]) for k in raw)
    for k in raw:
        assert torch.equal(grid_weights[k], final_ema[k]), k
    folder_ema = load_file(tmp_path / "model" / "model.safetensors")
    folder_raw = load_file(tmp_path / "model_raw" / "model.safetensors")
    for k in raw:
        assert torch.equal(folder_ema[k], final_ema[k].cpu()), k
        assert torch.equal(folder_raw[k], raw[k].cpu()), k
    # the EMA in closed form, from the weights the optimizer held (d = 0.5):
    # grid 1 = d w0 + (1 - d) w1, grid 2 = d grid1 + (1 - d) w2
    w0, w1 = named(result, rec.w0), named(result, rec.w_before[1])
    grid1 = rec.sampled[0][0]
    for k in w0:
        torch.testing.assert_close(grid1[k].double(), 0.5 * w0[k].double() + 0.5 * w1[k].double(),
                                   rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(grid_weights[k].double(), 0.5 * grid1[k].double() + 0.5 * raw[k].double(),
                                   rtol=0, atol=1e-6, msg=k)


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


# ------------------------------------------------------------------------- --keep-last
def test_cli_keep_last_keeps_that_many_newest_checkpoints(tmp_path, noise_npz):
    from ddpmkit.cli import main

    run = tmp_path / "run"
    sets = {"data": str(noise_npz), "unet.ch": "32", "unet.ch_mult": "1", "unet.num_res_blocks": "1",
            "unet.attn_resolutions": "", "diffusion.num_timesteps": "20", "batch_size": "8",
            "num_samples": "0"}
    argv = ["train", "-o", str(run), "--no-progress", "--steps", "5", "--checkpoint-every", "1",
            "--keep-last", "2", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    assert main(argv) == 0
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-000000004", "step-000000005"]
    assert ckpt.latest_checkpoint(run).name == "step-000000005"
