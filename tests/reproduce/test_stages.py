"""`ddpm reproduce digits`: the split, the near-copy statistic, and the report's provenance."""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given
from json_inputs import FAST, json_files, one_line

from ddpmkit.data import load_digits_uint8
from ddpmkit.reproduce import reproduce_digits
from ddpmkit.reproduce.findings import stat
from ddpmkit.reproduce.markdown import _n
from ddpmkit.reproduce.memorization import near_copy_fraction, near_copy_threshold, nearest_neighbours
from ddpmkit.reproduce.plan import VARIANTS, ReproduceSizes, digits_split
from ddpmkit.reproduce.stages import STAGE_SCHEMA, Stages, resolve_source
from ddpmkit.schema import problem

# Smaller than --quick: T = 10, 2 steps, a 32-channel U-Net; one seed (a few seconds of CPU).
TINY = ReproduceSizes(name="tiny", smoke=True, steps=2, num_timesteps=10, bpd_examples=4, bpd_batch=4,
                        t_chunk=5, num_samples=8, recon_examples=1, progressive_examples=1, unet_ch=32)


def test_split_is_fixed_and_disjoint():
    train_idx, test_idx = digits_split()
    assert set(train_idx.tolist()).isdisjoint(test_idx.tolist())
    assert sorted([*train_idx.tolist(), *test_idx.tolist()]) == list(range(1797))
    assert (train_idx.size, test_idx.size) == (1437, 360)
    all_images = load_digits_uint8("all")[0]
    np.testing.assert_array_equal(load_digits_uint8("train")[0], all_images[train_idx])  # what training reads
    np.testing.assert_array_equal(load_digits_uint8("test")[0], all_images[test_idx])  # what evaluation reads


def test_near_copy_fraction_hand_computed():
    reference = np.array([[0.0, 0.0], [10.0, 0.0]])
    queries = np.array([[0.0, 1.0], [10.0, 3.0], [5.0, 0.0], [9.0, 0.0]])  # NN distances 1, 3, 5, 1
    assert near_copy_fraction(queries, reference, 2.0) == 0.5
    assert near_copy_fraction(queries, reference, 1.0) == 0.0  # strictly closer than the threshold
    assert near_copy_fraction(queries, reference, 5.5) == 1.0
    d, idx = nearest_neighbours(queries, reference, 2)
    np.testing.assert_allclose(d[:, 0], [1, 3, 5, 1])
    assert idx[:, 0].tolist() == [0, 1, 0, 1]
    # leave-one-out distances of 0, 1, 5 on a line: 1, 1, 4; their median is 1
    assert near_copy_threshold(np.array([[0.0], [1.0], [5.0]]), quantile=0.5) == pytest.approx(1.0)


def test_stat_mean_spread_and_sources(tmp_path):
    stages = Stages(tmp_path, {}, resume=False, bar=_NoBar())
    for i, v in enumerate([1.0, 2.0, 4.0]):
        stages.run(f"s{i}", 1.0, lambda v=v: {"a": {"b": [0.0, v]}})
    st = stat(stages, ["s0", "s1", "s2"], "a.b.1")
    assert st["mean"] == pytest.approx(7 / 3)
    m = 7 / 3
    assert st["spread"] == pytest.approx(np.sqrt(((1 - m) ** 2 + (2 - m) ** 2 + (4 - m) ** 2) / 2))
    assert [resolve_source(tmp_path, s) for s in st["sources"]] == [1.0, 2.0, 4.0]
    assert stat(stages, ["s0"], "a.b.1")["spread"] is None


class _NoBar:
    def update(self, n):
        pass

    def set_description(self, s):
        pass


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    rep = reproduce_digits(out, seeds=1, sizes=TINY, progress=False)
    return out, rep


def _leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}.{i}")
    else:
        yield path, x


def _sourced(x):
    """Every dict in ``x`` that carries "values" and "sources"."""
    if isinstance(x, dict):
        if "sources" in x and "values" in x:
            yield x
        for v in x.values():
            yield from _sourced(v)
    elif isinstance(x, list):
        for v in x:
            yield from _sourced(v)


def test_report_structure(tiny_run):
    out, rep = tiny_run
    md = (out / "REPORT.md").read_text()
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(rep))
    assert "SMOKE RUN" in md
    for heading in ("## Table 2", "## Findings", "## Table 4 and Fig. 5", "## Fig. 6", "## Budget"):
        assert heading in md
    assert set(rep["variants"]) == {v.key for v in VARIANTS}
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / link).is_file(), link
    for name in ("table2_variants", "rate_distortion", "nearest_neighbours", "progressive_generation",
                 "reconstructions"):
        assert f"figures/{name}.png" in md
    assert len(rep["rate_distortion"]["table"]) == 10
    assert set(rep["budget"]["stages"]) == {p.stem for p in (out / "stages").glob("*.json")}


def test_every_number_is_traceable(tiny_run):
    """REPORT.md's table numbers are report.json's (as written by _n); report.json's measured
    numbers are the stage files' values; means are the means of those values."""
    out, rep = tiny_run
    written = {_n(v) for _, v in _leaves(rep) if isinstance(v, (int, float)) and not isinstance(v, bool)}
    written |= {_n(v) for _, v in _leaves(rep) if isinstance(v, str) and v.isdigit()}
    md = (out / "REPORT.md").read_text().splitlines()
    body = [ln for i, ln in enumerate(md) if ln.startswith("|") and i > 1 and md[i - 1].startswith("|")
            and not ln.startswith("|---")]
    assert len(body) >= 7 + 10 + 2
    numbers = [n for ln in body for cell in ln.split("|")[2:] for n in re.findall(r"-?\d[\d.e+-]*", cell)]
    assert numbers
    missing = [n for n in numbers if n not in written]
    assert not missing, missing[:10]
    count = 0
    for st in _sourced(rep):
        assert [resolve_source(out, s) for s in st["sources"]] == st["values"]
        assert st["mean"] == pytest.approx(np.mean(st["values"]))
        count += 1
    assert count >= 7 * 8 + 10 * 2


def test_resume_skips_finished_stages(tiny_run):
    out, rep = tiny_run
    before = {p.name: p.read_bytes() for p in (out / "stages").glob("*.json")}
    with pytest.raises(ValueError, match="--resume"):
        reproduce_digits(out, seeds=1, sizes=TINY, progress=False)
    again = reproduce_digits(out, seeds=1, sizes=TINY, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in (out / "stages").glob("*.json")} == before
    assert again["variants"] == rep["variants"]


@pytest.mark.slow
def test_quick_cli_end_to_end(tmp_path):
    from ddpmkit.cli import main

    assert main(["reproduce", "digits", "--quick", "--output-dir", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["sizes"]["smoke"] and rep["sizes"]["num_timesteps"] == 1000
    assert "SMOKE RUN" in (tmp_path / "REPORT.md").read_text()


def test_the_hybrid_is_not_said_to_be_in_the_papers_table2(tiny_run):
    out, _ = tiny_run
    line = next(ln for ln in (out / "REPORT.md").read_text().splitlines()
                if ln.startswith("- **Stability") and "hybrid" in ln)
    assert "not in the paper's Table 2" in line and "in the paper;" not in line
    assert "matches" not in line


def test_an_interrupted_run_is_continued_only_with_resume(tmp_path):
    ckpt = tmp_path / "runs" / "mu_bound_learned_s0" / "checkpoints" / "step-000000002"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="earlier run .*--resume"):
        reproduce_digits(tmp_path, seeds=1, sizes=TINY, progress=False)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["manifest.json"]
    assert not (tmp_path / "stages").exists()


def _stages(tmp_path, resume=True):
    return Stages(tmp_path, {"sizes": {"steps": 2}, "version": 1}, resume=resume, bar=_NoBar())


@pytest.mark.parametrize("torn", [b"", b'{"format": "ddpmkit.reproduce_stage", "sett', b"[1, 2]",
                                  b'{"settings": {"sizes": {"steps": 2}, "version": 1}}',
                                  b'{"settings": {"sizes": {"steps": 2}, "version": 1}, "result": 3}'])
def test_a_torn_stage_file_is_redone_with_a_warning(tmp_path, torn):
    _stages(tmp_path).run("a", 1.0, lambda: {"x": 1})
    path = tmp_path / "stages" / "a.json"
    path.write_bytes(torn)
    with pytest.warns(RuntimeWarning, match=f"{path}.*redone"):
        assert _stages(tmp_path).run("a", 1.0, lambda: {"x": 2}) == {"x": 2}
    assert json.loads(path.read_text())["result"] == {"x": 2}
    assert _stages(tmp_path).load("a") == {"x": 2}


def test_a_torn_stage_file_without_resume_is_still_refused(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "a.json").write_bytes(b"{")
    with pytest.raises(ValueError, match="--resume"):
        _stages(tmp_path, resume=False).run("a", 1.0, lambda: {"x": 2})


SETTINGS = {"sizes": {"steps": 2}, "version": 1}
INPUTS = {"model_sha256": "ab" * 32, "diffusion": {"num_timesteps": 10}}


def _made_stage() -> dict:
    """A stage file as ``Stages.run`` writes it."""
    with tempfile.TemporaryDirectory() as out:
        Stages(Path(out), SETTINGS, resume=True, bar=_NoBar()).run(
            "a", 1.0, lambda: {"bpd": 1.5, "per_t": [1.0, 2.0]}, inputs=lambda: INPUTS)
        return json.loads((Path(out) / "stages" / "a.json").read_text())


@FAST
@given(content=json_files(_made_stage()))
def test_a_stage_file_is_kept_redone_with_a_warning_or_refused_in_one_line(tmp_path_factory, content):
    """Whatever a stage file holds, a resumed run keeps it (only a file of the schema with these
    settings and inputs), redoes the stage with a warning naming the file (torn, or other inputs),
    or refuses in one line (a file of the schema made with other settings)."""
    out = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    path = out / "stages" / "a.json"
    path.parent.mkdir()
    path.write_bytes(content)
    try:
        saved = json.loads(content)
    except (ValueError, RecursionError):
        saved = None
    of_schema = isinstance(saved, dict) and problem(saved, STAGE_SCHEMA) is None
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            result = Stages(out, SETTINGS, resume=True, bar=_NoBar()).run("a", 1.0, lambda: {"fresh": True},
                                                                            inputs=lambda: INPUTS)
        except ValueError as e:
            event("refused")
            one_line(e)
            assert of_schema and saved["settings"] != SETTINGS and str(path) in str(e), e
            return
    if result == {"fresh": True}:
        event("redone")
        assert [str(path) in str(w.message) and "\n" not in str(w.message) for w in warned] == [True]
        assert Stages(out, SETTINGS, resume=True, bar=_NoBar()).load("a") == result
    else:
        event("kept")
        assert of_schema and saved["settings"] == SETTINGS and saved.get("inputs", {}) == INPUTS
        assert result == saved["result"] and not warned


def test_a_stage_is_recomputed_when_its_inputs_change(tmp_path):
    calls = []

    def work():
        calls.append(1)
        return {"n": len(calls)}

    assert _stages(tmp_path).run("e", 1.0, work, inputs=lambda: {"model_sha256": "aa"}) == {"n": 1}
    assert _stages(tmp_path).run("e", 1.0, work, inputs=lambda: {"model_sha256": "aa"}) == {"n": 1}
    with pytest.warns(RuntimeWarning, match="e.json.*model_sha256.*redone"):
        assert _stages(tmp_path).run("e", 1.0, work, inputs=lambda: {"model_sha256": "bb"}) == {"n": 2}
    saved = json.loads((tmp_path / "stages" / "e.json").read_text())
    assert saved["inputs"] == {"model_sha256": "bb"}


def test_every_evaluation_stage_records_the_weights_it_read(tmp_path):
    from ddpmkit.reproduce import reproduce_digits
    from ddpmkit.reproduce.plan import ReproduceSizes

    tiny = ReproduceSizes(name="tiny", smoke=True, steps=2, num_timesteps=10, bpd_examples=4, bpd_batch=4,
                          t_chunk=5, num_samples=8, recon_examples=1, progressive_examples=1, unet_ch=32)
    reproduce_digits(tmp_path, seeds=1, sizes=tiny, progress=False)
    files = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "stages").glob("*.json")}
    for name, d in files.items():
        if name.startswith(("eval_", "figures_")):
            assert len(d["inputs"]["model_sha256"]) == 64 and d["inputs"]["diffusion"]["num_timesteps"] > 1
        elif name.startswith("nn_"):
            assert len(d["inputs"]["samples_sha256"]) == 64
    assert sum(name.startswith("eval_") for name in files) == 7
