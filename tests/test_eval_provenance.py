"""Issue 27.10: an eval_*.json of samples records which samples it scored (their SHA-256 as
evaluated) and, for a sample folder, the settings that made them (the model's weights hash)."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ddpmkit.cli import main


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
