"""The random streams: every stream from a user's seed, and the one draw of N(0, I) from them.

Every random stream of ddpmkit comes from a user's seed in one way: numpy's ``SeedSequence`` hash of
(seed, *keys). Nearby seeds and keys give unrelated streams, and a stream never depends on which
other streams were drawn first (so a resumed run, a sharded sampler or a bits/dim evaluation on a
GPU gets the numbers of a straight CPU run).

    seed_sequence(seed, *keys) -> np.random.SeedSequence    (numpy generators: the data order)
    derive_seed(seed, *keys)   -> int in [0, 2**63)         (torch generators)
    derived_generator(seed, *keys) -> torch.Generator       (on the CPU, seeded by derive_seed)
    sample_generators(seed, indices) -> [torch.Generator]  (sample i's stream: (SAMPLES, i))
    draw_standard_normal(shape, generators, ...) -> eps    (the one draw: losses, bits/dim, samplers)

The first key names the stream (``Stream``). Training keeps the keys it always had, so runs made by
earlier versions resume with the same streams; the epoch's data order is keyed by the epoch alone.
A seed that feeds one stream of its own is used as it is, never combined with anything: the
initial weights (``torch.manual_seed(seed)``), the digits classifier's recipe, a figure's pick of
images and its single bits/dim pass. tests/test_seeds.py refuses any other derivation in the source.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import numpy as np
import torch

from ddpmkit.checks import check_int

__all__ = [
    "Generators",
    "Stream",
    "clone_generator",
    "derive_seed",
    "derived_generator",
    "draw_standard_normal",
    "sample_generators",
    "sample_seed",
    "seed_sequence",
]

# None: torch's global RNG; one generator: the batch's noise at once; a sequence: one stream per sample
Generators = torch.Generator | Sequence[torch.Generator] | None


class Stream(IntEnum):
    """The first key of a derived stream: what the stream is for."""

    TRAINING_NOISE = 1  # the trainer's shared generator: flips, t and eps of each global batch
    LOADER = 2  # the DataLoader's own generator (worker seeds)
    SAMPLES = 3  # sample i's noise: (SAMPLES, i), whatever the batch it is drawn in
    BPD_BATCH = 4  # the bound's noise for evaluation batch b: (BPD_BATCH, b)
    INTERPOLATION = 5  # the encoder noise of interpolation pair b: (INTERPOLATION, b)
    SHARED_XT = 6  # Fig. 7: the draws from the chain's x_t at snapshot k: (SHARED_XT, k)
    BOOTSTRAP = 7  # the resampling of an FD interval: (BOOTSTRAP,)
    DROPOUT = 1000  # rank r's dropout: (DROPOUT + r); resumed on another world size: (DROPOUT + r, step)


def seed_sequence(seed: int, *keys: int) -> np.random.SeedSequence:
    """numpy's SeedSequence of (seed, *keys); every int must be >= 0 (else a ValueError)."""
    entropy = [check_int(seed, "seed", low=0)] + [check_int(k, "key", low=0) for k in keys]
    return np.random.SeedSequence(entropy)


def derive_seed(seed: int, *keys: int) -> int:
    """The 63-bit seed of stream (seed, *keys): the sequence's first 64-bit word, shifted right by one."""
    return int(seed_sequence(seed, *keys).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def derived_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by ``derive_seed(seed, *keys)`` (CPU: the same numbers on any device)."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


# ---------------------------------------------------------------------------------- sample streams
def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s noise stream: ``derive_seed(seed, Stream.SAMPLES, index)``, a
    63-bit hash, so nearby seeds and indices give unrelated streams."""
    return derive_seed(check_int(seed, "seed", low=0), Stream.SAMPLES, check_int(index, "index", low=0))


def sample_generators(seed: int, indices: Sequence[int] | range) -> list[torch.Generator]:
    """One CPU generator per sample index, seeded by ``sample_seed(seed, index)``."""
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


def clone_generator(g: torch.Generator) -> torch.Generator:
    """A generator on g's device in g's current state (the two then draw the same numbers)."""
    c = torch.Generator(device=g.device)
    c.set_state(g.get_state())
    return c


# ---------------------------------------------------------------------------------- the one draw
def draw_standard_normal(
    shape: Sequence[int],
    generator: Generators,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """eps ~ N(0, I) of ``shape`` (B, ...) on ``device``: the one noise stream of ddpmkit (training
    losses, bits/dim, every sampler).

    ``generator``: None (the global RNG of ``device``), a generator (drawn in float32 on its device,
    then moved, so a CPU generator gives the same numbers whatever device the model runs on), or B
    generators (sample b drawn from generator b, on its device, in float32).
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"expected one generator per sample ({shape[0]}), got {len(generator)}")
        z = torch.stack(
            [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        )  # (B, ...)
    return _to_device(z, device, dtype)


def _to_device(z: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Move CPU noise to ``device``; to a GPU through pinned memory, without waiting for it."""
    device = torch.device(device)
    if z.device.type == "cpu" and device.type == "cuda":
        return z.pin_memory().to(device=device, non_blocking=True).to(dtype)
    return z.to(device=device, dtype=dtype)
