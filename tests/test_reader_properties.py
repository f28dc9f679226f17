"""Issue 27.10: every reader of what resume and evaluation read back gives a valid result, a torn-skip
or a one-line ValueError, whatever the input: state.json, checkpoint manifests, metrics.jsonl lines,
bits/dim partial files, npz inputs and the JSON reader under config.json (property-based)."""

from __future__ import annotations

import copy
import io
import json
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_runs import tiny_config

from ddpmkit import checkpoint as ckpt
from ddpmkit import fileio
from ddpmkit.data import load_npz_uint8
from ddpmkit.distributed import DistInfo
from ddpmkit.evaluate.bpd import _record_problem, evaluate_bpd, summarize
from ddpmkit.train import train
from ddpmkit.training import state as train_state
from ddpmkit.training.log import truncate_metrics

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
json_bytes = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.integers(1, 3000).map(lambda d: b"[" * d + b"]" * d),
    st.integers(1, 3000).map(lambda d: b'{"a":' * d + b"1" + b"}" * d),
)


def _one_line(err: ValueError) -> None:
    assert "\n" not in str(err), str(err)


# ------------------------------------------------------------------------- the JSON reader (config.json)
@FAST
@given(data=json_bytes)
def test_read_json_object_is_a_dict_or_a_one_line_value_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "config.json"
    path.write_bytes(data)
    try:
        got = fileio.read_json_object(path)
    except ValueError as e:
        _one_line(e)
        assert "config.json" in str(e)
    else:
        assert isinstance(got, dict)


# ------------------------------------------------------------------------- checkpoint manifests
@pytest.fixture(scope="module")
def run(tiny_npz, tmp_path_factory) -> Path:
    """A finished 2-step run with one checkpoint."""
    path = tmp_path_factory.mktemp("props") / "run"
    train(tiny_config(tiny_npz, steps=2, checkpoint_every=2), path, progress=False)
    return path


def _paths(value, prefix=()):
    """Every key path into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list) and len(value) <= 8:  # the 624-word RNG lists: their container only
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replaced(value, path, new):
    if not path:
        return new
    out = copy.copy(value)
    out[path[0]] = _replaced(value[path[0]], path[1:], new)
    return out


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
            _one_line(e)
        else:
            assert c.step == 2
    finally:
        (folder / ckpt.MANIFEST).write_text(json.dumps(original))


# ------------------------------------------------------------------------- state.json
@pytest.fixture(scope="module")
def resumable(run, tiny_npz):
    """(the run's checkpoint, a built TrainState to restore it into)."""
    c = train_state.load_resumable(ckpt.latest_checkpoint(run))
    config = tiny_config(tiny_npz, steps=4, checkpoint_every=2)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return c, train_state.build_state(config, info), info


@FAST
@given(data=st.data())
def test_a_state_json_is_restored_or_torn(resumable, data):
    c, s, info = resumable
    where = data.draw(st.sampled_from(sorted(_paths(c.state), key=str)))
    state = _replaced(c.state, where, data.draw(json_values))
    edited = ckpt.Checkpoint(path=c.path, step=c.step, tensors=c.tensors, state=state)
    try:
        train_state.check_state(edited)
    except ValueError as e:  # torn: newest_resumable skips it with this message
        _one_line(e)
        assert "state.json" in str(e)
        return
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:  # it passed the check: restoring it gives a state or a one-line refusal, nothing else
        train_state.restore(s, edited, info, 40, log=lambda m: None, warn=lambda m: None).apply(s, info)
    except ValueError as e:
        _one_line(e)
    finally:
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])


# ------------------------------------------------------------------------- metrics.jsonl lines
@FAST
@given(lines=st.lists(st.one_of(json_bytes, st.integers(0, 9).map(lambda s: json.dumps({"step": s}).encode())
                                 ), max_size=6))
def test_metrics_lines_are_kept_or_dropped_with_a_warning(tmp_path_factory, lines):
    path = tmp_path_factory.getbasetemp() / "metrics.jsonl"
    path.write_bytes(b"".join(x.replace(b"\n", b" ") + b"\n" for x in lines))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        truncate_metrics(path, 5)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert type(record["step"]) is int and record["step"] <= 5


# ------------------------------------------------------------------------- bits/dim partial files
class _Zero(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """A finished 3-batch bits/dim partial file of 5 tiny examples, and how it was made."""
    from ddpmkit.diffusion import DiffusionConfig

    path = tmp_path_factory.mktemp("bpd") / "p.jsonl"
    x = torch.linspace(-1, 1, 5 * 4).reshape(5, 1, 2, 2)
    d = DiffusionConfig(num_timesteps=3).build()

    def run_it():
        return evaluate_bpd(_Zero(), d, list(x), batch_size=2, partial_path=path)
    return path, run_it, run_it()


@FAST
@given(data=st.data())
def test_a_bits_dim_partial_file_is_continued_redone_or_refused(partial, data):
    path, run_it, full = partial
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    k = data.draw(st.integers(0, len(lines) - 1))
    where = data.draw(st.sampled_from(sorted(_paths(lines[k]), key=str)))
    edited = [*lines[:k], _replaced(lines[k], where, data.draw(json_values)), *lines[k + 1:]]
    text = [json.dumps(x).encode() for x in edited]
    if data.draw(st.booleans()):
        text[k] = data.draw(json_bytes).replace(b"\n", b" ")
    path.write_bytes(b"\n".join(text) + b"\n")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = run_it()
    except ValueError as e:  # the header changed: the existing refusal
        _one_line(e)
        assert k == 0 and "other settings" in str(e)
    else:  # a record that fails the check is redone; one that passes it is used as it stands
        records = [json.loads(x) for x in path.read_text().splitlines()[1:]]
        assert [_record_problem(r, b, got["settings"]) for b, r in enumerate(records)] == [None] * 3
        assert {k: v for k, v in got.items() if k not in ("seconds", "settings")} == summarize(
            records, num_timesteps=3)
    finally:
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))


# ------------------------------------------------------------------------- npz inputs
def _npz(header: dict, data: bytes, name: str = "arr_0.npy") -> bytes:
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr(name, member.getvalue() + data)
    return out.getvalue()


shapes = st.lists(st.integers(0, 10**12) | st.integers(0, 4), min_size=0, max_size=5).map(tuple)
npz_files = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda shape, descr, data, name: _npz({"descr": descr, "fortran_order": False, "shape": shape},
                                                    data, name),
              shapes, st.sampled_from(["|u1", "<f4", "|b1", "<i8", "|O"]), st.binary(max_size=200),
              st.sampled_from(["arr_0.npy", "x.npy", "arr_0"])),
    st.builds(lambda n, c: _npz({"descr": "|u1", "fortran_order": False, "shape": (n, 2, 2, c)},
                                b"\7" * (n * 4 * c)), st.integers(0, 3), st.sampled_from([1, 2, 3])),
    st.builds(lambda n, h, c, data: _npz({"descr": "|u1", "fortran_order": False, "shape": (n, h, h, c)},
                                         data),
              st.integers(1, 10**13), st.integers(1, 8), st.sampled_from([1, 3]), st.binary(max_size=300)),
)


@FAST
@given(data=npz_files)
def test_an_npz_gives_images_or_a_one_line_value_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "x.npz"
    path.write_bytes(data)
    try:
        a = load_npz_uint8(path)
    except ValueError as e:
        _one_line(e)
        assert str(e).startswith(str(path))
    else:
        assert a.dtype == np.uint8 and a.ndim == 4 and a.shape[0] > 0 and a.shape[-1] in (1, 3)
