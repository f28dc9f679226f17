"""`ddpm eval fid` without torch-fidelity: the missing package is named, not the Inception weights."""

from __future__ import annotations

import sys

import numpy as np

from ddpmkit.cli import EXIT_USER_ERROR, main


def test_a_missing_torch_fidelity_is_named(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # importlib.util.find_spec -> None
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # no cached weights either
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["eval", "fid", str(samples), "--ref", str(samples)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "torch-fidelity package" in err and "pip install --no-deps" in err
    assert "weights" not in err.split("(")[0]
