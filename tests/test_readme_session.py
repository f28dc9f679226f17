"""README's typical session, end to end, at tiny sizes: train, sample (into the run), evaluate the
samples, draw Fig. 6, and a report card that found the evaluation through the samples' provenance."""

from __future__ import annotations

import json

import pytest

from ddpmkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--set", "unet.ch=32", "--set", "unet.ch_mult=1,1", "--set", "diffusion.num_timesteps=50",
        "--batch-size", "16", "--steps", "30", "--no-progress"]


def test_the_typical_session_reaches_the_report_card(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY]) == 0
    assert main(["sample", "runs/digits", "--n", "16", "--sampler", "ddim", "--steps", "10"]) == 0
    samples = tmp_path / "runs" / "digits" / "samples" / "ddim-10"
    assert main(["eval", "digits", str(samples.relative_to(tmp_path))]) == 0
    assert main(["figure", "progressive", "runs/digits"]) == 0
    assert main(["report", "runs/digits"]) == 0
    capsys.readouterr()
    card = (tmp_path / "runs" / "digits" / "report" / "report.md").read_text()
    report = json.loads((tmp_path / "runs" / "digits" / "report" / "report.json").read_text())
    assert "digits Frechet distance (16 samples)" in card
    assert "`ddpm eval digits`" not in card  # not listed as missing
    assert report["evals"]["digits"]["file"].endswith("samples/ddim-10/eval_digits.json")


def test_evaluations_of_other_weights_are_not_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--steps", "2", "--output-dir", "a"]) == 0
    assert main(["train", *TINY, "--steps", "2", "--seed", "1", "--output-dir", "b"]) == 0
    assert main(["sample", "b", "--n", "4", "--sampler", "ddim", "--steps", "5"]) == 0
    assert main(["eval", "digits", "b/samples/ddim-5"]) == 0
    (tmp_path / "a" / "samples" / "x").mkdir(parents=True)
    for name in ("sampling.json", "eval_digits.json"):  # b's samples and their evaluation, copied into a
        src = tmp_path / "b" / "samples" / "ddim-5" / name
        (tmp_path / "a" / "samples" / "x" / name).write_bytes(src.read_bytes())
    assert main(["report", "a"]) == 0
    assert "digits" not in json.loads((tmp_path / "a" / "report" / "report.json").read_text())["evals"]
