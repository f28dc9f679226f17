"""What a checkpoint holds of a run (training.state): the EMA warm-up decay, state.json read back."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from json_inputs import FAST, _paths, _replaced, json_values, one_line
from safetensors.torch import load_file
from tiny_runs import _copy, _rehash, _resume, _set, config, tiny_config

from ddpmkit import checkpoint as ckpt
from ddpmkit.distributed import DistInfo
from ddpmkit.training import state as train_state
from ddpmkit.training.state import ema_decay_at


# ------------------------------------------------------------------------- EMA warm-up
def test_ema_warmup_decay_is_diffusers_closed_form(noise_npz):
    c = config(noise_npz, ema_warmup="true", ema_decay=0.9999, ema_inv_gamma=1.0, ema_power=0.75)
    for s in (0, 1, 10, 1000, 10**6):
        want = min(0.9999, 1 - (1 + s) ** -0.75)
        assert ema_decay_at(c, s) == pytest.approx(want, rel=1e-12, abs=0), s
    assert ema_decay_at(c, 0) == 0.0 and ema_decay_at(c, 10**6) == 0.9999  # the cap
    c2 = dataclasses.replace(c, ema_inv_gamma=4.0, ema_power=2 / 3, ema_min_decay=0.1)
    assert ema_decay_at(c2, 0) == 0.1 and ema_decay_at(c2, 8) == pytest.approx(1 - 3 ** (-2 / 3), rel=1e-12)
    assert ema_decay_at(dataclasses.replace(c, ema_warmup=False), 0) == 0.9999  # off: the constant


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
        one_line(e)
        assert "state.json" in str(e)
        return
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:  # it passed the check: restoring it gives a state or a one-line refusal, nothing else
        train_state.restore(s, edited, info, 40, log=lambda m: None, warn=lambda m: None).apply(s, info)
    except ValueError as e:
        one_line(e)
    finally:
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
