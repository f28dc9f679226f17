"""`ddpm` itself: a light import, and Ctrl-C as one line and exit 130."""

from __future__ import annotations


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
