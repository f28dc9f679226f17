"""Issue 17: what --resume reads is valid or torn-and-skipped with a warning naming the file; updates
with a non-finite result are skipped; a lock per run dir; published artefacts stay consistent."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_config

from ddpmkit import checkpoint as ckpt
from ddpmkit.train import train


@pytest.fixture(scope="module")
def finished_run(tiny_npz, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (keep_last 2), copied by each test that edits it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(tiny_npz, steps=4, checkpoint_every=2, keep_last=2), run, progress=False)
    return run


def _copy(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst / "run")
    return dst / "run"


def _resume(run: Path, tiny_npz: Path, steps: int = 4):
    c = tiny_config(tiny_npz, steps=steps, checkpoint_every=2, keep_last=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(c, run, resume="auto", progress=False)
    return result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------- 4: torn metrics line
def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, tiny_npz, finished_run):
    run = _copy(finished_run, tmp_path)
    (run / "checkpoints" / "step-000000004").rename(run / "checkpoints" / ".gone")  # resume from step 2
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a power cut mid-append
    result, warned = _resume(run, tiny_npz)
    assert result.exit_code == 0 and result.step == 4
    assert any("metrics.jsonl" in w and "line 5" in w for w in warned), warned
    assert _steps(run) == [1, 2, 3, 4]


# ------------------------------------------------------------------------- 5, 6, 7: torn checkpoints
def _corrupt_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


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


# ------------------------------------------------------------------------- 9: non-finite update results
def test_lr_inf_is_refused_up_front(tiny_npz):
    for lr in ("inf", "nan"):
        with pytest.raises(ValueError, match="lr must be"):
            tiny_config(tiny_npz, lr=lr)


def test_an_update_whose_result_is_non_finite_is_skipped_like_a_nan_loss(tmp_path, tiny_npz, monkeypatch):
    """Update 1 writes a NaN into one weight after Adam's step: the weights, the optimiser and the EMA
    must end exactly as in a run whose update 1 had a NaN loss (skipped)."""
    c = tiny_config(tiny_npz, steps=4, max_nonfinite=2)
    from test_train import inject_nonfinite

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
    from test_train import assert_states_equal, final_state

    assert_states_equal(final_state(tmp_path / "poison"), final_state(tmp_path / "ref"))


# ------------------------------------------------------------------------- 3, 10: one lock per run dir
_HOLDER = """
import sys, time
from ddpmkit.fileio import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_trainer_on_a_live_run_dir_is_refused_and_a_dead_holders_lock_is_stale(tmp_path, tiny_npz):
    import signal
    import socket
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        c = tiny_config(tiny_npz, steps=2)
        with pytest.raises(ValueError, match=f"in use by .*{holder.pid}@{socket.gethostname()}"):
            train(c, run, resume="auto", progress=False)
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (run / ".lock").read_text().startswith(f"{holder.pid}@")  # left behind by kill -9: stale
    assert train(c, run, resume="auto", progress=False).exit_code == 0


def test_an_unwritable_run_dir_is_a_one_line_error_before_any_work(tmp_path, tiny_npz, monkeypatch):
    import ddpmkit.train as train_module

    blocker = tmp_path / "a-file"  # a folder below a file cannot be created, not even by root
    blocker.write_text("")
    monkeypatch.setattr(train_module, "_build_run", None)  # building the run (data, model) must not start
    with pytest.raises(ValueError, match="cannot write to .*a-file/run"):
        train(tiny_config(tiny_npz, steps=2), blocker / "run", progress=False)


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


# ------------------------------------------------------------------------- 15: non-UTF-8 file names
def test_data_verify_reports_a_file_whose_name_is_not_utf8(tmp_path, monkeypatch):
    import io
    import sys

    from ddpmkit.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    Image.new("L", (8, 8)).save(folder / "good.png")
    with open(os.path.join(os.fsencode(folder), b"bad\xff.png"), "wb") as f:
        f.write(b"not a png")
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")  # a strict UTF-8 stdout
    monkeypatch.setattr(sys, "stdout", out)
    code = main(["data", "verify", str(folder), "--workers", "1"])
    out.flush()
    text = out.buffer.getvalue().decode("utf-8")
    assert code == 1, text
    assert "bad\\xff.png: " in text and "1 unreadable" in text


# ------------------------------------------------------------------------- 13: sizes that cannot fit
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


@pytest.mark.parametrize("key, value", [("resolution", 100000), ("num_timesteps", 10**9)])
def test_sample_refuses_a_model_config_that_cannot_fit(tmp_path, capsys, key, value):
    from ddpmkit.cli import main
    from ddpmkit.diffusion import DiffusionConfig
    from ddpmkit.nn import UNet, UNetConfig

    net = UNet(config=UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1,),
                                 num_res_blocks=1, attn_resolutions=()))
    net.save(tmp_path / "m", diffusion=DiffusionConfig(num_timesteps=10, beta_start=0.01, beta_end=0.4))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (cfg["diffusion"] if key == "num_timesteps" else cfg["unet"] if "unet" in cfg else cfg)[key] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert main(["sample", str(tmp_path / "m"), "--n", "1", "--output-dir", str(tmp_path / "s"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GiB" in err, err


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


def test_a_huge_num_timesteps_is_refused_before_the_schedule_is_built(monkeypatch):
    # T = 10^9 would allocate 8 GB in betas() alone; the refusal must come first.
    from ddpmkit.diffusion import DiffusionConfig

    def built(self):
        raise AssertionError("the schedule was built before the size check")

    monkeypatch.setattr(DiffusionConfig, "betas", built)
    expected = r"num_timesteps=1,000,000,000 needs at least ~\d.*GiB.*limit is 1,000,000"
    with pytest.raises(ValueError, match=expected):
        DiffusionConfig(num_timesteps=10**9)


def test_steps_below_the_checkpoint_says_there_is_nothing_to_train(tmp_path, tiny_npz, finished_run,
                                                                   capsys):
    run = _copy(finished_run, tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    result, _ = _resume(run, tiny_npz, steps=2)
    out = capsys.readouterr().out
    assert "the checkpoint is at step 4, past --steps 2: nothing to train" in out
    assert result.exit_code == 0 and result.step == 4
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert {k: v for k, v in after.items() if k.name != "config.json"} == \
        {k: v for k, v in before.items() if k.name != "config.json"}  # weights, checkpoints untouched


def test_ctrl_c_while_torch_loads_is_one_line_and_exit_130(monkeypatch, capsys):
    import subprocess
    import sys

    import ddpmkit.cli as cli

    # the console script's own import stays light: torch loads inside main(), under its handler
    code = "import sys, ddpmkit.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["train"]) == 130
    assert capsys.readouterr().err == "ddpm: interrupted\n"


# ------------------------------------------------------------------------- issue 27.10: strict reads
def _rehash(folder: Path, name: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": ckpt.hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_deeply_nested_manifest_or_metrics_line_is_torn(tmp_path, tiny_npz, finished_run):
    run = _copy(finished_run, tmp_path)
    (run / "checkpoints" / "step-000000004" / "manifest.json").write_text("[" * 100000)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[" * 100000 + "\n")
    result, warned = _resume(run, tiny_npz)
    assert result.exit_code == 0 and result.step == 4
    assert any("step-000000004/manifest.json" in w for w in warned), warned
    assert any("metrics.jsonl line 5" in w for w in warned), warned
    assert _steps(run) == [1, 2, 3, 4]


def _set(state: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        state = state[int(k)] if isinstance(state, list) else state[k]
    if isinstance(state, list):
        state[int(last)] = value
    else:
        state[last] = value


@pytest.mark.parametrize("key,value", [
    ("optimizer.param_groups.0.lr", "0.001"),
    ("optimizer.param_groups", [{}]),
    ("optimizer.param_groups.0.params", ["0"]),
    ("optimizer.scalars", {"x": {"step": 1}}),
    ("rng.rank0.numpy", ["MT19937", [1, 2, 3], 0, 0, 0.0]),
    ("rng.rank0.random", [3, [0] * 625, "x"]),
    ("rng.rank0", {}),
    ("rng", {}),
    ("config.lr", "0.001"),
    ("config.unet", 5),
    ("data.num_examples", "40"),
    ("world_size", 0),
    ("ema_n_averaged", 1.5),
    ("scaler", {"scale": "x"}),
    ("step", "4"),
])
def test_a_state_json_with_the_right_hash_but_wrong_types_is_torn(tmp_path, tiny_npz, finished_run, key,
                                                                   value):
    run = _copy(finished_run, tmp_path)
    folder = run / "checkpoints" / "step-000000004"
    state = json.loads((folder / "state.json").read_text())
    _set(state, key, value)
    (folder / "state.json").write_text(json.dumps(state))
    _rehash(folder, "state.json")
    result, warned = _resume(run, tiny_npz)
    assert result.exit_code == 0 and result.step == 4
    assert any("step-000000004/state.json" in w for w in warned), warned
    want = load_file(finished_run / "model" / "model.safetensors")  # redone from step 2: same weights
    got = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in want.items())


# ------------------------------------------------------------------------- issue 27.12: symlinked entries
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
