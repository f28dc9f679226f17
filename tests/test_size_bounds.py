"""Issue 27.6: every size a file or a flag sets is bounded before anything is allocated or built:
one line, exit 2, in well under the seconds the build or the allocation would take."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from ddpmkit.cli import main
from ddpmkit.config import TrainConfig


def _one_line_fast(capsys, argv, *words):
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_a_model_folder_with_a_million_res_blocks_is_refused_at_once(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["unet"]["num_res_blocks"] = 10**6
    (model / "config.json").write_text(json.dumps(cfg))
    _one_line_fast(capsys, ["sample", str(model), "--n", "1", "--output-dir", str(tmp_path / "s"),
                            "--device", "cpu"], "num_res_blocks")


def test_a_diffusers_folder_with_a_million_layers_per_block_is_refused_at_once(tiny_model_dir, tmp_path,
                                                                                capsys):
    hf = tmp_path / "hf"
    assert main(["convert", "--to-diffusers", str(tiny_model_dir), "--out", str(hf)]) == 0
    capsys.readouterr()
    path = next(p for p in hf.rglob("config.json") if "layers_per_block" in p.read_text())
    cfg = json.loads(path.read_text())
    cfg["layers_per_block"] = 10**6
    path.write_text(json.dumps(cfg))
    _one_line_fast(capsys, ["sample", str(hf), "--n", "1", "--output-dir", str(tmp_path / "s"),
                            "--device", "cpu"], "num_res_blocks")


@pytest.mark.parametrize(("flag", "value", "key"), [
    ("--num-samples", "100000000", "num_samples"), ("--num-threads", "1000000000", "num_threads"),
    ("--num-threads", "100000000", "num_threads"), ("--num-workers", "1000000", "num_workers"),
])
def test_a_huge_train_flag_is_refused_before_training(tmp_path, capsys, flag, value, key):
    _one_line_fast(capsys, ["train", "--preset", "digits", "--steps", "1", flag, value, "--output-dir",
                            str(tmp_path / "r")], key)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("key", ["ch", "num_res_blocks"])
def test_unet_sizes_are_bounded(key):
    from ddpmkit.nn import UNetConfig

    with pytest.raises(ValueError, match=key):
        UNetConfig(resolution=8, **{key: 2**20 * 32})
    with pytest.raises(ValueError, match="ch_mult"):
        UNetConfig(resolution=8, ch_mult=(1,) * 100)
    assert TrainConfig(num_threads=64, num_samples=1024).num_threads == 64
