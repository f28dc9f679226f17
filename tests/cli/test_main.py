"""`ddpm` itself: a light import, and Ctrl-C as one line and exit 130."""

from __future__ import annotations

import pytest

from ddpmkit.cli import EXIT_USER_ERROR, main


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
