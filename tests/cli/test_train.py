"""`ddpm train`: its flags reach the config, its checkpoint pruning, its user errors."""

from __future__ import annotations

import json

import pytest

from ddpmkit import checkpoint as ckpt
from ddpmkit.cli import EXIT_USER_ERROR, build_parser, main
from ddpmkit.cli.train import resolve_config
from ddpmkit.config import LrSchedule, Tracker, TrainConfig, load_config, save_config


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


# ------------------------------------------------------------------------- config and CLI
def test_cli_flags_reach_the_config_and_round_trip_through_config_json(tmp_path):
    args = build_parser().parse_args(
        ["train", "--grad-accum", "4", "--lr-schedule", "cosine", "--lr-min", "1e-5", "--ema-warmup",
         "--ema-inv-gamma", "2", "--ema-power", "0.75", "--logger", "wandb"])
    c, _ = resolve_config(args)
    assert (c.grad_accum, c.lr_schedule, c.lr_min, c.logger) == (4, LrSchedule.COSINE, 1e-5, Tracker.WANDB)
    assert (c.ema_warmup, c.ema_inv_gamma, c.ema_power) == (True, 2.0, 0.75)
    assert load_config(save_config(c, tmp_path / "config.json")) == c
    assert json.loads((tmp_path / "config.json").read_text())["lr_schedule"] == "cosine"
    defaults = resolve_config(build_parser().parse_args(["train"]))[0]
    assert (defaults.grad_accum, defaults.lr_schedule, defaults.ema_warmup, defaults.logger) == \
        (1, LrSchedule.CONSTANT, False, Tracker.NONE)
    assert TrainConfig().ema_decay == 0.9999 and not TrainConfig().ema_warmup  # the paper's EMA


def test_cli_bad_grad_accum_exits_2(capsys):
    from ddpmkit.cli import main

    assert main(["train", "--grad-accum", "3", "--batch-size", "8", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "batch_size 8 must be divisible by grad_accum 3" in err and "Traceback" not in err


# ------------------------------------------------------------------------- 14: one-line worker errors
def test_a_data_error_in_a_loader_worker_is_one_line(tmp_path, capsys):
    from ddpmkit.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(b"not a png")
    args = ["train", "-o", str(tmp_path / "run"), "--data", str(images), "--no-progress", "--steps", "2",
            "--batch-size", "2", "--set", "unet.resolution=8", "--set", "unet.ch_mult=1"]
    assert main([*args, "--num-workers", "0"]) == 2
    plain = capsys.readouterr().err
    assert main([*args, "--num-workers", "1", "-o", str(tmp_path / "run1")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "worker" not in err, err
    assert err.split("error: ", 1)[1] == plain.split("error: ", 1)[1]


# ------------------------------------------------------------------------- sizes that cannot fit
@pytest.mark.parametrize("flags, words", [
    (["--set", "unet.ch=100000"], ["UNetConfig.ch must be at most 16,384, got 100,000"]),
    (["--set", "unet.num_res_blocks=100000"], ["UNetConfig.num_res_blocks must be at most 64, got 100,000"]),
    (["--batch-size", "100000000"], ["GiB", "more than the"]),
])
def test_train_refuses_sizes_that_cannot_fit_before_allocating(tmp_path, capsys, flags, words):
    from ddpmkit.cli import main

    assert main(["train", "-o", str(tmp_path / "run"), "--no-progress", "--steps", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


def test_an_unknown_preset_is_one_line(capsys):
    assert main(["train", "--preset", "cifar"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == ("ddpm train: error: unknown preset 'cifar'; choose one of celebahq256, cifar10, digits, "
                   "lsun256\n")


def test_presets_are_case_insensitive(capsys):
    assert main(["train", "--preset", "CIFAR10", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == "cifar10"
