"""Packaging facts a user meets: one version source, the license, links that work on PyPI, and
`ddpm train` without the [digits] extra naming exactly what to add."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import ddpmkit

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_has_one_source() -> None:
    meta = _pyproject()
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ddpmkit.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", ddpmkit.__version__)


def test_license_is_an_spdx_string_with_its_file() -> None:
    meta = _pyproject()["project"]
    assert meta["license"] == "MIT" and meta["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert {"Homepage", "Repository", "Issues"} <= set(meta["urls"])


def test_readme_links_are_relative_and_resolve() -> None:
    # absolute github.com URLs would point at a repository not known to exist
    links = re.findall(r"\]\(([^)]+)\)", (ROOT / "README.md").read_text())
    assert not [u for u in links if "github.com/ddpmkit" in u]
    local = [u for u in links if not u.startswith(("https://", "http://", "#"))]
    assert local and all((ROOT / u.split("#")[0]).exists() for u in local), local


def test_docs_index_links_every_page_and_each_links_back() -> None:
    docs = ROOT / "docs"
    index = (docs / "README.md").read_text()
    pages = sorted(p.relative_to(docs).as_posix() for p in docs.glob("*.md") if p.name != "README.md")
    assert all(f"]({p})" in index for p in pages), pages
    own = ("training.md", "reproduce_cifar10_fid.md")  # architecture.md and math.md: the lead's
    assert all("](README.md)" in (docs / p).read_text() for p in own)


def test_no_extra_pulls_torchvision() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    pulls = {"torch-fidelity", "torchvision", "denoising-diffusion-pytorch", "pytorch-fid"}
    for name, reqs in extras.items():
        bad = [r for r in reqs if re.split(r"[<>=!~ ;\[]", r)[0].lower() in pulls]
        assert not bad, (name, bad)


def test_train_without_scikit_learn_names_the_extra(tmp_path, monkeypatch, capsys) -> None:
    from ddpmkit.cli import main

    monkeypatch.setitem(sys.modules, "sklearn", None)  # as after a plain `pip install ddpmkit`
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["train", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'ddpmkit[digits]'" in err[0], err
