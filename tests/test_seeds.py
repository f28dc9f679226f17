"""Every random stream is derived from a user's seed one way (ddpmkit.seeds).

The expected seeds are written here with numpy directly, from the formula the module documents
(SeedSequence([seed, *keys]), first 64-bit word >> 1), and the training streams are pinned to the
keys earlier versions used, so a run made before this module existed resumes with the same streams.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpmkit
from ddpmkit.config import apply_overrides, train_preset
from ddpmkit.distributed import DistInfo
from ddpmkit.seeds import (
    Stream,
    derive_seed,
    derived_generator,
    draw_standard_normal,
    sample_generators,
    sample_seed,
    seed_sequence,
)

SRC = Path(ddpmkit.__file__).parent


DERIVERS = {"derive_seed", "sample_seed"}


def documented(seed: int, *keys: int) -> int:
    """The module's documented formula, written out with numpy alone."""
    word = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return int(word) >> 1


def test_derive_seed_is_the_documented_hash():
    for seed, keys in [(0, (1,)), (7, (3, 0)), (2**40 + 3, (4, 12345)), (2**64 - 1, (1000,))]:
        assert derive_seed(seed, *keys) == documented(seed, *keys)
    assert derive_seed(0, 1) == 2918264622725855778  # a literal: a changed hash changes every run
    assert all(0 <= derive_seed(s, k) < 2**63 for s in range(50) for k in range(5))
    assert derived_generator(5, Stream.BPD_BATCH, 2).initial_seed() == documented(5, 4, 2)
    assert derived_generator(5, 4, 2).device.type == "cpu"


def test_stream_numbers_are_a_file_format():
    """Renumbering a stream changes the numbers every saved run and published table came from."""
    assert {s.name: int(s) for s in Stream} == {
        "TRAINING_NOISE": 1, "LOADER": 2, "SAMPLES": 3, "BPD_BATCH": 4, "INTERPOLATION": 5,
        "SHARED_XT": 6, "BOOTSTRAP": 7, "DROPOUT": 1000}


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_a_bad_seed_or_key_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        derive_seed(bad, 1)
    with pytest.raises(ValueError, match="key must be an int >= 0"):
        derive_seed(0, bad)


def test_sample_streams_are_apart_from_the_trainers():
    """Sample i's seed is (SAMPLES, i): never the trainer's stream (seed, i) of the same seed."""
    for seed in range(4):
        for i in range(3):
            assert sample_seed(seed, i) == documented(seed, 3, i)
            assert sample_seed(seed, i) != documented(seed, i)


def test_the_trainer_keeps_the_keys_of_earlier_versions(tiny_npz):
    from ddpmkit.training.data import epoch_permutation
    from ddpmkit.training.state import build_state

    c = apply_overrides(train_preset("digits"), {"data": str(tiny_npz), "unet.ch": "32", "unet.ch_mult": "1",
                                                 "unet.num_res_blocks": "1", "unet.attn_resolutions": "",
                                                 "seed": "11"})
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    state = build_state(c, info)
    assert state.generator.initial_seed() == documented(11, 1)  # flips, t and eps
    assert torch.initial_seed() == documented(11, 1000)  # rank 0's dropout
    for epoch in range(3):  # the data order: numpy's default_rng([seed, epoch])
        np.testing.assert_array_equal(epoch_permutation(11, epoch, 50),
                                      np.random.default_rng([11, epoch]).permutation(50))
    assert seed_sequence(11, 2).entropy == [11, 2]


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "attr", None) == name or getattr(n.func, "id", None) == name)]


def test_no_module_derives_a_seed_another_way():
    """Outside ddpmkit/seeds.py: no SeedSequence, no default_rng of a key list, and no generator
    seeded from arithmetic on a seed (``seed * 1_000_003 + b``, ``seed + 1 + k``)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "seeds.py" and path.parent == SRC:
            continue
        text = path.read_text()
        tree = ast.parse(text)
        where = path.relative_to(SRC)
        if "SeedSequence" in text:
            offenders.append(f"{where}: SeedSequence")
        for call in _calls(tree, "default_rng"):
            if call.args and isinstance(call.args[0], (ast.List, ast.Tuple)):
                offenders.append(f"{where}:{call.lineno}: default_rng of a key list")
        for fn in ("manual_seed", "sample_generators"):
            for call in _calls(tree, fn):
                arg = call.args[0] if call.args else None
                if isinstance(arg, ast.Call) and getattr(arg.func, "id", None) in DERIVERS:
                    continue  # arithmetic on a key inside derive_seed(...) is a key, not a derivation
                if arg is not None and any(isinstance(n, ast.BinOp) for n in ast.walk(arg)):
                    offenders.append(f"{where}:{call.lineno}: {fn} of arithmetic on a seed")
    assert not offenders, offenders


def test_draw_is_the_cpu_stream_in_float32_moved_to_the_device():
    expected = torch.randn((2, 3), generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    got = draw_standard_normal((2, 3), torch.Generator().manual_seed(7), device=torch.device("cpu"),
                               dtype=torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got, expected.double())
    g = torch.Generator().manual_seed(7)
    moved = draw_standard_normal((2, 3), g, device=torch.device("meta"), dtype=torch.float32)
    assert moved.device.type == "meta" and moved.shape == (2, 3)
    # the numbers were drawn from the CPU stream (which moved on), not on the target device
    ref = torch.Generator().manual_seed(7)
    torch.randn((2, 3), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_one_noise_helper_for_the_samplers_and_the_losses():
    """The samplers, the chains and the losses draw with seeds.draw_standard_normal, not a copy."""
    from ddpmkit import chains, diffusion, sampling

    assert sampling.draw_standard_normal is chains.draw_standard_normal is draw_standard_normal
    assert diffusion.draw_standard_normal is draw_standard_normal
    gens = sample_generators(3, range(2))
    z = draw_standard_normal((2, 3), gens, device=torch.device("cpu"), dtype=torch.float64)
    for b in range(2):
        want = torch.randn((3,), generator=sample_generators(3, [b])[0], dtype=torch.float32)
        assert torch.equal(z[b], want.double())
