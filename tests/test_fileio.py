"""One home for atomic writes. Every file ddpmkit publishes (model folders, config.json,
metrics.jsonl's truncation, the diffusers export, images, charts, JSON results) goes through
``ddpmkit.fileio.atomic_write``; nothing else in the package renames a temp file into place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from json_inputs import FAST, json_bytes, one_line

import ddpmkit
from ddpmkit import fileio

SRC = Path(ddpmkit.__file__).parent


def test_no_module_re_rolls_an_atomic_write():
    pattern = re.compile(r"os\.replace\(|mkstemp\(|\.write_text\(|\.write_bytes\(|\bsave_file\("
                         r"|def atomic_write|open\([^)]*[\"']a[\"']\)")  # appends: append_line_synced
    found = [f"{p.relative_to(SRC)}:{n}: {line.strip()}"
             for p in sorted(SRC.rglob("*.py")) if p.name != "fileio.py"
             for n, line in enumerate(p.read_text().splitlines(), start=1) if pattern.search(line)]
    assert found == []


@pytest.fixture
def written(monkeypatch):
    """Names of the files renamed into place by fileio.atomic_write (the only os.replace, see above)."""
    import os

    paths: list[str] = []
    original = os.replace

    def recording(src, dst):
        assert Path(src).name.startswith(".tmp-") and Path(src).parent == Path(dst).parent
        paths.append(Path(dst).name)
        return original(src, dst)

    monkeypatch.setattr(fileio.os, "replace", recording)
    return paths


def _tiny_unet():
    from ddpmkit.nn import UNet, UNetConfig

    torch.manual_seed(0)
    return UNet(config=UNetConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1,
                                  attn_resolutions=(), dropout=0.0))


def test_model_folders_and_the_diffusers_export_are_written_atomically(tmp_path, written):
    from ddpmkit.diffusion import DiffusionConfig
    from ddpmkit.interop.diffusers import write_diffusers_folder

    net = _tiny_unet()
    net.save(tmp_path / "ours")
    assert sorted(written) == ["config.json", "model.safetensors"]
    written.clear()
    write_diffusers_folder(net, DiffusionConfig(num_timesteps=10), tmp_path / "hf")
    assert sorted(written) == ["config.json", "diffusion_pytorch_model.safetensors", "model_index.json",
                               "scheduler_config.json"]
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file left behind


def test_config_json_the_metrics_truncation_and_images_are_written_atomically(tmp_path, written):
    from ddpmkit.config import save_config, train_preset
    from ddpmkit.images import save_image_grid
    from ddpmkit.training.log import truncate_metrics

    save_config(train_preset("digits"), tmp_path / "config.json")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    truncate_metrics(tmp_path / "metrics.jsonl", 1)
    save_image_grid(np.zeros((4, 2, 2, 1), np.uint8), tmp_path / "grid.png", nrow=2)
    assert written == ["config.json", "metrics.jsonl", "grid.png"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_write_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "a.json"
    fileio.atomic_write_json(path, {"old": 1})

    def fails(f):
        f.write(b"{partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write(path, fails)
    assert fileio.read_json_object(path) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_conversion_cut_midway_leaves_no_output_folder_and_reruns(tmp_path, tiny_model_dir, monkeypatch):
    from ddpmkit.convert import convert_to_diffusers
    from ddpmkit.interop import diffusers as hf

    real = hf._write_json

    def fail_on_the_scheduler(path, data):
        if path.name == "scheduler_config.json":  # after the weights and the U-Net config
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(hf, "_write_json", fail_on_the_scheduler)
    out = tmp_path / "pipe"
    with pytest.raises(OSError, match="disk full"):
        convert_to_diffusers(tiny_model_dir, out)
    assert list(tmp_path.iterdir()) == []  # no half-written pipeline, no temporary folder
    monkeypatch.setattr(hf, "_write_json", real)
    convert_to_diffusers(tiny_model_dir, out)  # the rerun is not refused by leftovers
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors"]


def test_read_json_lines_marks_torn_lines_and_reads_no_file_as_empty(tmp_path):
    path = tmp_path / "m.jsonl"
    assert fileio.read_json_lines(path) == []
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo\n\xff\xfe\n[3]\n')
    got = fileio.read_json_lines(path)
    assert [v for _, v in got] == [{"step": 1}, None, None, [3]]
    assert got[1][0] == '{"step": 2, "lo'


def test_read_json_object_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="a.json: file not found"):
        fileio.read_json_object(tmp_path / "a.json")
    (tmp_path / "a.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match="a.json: not valid JSON"):
        fileio.read_json_object(tmp_path / "a.json")
    (tmp_path / "a.json").write_text("[1]")
    with pytest.raises(ValueError, match="a.json: expected a JSON object, got list"):
        fileio.read_json_object(tmp_path / "a.json")


def test_json_files_are_read_only_through_fileio():
    """One home for JSON I/O. Outside fileio.py no module parses a file's text
    with json.load / json.loads, or writes one with json.dump (only fileio's atomic writers)."""
    src = Path(ddpmkit.__file__).parent
    offenders = []
    for path in src.rglob("*.py"):
        if path.name == "fileio.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and getattr(node.func.value, "id", None) == "json"):
                continue
            if node.func.attr in ("load", "dump"):
                offenders.append(f"{path.relative_to(src)}:{node.lineno}: json.{node.func.attr}")
            elif node.func.attr == "loads" and any(
                    isinstance(n, ast.Attribute) and n.attr in ("read_text", "read_bytes")
                    for a in node.args for n in ast.walk(a)):
                offenders.append(f"{path.relative_to(src)}:{node.lineno}: json.loads of a file")
    assert not offenders, offenders


# ------------------------------------------------------------------------- lock symlinks
@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo", "folder"])
def test_a_lock_path_that_is_not_a_plain_file_is_refused_and_nothing_is_written(tmp_path, kind):
    import os

    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    lock = run / ".lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dangling symlink":
        lock.symlink_to(tmp_path / "created-through-the-link")
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    with pytest.raises(ValueError, match=r"\.lock is not a plain file") as err:
        fileio.RunLock(run).acquire()
    assert "\n" not in str(err.value)
    assert victim.read_text() == "keep me\n"
    assert not (tmp_path / "created-through-the-link").exists()


def test_sample_and_resume_refuse_a_lock_symlink(tmp_path, tiny_model_dir, tiny_npz, capsys):
    from ddpmkit.cli import main

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "samples"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    assert main(["sample", str(tiny_model_dir), "--n", "2", "--output-dir", str(out)]) == 2
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    assert main(["train", "-o", str(run), "--data", str(tiny_npz), "--resume", "auto", "--steps", "1",
                 "--no-progress", "--set", "unet.ch_mult=1"]) == 2
    err = capsys.readouterr().err
    assert err.count(".lock is not a plain file") == 2, err
    assert victim.read_text() == "keep me\n"


# ------------------------------------------------------------------------- strict JSON
def test_deeply_nested_or_huge_json_is_a_value_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000)
    with pytest.raises(ValueError, match="deep.json: JSON nested deeper than"):
        fileio.read_json_object(path)
    path.write_text('{"a": ' * 100000 + "1" + "}" * 100000)
    with pytest.raises(ValueError, match="deep.json: JSON nested deeper than"):
        fileio.read_json_object(path)
    path.write_text('{"a": "' + "[" * 100000 + '"}')  # brackets inside a string do not nest
    assert fileio.read_json_object(path) == {"a": "[" * 100000}
    monkeypatch.setattr(fileio, "MAX_JSON_BYTES", 100)
    path.write_text('{"a": "' + "x" * 200 + '"}')
    with pytest.raises(ValueError, match="deep.json: .*more than the 100 accepted"):
        fileio.read_json_object(path)
    lines = tmp_path / "m.jsonl"
    lines.write_text('{"step": 1}\n' + "[" * 100000 + "\n")
    assert [v for _, v in fileio.read_json_lines(lines)] == [{"step": 1}, None]


# ------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmpfs):
    """A real 2 MiB filesystem (tmpfs), so that writes fail with ENOSPC."""
    return tmpfs("small", "size=2m")


def test_a_full_disk_is_one_line_exit_2_and_leaves_no_temporary_files(small_disk, capsys):
    from ddpmkit.cli import main

    run = small_disk / "run"
    argv = ["train", "--set", "unet.ch=32", "--set", "unet.ch_mult=1,1", "--set",
            "diffusion.num_timesteps=50", "--batch-size", "16", "--steps", "2", "--no-progress",
            "--output-dir", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left" in err.lower(), err
    assert [p for p in run.rglob(".tmp-*")] == []
    with pytest.raises(ValueError, match="(?i)no space left"):
        fileio.atomic_write_bytes(small_disk / "big.bin", b"\0" * (4 * 2**20))
    assert [p.name for p in small_disk.iterdir() if p.name.startswith(".tmp-")] == []
    assert not (small_disk / "big.bin").exists()


# ------------------------------------------------------------------------- the JSON reader (config.json)
@FAST
@given(data=json_bytes)
def test_read_json_object_is_a_dict_or_a_one_line_value_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "config.json"
    path.write_bytes(data)
    try:
        got = fileio.read_json_object(path)
    except ValueError as e:
        one_line(e)
        assert "config.json" in str(e)
    else:
        assert isinstance(got, dict)
