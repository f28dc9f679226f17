"""Every random stream of ddpmkit comes from a user's seed in one way: numpy's ``SeedSequence`` hash of
(seed, *keys). Nearby seeds and keys give unrelated streams, and a stream never depends on which
other streams were drawn first (so a resumed run, a sharded sampler or a bits/dim evaluation on a
GPU gets the numbers of a straight CPU run).

    seed_sequence(seed, *keys) -> np.random.SeedSequence    (numpy generators: the data order)
    derive_seed(seed, *keys)   -> int in [0, 2**63)         (torch generators)
    derived_generator(seed, *keys) -> torch.Generator       (on the CPU, seeded by derive_seed)

The first key names the stream (``Stream``). Training keeps the keys it always had, so runs made by
earlier versions resume with the same streams; the epoch's data order is keyed by the epoch alone.
A seed that feeds one stream of its own is used as it is, never combined with anything: the
initial weights (``torch.manual_seed(seed)``), the digits classifier's recipe, a figure's pick of
images and its single bits/dim pass. tests/test_seeds.py refuses any other derivation in the source.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np
import torch

__all__ = ["Stream", "check_nonneg_int", "derive_seed", "derived_generator", "seed_sequence"]


class Stream(IntEnum):
    """The first key of a derived stream: what the stream is for."""

    TRAINING_NOISE = 1  # the trainer's shared generator: flips, t and eps of each global batch
    LOADER = 2  # the DataLoader's own generator (worker seeds)
    SAMPLES = 3  # sample i's noise: (SAMPLES, i), whatever the batch it is drawn in
    BPD_BATCH = 4  # the bound's noise for evaluation batch b: (BPD_BATCH, b)
    INTERPOLATION = 5  # the encoder noise of interpolation pair b: (INTERPOLATION, b)
    SHARED_XT = 6  # Fig. 7: the draws from the chain's x_t at snapshot k: (SHARED_XT, k)
    DROPOUT = 1000  # rank r's dropout: (DROPOUT + r); resumed on another world size: (DROPOUT + r, step)


def check_nonneg_int(value: Any, name: str) -> int:
    """``value`` as an int, or a ValueError naming it if it is not an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def seed_sequence(seed: int, *keys: int) -> np.random.SeedSequence:
    """numpy's SeedSequence of (seed, *keys); every int must be >= 0 (else a ValueError)."""
    entropy = [check_nonneg_int(seed, "seed")] + [check_nonneg_int(k, "key") for k in keys]
    return np.random.SeedSequence(entropy)


def derive_seed(seed: int, *keys: int) -> int:
    """The 63-bit seed of stream (seed, *keys): the sequence's first 64-bit word, shifted right by one."""
    return int(seed_sequence(seed, *keys).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def derived_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by ``derive_seed(seed, *keys)`` (CPU: the same numbers on any device)."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))
