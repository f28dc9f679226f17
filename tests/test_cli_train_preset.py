"""`ddpm train --preset`: any case; an unknown name is one line and exit 2."""

from __future__ import annotations

import json

from ddpmkit.cli import EXIT_USER_ERROR, main


def test_an_unknown_preset_is_one_line(capsys):
    assert main(["train", "--preset", "cifar"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == ("ddpm train: error: unknown preset 'cifar'; choose one of celebahq256, cifar10, digits, "
                   "lsun256\n")


def test_presets_are_case_insensitive(capsys):
    assert main(["train", "--preset", "CIFAR10", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == "cifar10"
