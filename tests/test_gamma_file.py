"""Analytic-DPM's Gamma_t kept beside the model: written once, reused while the weights and the
settings match, recomputed when the weights change; and the samplers that need it, end to end."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from ddpmkit import analytic
from ddpmkit.cli import main
from ddpmkit.gamma_file import GAMMA_NAME
from ddpmkit.models import load_model
from ddpmkit.nn.folder import weights_sha256


@pytest.fixture
def model(tmp_path, tiny_model_dir):
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)
    return path


def _sample(model, out, *extra):
    return main(["sample", str(model), "--n", "2", "--output-dir", str(out), "--gamma-data", "digits",
                 "--gamma-samples", "8", *extra])


def test_gamma_is_estimated_once_and_again_when_the_weights_change(model, tmp_path, monkeypatch):
    calls = []
    real = analytic.estimate_gamma
    monkeypatch.setattr("ddpmkit.gamma_file.estimate_gamma", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _sample(model, tmp_path / "a", "--sampler", "analytic-ddpm", "--steps", "3") == 0
    stored = model / GAMMA_NAME
    first = stored.read_bytes()
    with safe_open(str(stored), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("mean").shape == (f.get_tensor("stderr").shape[0],)
    assert meta["num_samples"] == "8" and meta["data"] == "digits" and len(calls) == 1
    assert _sample(model, tmp_path / "b", "--sampler", "analytic-ddim", "--steps", "3") == 0
    assert len(calls) == 1 and stored.read_bytes() == first  # same weights and settings: reused
    loaded = load_model(model)
    net = loaded.unet
    assert meta["weights_sha256"] == weights_sha256(net)
    with torch.no_grad():
        next(net.parameters()).add_(0.01)
    net.save(model, diffusion=loaded.diffusion)
    assert _sample(model, tmp_path / "c", "--sampler", "analytic-ddpm", "--steps", "3") == 0
    assert len(calls) == 2 and stored.read_bytes() != first  # new weights: estimated again


def test_a_model_folder_needs_the_gamma_data(model, tmp_path, capsys):
    rc = main(["sample", str(model), "--n", "2", "--output-dir", str(tmp_path / "x"), "--sampler",
               "analytic-ddpm", "--steps", "3"])
    assert rc == 2
    assert "pass --gamma-data SRC" in capsys.readouterr().err


def test_dpm_solver_and_quad_from_the_command_line(model, tmp_path):
    assert _sample(model, tmp_path / "d", "--sampler", "dpm-solver++", "--steps", "4") == 0
    assert _sample(model, tmp_path / "q", "--sampler", "ddim", "--timesteps", "quad4") == 0
    assert len(list((tmp_path / "d").glob("*.png"))) == 3  # two samples and the grid
