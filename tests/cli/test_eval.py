"""`ddpm eval bpd|fid|digits` and `ddpm report` end to end on tiny data (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.analytic import reverse_chain
from ddpmkit.cli import EXIT_USER_ERROR, main
from ddpmkit.data import load_digits_uint8, open_source
from ddpmkit.diffusion import DiffusionConfig
from ddpmkit.evaluate.bpd import evaluate_bpd
from ddpmkit.models import load_model
from ddpmkit.nn import UNet, UNetConfig
from ddpmkit.respace import parse_timesteps

TINY = UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1,
                  attn_resolutions=())


DIFF = DiffusionConfig(num_timesteps=10, beta_end=0.3)


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("DDPMKIT_INCEPTION_WEIGHTS", raising=False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "model"
    UNet(config=TINY).save(path, diffusion=DIFF.to_dict())
    return path


def test_eval_bpd_cli_matches_the_library_and_resumes(tiny_model, tmp_path, capsys):
    out = tmp_path / "bpd.json"
    argv = ["eval", "bpd", str(tiny_model), "--data", "digits", "--n", "6", "--batch-size", "4",
            "--t-chunk", "10", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert f"bits/dim {res['bpd']:.5f}" in printed and "L_T (prior)" in printed
    # the same numbers straight from the library, through the same loaded network
    from ddpmkit.models import load_model

    loaded = load_model(tiny_model)
    ds = open_source("digits", resolution=8, channels=1, split="test")
    with torch.inference_mode():
        lib = evaluate_bpd(loaded.unet, DIFF.build(), ds, n=6, batch_size=4, t_chunk=10)
    assert res["bpd"] == pytest.approx(lib["bpd"], rel=1e-6)
    assert res["prior_bpd"] + res["sum_kl_bpd"] + res["decoder_bpd"] == pytest.approx(res["bpd"], rel=1e-6)
    assert len(res["table4"]) == 10 and res["table4"][0]["reverse_time"] == 10
    assert res["num_examples"] == 6 and len(res["by_t"]["L"]) == 10
    # a rerun reads the two finished batches from the partial file instead of recomputing them
    partial = tmp_path / "bpd.partial.jsonl"
    lines = partial.read_text().splitlines()
    assert len(lines) == 3
    fake = json.loads(lines[1])
    fake["total_bpd"] = [100.0] * 4  # proves the rerun uses the file
    partial.write_text("\n".join([lines[0], json.dumps(fake), lines[2]]) + "\n")
    assert main(argv) == 0
    expected = (4 * 100.0 + sum(json.loads(lines[2])["total_bpd"])) / 6  # batch 0 faked, batch 1 as stored
    assert json.loads(out.read_text())["bpd"] == pytest.approx(expected, rel=1e-12)


def test_eval_digits_cli(tmp_path, capsys):
    test, _ = load_digits_uint8("test")
    np.savez(tmp_path / "s.npz", test[:40])
    assert main(["eval", "digits", str(tmp_path / "s.npz")]) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "eval_digits.json").read_text())
    assert res["kind"] == "digits" and res["n"] == 40
    assert res["fd"] == pytest.approx(res["real"]["fd"], rel=1e-6)  # the samples are those real digits
    assert "Frechet distance" in printed and f"{res['fd']:.4f}" in printed


def test_eval_fid_cli_offline_without_weights_says_what_to_fetch(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", np.zeros((10, 8, 8, 3), np.uint8))
    assert main(["eval", "fid", str(tmp_path / "s.npz"), "--ref", "digits"]) == 2
    err = capsys.readouterr().err
    assert "weights-inception-2015-12-05-6726825d.pth" in err and "https://github.com/toshas" in err
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in err
    assert len(err.strip().splitlines()) == 1


def test_eval_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    assert main(["eval", "digits", str(tmp_path / "bad.npz")]) == 2
    assert "not a readable .npz" in capsys.readouterr().err
    np.savez(tmp_path / "big.npz", np.zeros((5, 16, 16, 1), np.uint8))
    assert main(["eval", "digits", str(tmp_path / "big.npz")]) == 2
    assert "mismatched image sizes" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "digits", str(tmp_path / "empty")]) == 2
    assert "empty" in capsys.readouterr().err


def _fake_run(tmp_path, tiny_model_dir) -> tuple:
    run = tmp_path / "run"
    torch.manual_seed(1)
    unet = UNet(config=TINY)
    unet.save(run / "model", diffusion=DIFF.to_dict())
    (run / "config.json").write_text(json.dumps({"preset": "cifar10", "data": "cifar10", "batch_size": 128,
                                                 "steps": 800000}))
    recs = [{"step": s, "loss": 1.0 / s, "steps_per_s": sps, "img_per_s": sps * 128}
            for s, sps in [(100, 1.0), (200, 10.0), (300, 12.0), (400, 11.0)]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 5')
    (run / "samples").mkdir()
    for step in (100, 400):
        grid = np.full((10, 10, 3), step % 255, np.uint8)
        Image.fromarray(grid).save(run / "samples" / f"step-{step:09d}.png")
    (run / "eval_bpd.json").write_text(json.dumps({"kind": "bpd", "bpd": 3.8, "prior_bpd": 0.01,
                                                   "sum_kl_bpd": 1.8, "decoder_bpd": 1.99, "rate_bpd": 1.81,
                                                   "distortion_rmse": 0.97, "num_examples": 10000}))
    (run / "gen").mkdir()
    (run / "gen" / "eval_fid.json").write_text(json.dumps({"kind": "fid", "fid": 3.3, "is_mean": 9.3,
                                                           "is_std": 0.1, "num_samples": 50000,
                                                           "ref": "CIFAR-10 train", "warnings": []}))
    return run, sum(p.numel() for p in unet.parameters())


def test_report_card(tmp_path, tiny_model, capsys):
    run, params = _fake_run(tmp_path, tiny_model)
    assert main(["report", str(run)]) == 0
    rep = json.loads((run / "report" / "report.json").read_text())
    assert rep["params"] == params and rep["steps"] == 400 and rep["images_seen"] == 400 * 128
    assert rep["steps_per_s"] == 11.0  # median of the windows after the first (start-up) one
    assert rep["img_per_s"] == 11.0 * 128
    assert rep["evals"]["bpd"]["bpd"] == 3.8 and rep["evals"]["fid"]["fid"] == 3.3
    md = (run / "report" / "report.md").read_text()
    for text in (f"| parameters | {params:,} | 35,746,307 |",
                 "| FID (50000 samples vs CIFAR-10 train) | 3.3000 | 3.17 vs train set",
                 "| IS | 9.3000 | 9.46", "| steps/s (median) | 11.00 | 21.00 |", "| images seen | 51,200 | "
                 "102,400,000 |", "<= 3.75 test", "![samples](samples.png)", "![loss curve](loss_curve.png)"):
        assert text in md, text
    assert (run / "report" / "loss_curve.png").stat().st_size > 1000
    grid = np.asarray(Image.open(run / "report" / "samples.png"))
    assert grid[0, 0, 0] == 400 % 255  # the newest grid
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a training run directory" in capsys.readouterr().err


def test_eval_bpd_of_a_retrained_model_is_not_the_stale_number(tmp_path, capsys):
    """`ddpm train --resume auto` changes RUN/model; eval bpd into the same --out must not
    print the old number from the partial file (its header names the weights' SHA-256)."""
    from ddpmkit.nn.folder import weights_sha256

    model = tmp_path / "model"
    torch.manual_seed(0)
    UNet(config=TINY).save(model, diffusion=DIFF.to_dict())
    out = tmp_path / "bpd.json"
    argv = ["eval", "bpd", str(model), "--data", "digits", "--n", "4", "--batch-size", "4",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    first = json.loads(out.read_text())
    torch.manual_seed(1)
    net = UNet(config=TINY)
    net.save(model, diffusion=DIFF.to_dict())  # the same path, other weights
    assert first["settings"]["weights_sha256"] != weights_sha256(net)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings" in err and "weights_sha256" in err, err
    (tmp_path / "bpd.partial.jsonl").unlink()
    assert main(argv) == 0
    second = json.loads(out.read_text())
    assert second["settings"]["weights_sha256"] == weights_sha256(net) and second["bpd"] != first["bpd"]


@pytest.mark.parametrize("kind", ["digits", "fid", "bpd"])
def test_eval_with_an_unwritable_output_is_a_one_line_error_before_any_work(tmp_path, capsys, kind):
    from ddpmkit.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    first = {"digits": ["missing.npz"], "fid": ["missing.npz", "--ref", "missing-ref.npz"],
             "bpd": ["missing-model", "--data", "digits"]}[kind]
    assert main(["eval", kind, *first, "--out", str(blocker / "x" / "out.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to" in err, err  # not the missing input: checked first


def test_the_bound_of_a_respaced_chain_with_each_variance(tmp_path, tiny_model_dir, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    common = ["eval", "bpd", str(model), "--data", "digits", "--n", "8", "--batch-size", "8",
              "--timesteps", "4", "--gamma-data", "digits", "--gamma-samples", "8"]
    results = {}
    for var in ("fixedlarge", "fixedsmall", "analytic"):
        out = tmp_path / f"{var}.json"
        assert main([*common, "--variance", var, "--out", str(out)]) == 0
        results[var] = json.loads(out.read_text())
        assert results[var]["settings"]["variance"] == var
        T = load_model(model).diffusion.num_timesteps
        assert results[var]["settings"]["timesteps"] == parse_timesteps(T, 4)
    assert len({round(r["bpd"], 6) for r in results.values()}) == 3  # three different chains
    loaded = load_model(model)
    chain = reverse_chain(loaded.diffusion, results["fixedlarge"]["settings"]["timesteps"], "fixedlarge")
    x0 = open_source("digits", resolution=8, channels=1, split="test").get_batch(list(range(8)))
    from ddpmkit.evaluate.bpd import evaluate_bpd

    with torch.inference_mode():
        ref = evaluate_bpd(loaded.unet, chain, [x for x in x0], batch_size=8)
    assert abs(ref["bpd"] - results["fixedlarge"]["bpd"]) < 1e-9
    capsys.readouterr()
    assert main([*common, "--variance", "fixedsmall", "--out", str(tmp_path / "fixedlarge.json")]) == 2
    assert "other settings" in capsys.readouterr().err


def test_a_missing_torch_fidelity_is_named(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # importlib.util.find_spec -> None
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # no cached weights either
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["eval", "fid", str(samples), "--ref", str(samples)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "torch-fidelity package" in err and "pip install --no-deps" in err
    assert "weights" not in err.split("(")[0]


def test_eval_digits_of_a_sample_folder_records_its_model_and_samples(tiny_model_dir, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", str(tiny_model_dir), "--n", "2", "--output-dir", str(out), "--device", "cpu"]) == 0
    settings = json.loads((out / "sampling.json").read_text())
    for target in (out, next(out.glob("samples_*.npz"))):
        assert main(["eval", "digits", str(target), "--out", str(tmp_path / "e.json")]) == 0
        res = json.loads((tmp_path / "e.json").read_text())
        assert res["sampling"] == settings and len(res["sampling"]["model_sha256"]) == 64
        images = np.load(next(out.glob("samples_*.npz")))["arr_0"]
        assert res["samples_sha256"] == hashlib.sha256(images.tobytes()).hexdigest()


def test_eval_digits_of_a_bare_npz_has_no_sampling_settings(tmp_path):
    images = np.zeros((3, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "x.npz", arr_0=images)
    assert main(["eval", "digits", str(tmp_path / "x.npz")]) == 0
    res = json.loads((tmp_path / "eval_digits.json").read_text())
    assert res["sampling"] is None and res["samples_sha256"] == hashlib.sha256(images.tobytes()).hexdigest()
