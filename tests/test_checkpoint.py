"""Checkpoints: exact round trips, atomic writes, torn folders ignored, pruning, RNG and optimiser state."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from json_inputs import FAST, _paths, _replaced, json_bytes, json_values, one_line
from safetensors.torch import load_file
from tiny_runs import _copy, _corrupt_same_size, _rehash, _resume

from ddpmkit import checkpoint as ckpt
from ddpmkit.training import state as train_state


def _tensors(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"a.weight": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)},
        "ema": {"a.weight": torch.randn(3, 4, generator=g)},
        "rng": {"x": torch.arange(10, dtype=torch.uint8), "scalar": torch.tensor(3.5)},
    }


def test_round_trip_is_exact(tmp_path):
    t = _tensors()
    path = ckpt.save_checkpoint(tmp_path, 7, tensors=t, state={"hello": [1, 2.5, "x"]}, keep_last=3)
    assert path == tmp_path / "checkpoints" / "step-000000007"
    c = ckpt.load_checkpoint(path)
    assert c.step == 7 and c.state["hello"] == [1, 2.5, "x"]
    for group, flat in t.items():
        assert set(c.tensors[group]) == set(flat)
        for k, v in flat.items():
            assert torch.equal(c.tensors[group][k], v) and c.tensors[group][k].dtype == v.dtype
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "ema.safetensors", "rng.safetensors", "state.json"}
    assert ckpt.read_state(path)["step"] == 7


def test_keep_last_prunes_after_the_new_one_is_complete(tmp_path):
    for step in (1, 2, 3, 4, 5):
        ckpt.save_checkpoint(tmp_path, step, tensors=_tensors(step), state={}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000000004", "step-000000005"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000000005"


def test_torn_checkpoints_are_ignored(tmp_path):
    good = ckpt.save_checkpoint(tmp_path, 10, tensors=_tensors(), state={}, keep_last=5)
    root = tmp_path / "checkpoints"
    # a temp folder left by a kill mid-write; a newer step folder without manifest; one truncated
    (root / ".tmp-step-000000020-123").mkdir()
    (root / ".tmp-step-000000020-123" / "model.safetensors").write_bytes(b"partial")
    no_manifest = root / "step-000000030"
    no_manifest.mkdir()
    (no_manifest / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    truncated = ckpt.save_checkpoint(tmp_path, 40, tensors=_tensors(1), state={}, keep_last=5)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert not ckpt.is_complete(no_manifest) and not ckpt.is_complete(truncated)
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000000010"]
    with pytest.raises(ValueError, match="not a complete ddpmkit checkpoint"):
        ckpt.load_checkpoint(truncated)


def test_a_step_folder_that_is_a_symlink_is_ignored_and_never_pruned(tmp_path):
    """A complete checkpoint elsewhere, linked in as a newer step folder: not this run's, so it is
    neither resumed from nor pruned (nothing outside the run is deleted)."""
    good = ckpt.save_checkpoint(tmp_path / "run", 10, tensors=_tensors(), state={}, keep_last=1)
    other = ckpt.save_checkpoint(tmp_path / "elsewhere", 50, tensors=_tensors(2), state={}, keep_last=1)
    link = tmp_path / "run" / "checkpoints" / "step-000000050"
    link.symlink_to(other, target_is_directory=True)
    assert ckpt.latest_checkpoint(tmp_path / "run") == good
    ckpt.save_checkpoint(tmp_path / "run", 60, tensors=_tensors(3), state={}, keep_last=1)
    assert other.is_dir() and ckpt.is_complete(other) and link.is_symlink()
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-000000060"


def test_same_size_corruption_fails_the_sha256(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, tensors=_tensors(), state={}, keep_last=1)
    data = bytearray((path / "ema.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "ema.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        ckpt.load_checkpoint(path)


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
    x = torch.randn(16, 4)

    def step(n, o):
        o.zero_grad()
        n(x).square().mean().backward()
        o.step()

    for _ in range(3):
        step(net, opt)
    tensors, meta = ckpt.optimizer_state_to_tensors(opt.state_dict())
    path = ckpt.save_checkpoint(tmp_path, 3, tensors={"optimizer": tensors, "model": net.state_dict()},
                                state={"optimizer": meta}, keep_last=1)
    c = ckpt.load_checkpoint(path)
    net2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    net2.load_state_dict(c.tensors["model"])
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.5)
    opt2.load_state_dict(ckpt.optimizer_state_from_tensors(c.tensors["optimizer"], c.state["optimizer"]))
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.8, 0.99)
    for _ in range(2):
        step(net, opt)
        step(net2, opt2)
    for a, b in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_rng_states_round_trip(tmp_path):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.randn(3, generator=g)
    np.random.randn(3)  # an odd count leaves numpy with a cached gaussian
    tensors, meta = ckpt.capture_rng_state(g)
    path = ckpt.save_checkpoint(tmp_path, 1, tensors={"rng": tensors}, state={"rng": meta}, keep_last=1)

    def draws():
        return (torch.rand(4), torch.rand(4, generator=g), np.random.randn(3), random.random(),
                random.gauss(0, 1))

    expected = draws()
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    g.manual_seed(99)
    c = ckpt.load_checkpoint(path)
    ckpt.restore_rng_state(c.tensors["rng"], c.state["rng"], g)
    got = draws()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])
    assert got[3:] == expected[3:]


_WRITER = textwrap.dedent("""
    import sys, time, torch
    from ddpmkit import checkpoint as ckpt
    real = ckpt._write_synced
    def slow(path, data):
        entry = real(path, data)
        print("wrote", path.name, flush=True)
        time.sleep(60)  # the test kills us here, mid-checkpoint
        return entry
    ckpt._write_synced = slow
    tensors = {"model": {"w": torch.full((256, 256), 2.0)}, "ema": {"w": torch.full((256, 256), 3.0)}}
    ckpt.save_checkpoint(sys.argv[1], 2, tensors=tensors, state={}, keep_last=1)
""")


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    first = ckpt.save_checkpoint(tmp_path, 1, tensors=_tensors(), state={"ok": True}, keep_last=1)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("wrote"), line
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    torn = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-step-000000002")]
    assert len(torn) == 1 and (torn[0] / "model.safetensors").is_file()
    assert ckpt.latest_checkpoint(tmp_path) == first
    c = ckpt.load_checkpoint(first)
    assert c.state["ok"] is True and torch.equal(c.tensors["model"]["b"], _tensors()["model"]["b"])
    # the next save cleans the torn folder up and prunes the old one only once it is complete
    ckpt.save_checkpoint(tmp_path, 3, tensors=_tensors(3), state={}, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000003"]
    assert Path(ckpt.latest_checkpoint(tmp_path)).name == "step-000000003"


@pytest.mark.parametrize("name", ["ema.safetensors", "state.json"])
def test_a_same_size_corruption_of_the_newest_checkpoint_falls_back_to_the_older(tmp_path, tiny_npz,
                                                                                finished_run, name):
    run = _copy(finished_run, tmp_path)
    _corrupt_same_size(run / "checkpoints" / "step-000000004" / name)
    result, warned = _resume(run, tiny_npz)
    assert result.exit_code == 0 and result.step == 4
    assert any(f"step-000000004/{name}" in w for w in warned), warned
    want = load_file(finished_run / "model" / "model.safetensors")  # redone from step 2: same weights
    got = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in want.items())


@pytest.mark.parametrize("edit", [
    lambda m: m["files"].update({"model.safetensors": 7}),  # an entry that is not an object
    lambda m: m["files"].pop("model.safetensors"),  # a required file missing
    lambda m: m.update(files=[]),
    lambda m: m["files"]["state.json"].update(bytes="12"),
])
def test_a_manifest_of_the_wrong_shape_is_torn(tmp_path, tiny_npz, finished_run, edit):
    run = _copy(finished_run, tmp_path)
    path = run / "checkpoints" / "step-000000004" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    result, warned = _resume(run, tiny_npz)
    assert result.exit_code == 0 and result.step == 4
    assert any("step-000000004" in w for w in warned), warned


@pytest.mark.parametrize("name", ["../../../outside.bin", "/ABS/outside.bin", ".", "sub/x"])
def test_manifest_names_are_confined_to_the_checkpoint_folder(tmp_path, tiny_npz, finished_run, name):
    run = _copy(finished_run, tmp_path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    folder = run / "checkpoints" / "step-000000004"
    name = name.replace("/ABS", str(tmp_path))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": 6, "sha256": ckpt.hashlib.sha256(b"secret").hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert not ckpt.is_complete(folder)
    result, warned = _resume(run, tiny_npz)
    assert result.exit_code == 0 and any("step-000000004" in w for w in warned), warned


# ------------------------------------------------------------------------- symlinked entries
@pytest.mark.parametrize("target", ["/etc/passwd", "inside"])
def test_a_manifest_entry_that_is_a_symlink_is_torn(tmp_path, tiny_npz, finished_run, target):
    run = _copy(finished_run, tmp_path)
    folder = run / "checkpoints" / "step-000000004"
    if target == "inside":  # a link to a faithful copy of the file, outside the folder
        copy = tmp_path / "ema-copy.safetensors"
        (folder / "ema.safetensors").rename(copy)
        (folder / "ema.safetensors").symlink_to(copy)
    else:
        (folder / "passwd").symlink_to(target)
        _rehash(folder, "passwd")
    assert not ckpt.is_complete(folder)
    result, warned = _resume(run, tiny_npz)
    assert result.exit_code == 0 and result.step == 4
    assert any("step-000000004" in w and "not a regular file" in w for w in warned), warned


@FAST
@given(data=st.data())
def test_a_manifest_gives_a_reason_or_a_checkpoint(run, data):
    folder = ckpt.latest_checkpoint(run)
    original = json.loads((folder / ckpt.MANIFEST).read_text())
    where = data.draw(st.sampled_from(sorted(_paths(original), key=str)))
    edited = _replaced(original, where, data.draw(json_values))
    text = data.draw(st.one_of(st.just(json.dumps(edited).encode()), json_bytes))
    try:
        (folder / ckpt.MANIFEST).write_bytes(text)
        assert isinstance(ckpt.manifest_problem(folder) or "", str)
        try:
            c = train_state.load_resumable(folder)
        except ValueError as e:
            one_line(e)
        else:
            assert c.step == 2
    finally:
        (folder / ckpt.MANIFEST).write_text(json.dumps(original))
