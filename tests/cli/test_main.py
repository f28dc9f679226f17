"""`ddpm` itself: a light import, and Ctrl-C as one line and exit 130."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from ddpmkit.cli import EXIT_USER_ERROR, main


def test_ctrl_c_while_torch_loads_is_one_line_and_exit_130(monkeypatch, capsys):
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


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no usage block
    return err


def test_an_abbreviated_option_is_refused(capsys, tmp_path):
    # with abbreviations on, --output-di was taken for --output-dir
    err = _error(capsys, ["train", "--steps", "5", "--output-di", str(tmp_path / "run"), "--print-config"])
    assert "unrecognized arguments: --output-di" in err


def test_a_mistyped_option_is_named_not_the_required_one(capsys):
    err = _error(capsys, ["eval", "bpd", "runs/x", "--dta", "digits"])
    assert "unrecognized argument --dta (did you mean --data?)" in err and "required" not in err


def test_every_subparser_refuses_abbreviations():
    from ddpmkit.cli import build_parser

    seen = []

    def walk(parser):
        seen.append(parser)
        assert parser.allow_abbrev is False, parser.prog
        for action in parser._actions:
            for sub in getattr(action, "choices", None) or {}:
                if isinstance(action.choices, dict):
                    walk(action.choices[sub])

    walk(build_parser())
    assert len(seen) > 10  # the commands and their kinds


TRAIN = ["train", "--set", "unet.ch=32", "--set", "unet.ch_mult=1", "--set", "unet.attn_resolutions=",
         "--set", "diffusion.num_timesteps=10", "--batch-size", "8", "--steps", "2", "--no-progress"]


@pytest.fixture
def read_only(tmpfs):
    """A real read-only filesystem (a tmpfs mounted ro): root's writes fail there with EROFS."""
    return tmpfs("ro", "ro,size=1m")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_npz):
    out = tmp_path_factory.mktemp("run") / "RUN"
    assert main([*TRAIN, "--data", str(tiny_npz), "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def digit_samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("samples") / "s.npz"
    np.savez(path, arr_0=np.zeros((4, 8, 8, 1), np.uint8))
    return path


def _one_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_eval_out_that_is_a_folder_fails_before_the_evaluation(digit_samples, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert main(["eval", "digits", str(digit_samples), "--out", str(tmp_path / "d")]) == 2
    _one_line(capsys, "is a folder")


def test_eval_out_on_a_read_only_filesystem(digit_samples, read_only, capsys):
    assert main(["eval", "digits", str(digit_samples), "--out", str(read_only / "e.json")]) == 2
    _one_line(capsys, str(read_only))


def test_report_out_on_a_read_only_filesystem(run, read_only, capsys):
    assert main(["report", str(run), "--out", str(read_only / "r")]) == 2
    _one_line(capsys, str(read_only))


def test_figure_out_on_a_read_only_filesystem_or_a_folder(run, read_only, tmp_path, capsys):
    assert main(["figure", "progressive", str(run), "--n", "1", "--out", str(read_only / "f.png"),
                 "--device", "cpu"]) == 2
    _one_line(capsys, str(read_only))
    argv = ["figure", "progressive", str(run), "--n", "1", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 2
    _one_line(capsys, "is a folder")


@pytest.mark.parametrize("way", ["--to-diffusers", "--from-diffusers"])
def test_convert_out_on_a_read_only_filesystem(run, read_only, tmp_path, capsys, way):
    src = run
    if way == "--from-diffusers":
        src = tmp_path / "hf"
        assert main(["convert", "--to-diffusers", str(run), "--out", str(src)]) == 0
        capsys.readouterr()
    assert main(["convert", way, str(src), "--out", str(read_only / "c")]) == 2
    _one_line(capsys, str(read_only))


def test_a_symlinked_model_folder_in_a_run_is_refused_before_training(tmp_path, tiny_npz, capsys):
    out = tmp_path / "RUN"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (out / "model").symlink_to(elsewhere)
    assert main([*TRAIN, "--data", str(tiny_npz), "--output-dir", str(out)]) == 2
    _one_line(capsys, "symlink", "model")
    assert (elsewhere / "keep.txt").read_text() == "mine"
    assert not (out / "checkpoints").exists()
