"""The data order and each rank's batch stream.

Epoch e is ``numpy.random.default_rng([seed, e]).permutation(N)``, and update s reads the global
positions [s * B, (s + 1) * B) of the concatenated epochs (``batch_indices``), so a run cut anywhere,
mid-epoch included, resumes on the same examples. Rank r of W takes the r-th slice of B / W.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddpmkit.config import TrainConfig
from ddpmkit.distributed import DistInfo
from ddpmkit.seeds import Stream, derived_generator, seed_sequence

__all__ = ["batch_indices", "batch_stream", "epoch_permutation"]


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The data order of ``epoch``: a permutation of range(N), a pure function of (seed, epoch)."""
    return _epoch_permutation(seed, epoch, num_examples).copy()


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng(seed_sequence(seed, epoch)).permutation(num_examples)


def batch_indices(step: int, *, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
    """Dataset indices of global batch ``step``: positions [step*B, (step+1)*B) of the epoch stream."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)  # (B,)
    epochs = pos // num_examples
    out = np.empty_like(pos)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _epoch_permutation(seed, int(e), num_examples)[pos[sel] % num_examples]
    return out


class _Batches(torch.utils.data.Dataset):
    """Adapts an ImageDataset so that one DataLoader item is one rank's batch: indices -> (b, C, H, W)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, indices: np.ndarray) -> torch.Tensor | _DataError:
        try:
            return self.dataset.get_batch(indices)
        except (ValueError, OSError) as e:  # a data error: sent back as such, re-raised as one line
            return _DataError(type(e).__name__, str(e))


@dataclass(frozen=True)
class _DataError:
    """A data error raised in a loader worker, carried to the main process (whose DataLoader would wrap
    the exception in a multi-line worker traceback)."""

    kind: str
    message: str

    def reraise(self) -> None:
        exc = {"FileNotFoundError": FileNotFoundError, "OSError": OSError}.get(self.kind, ValueError)
        raise exc(self.message)


def _unwrap(loader: Any) -> Iterator[torch.Tensor]:
    for item in loader:
        if isinstance(item, _DataError):
            item.reraise()
        yield item


class _RankBatchSampler(torch.utils.data.Sampler):
    """This rank's slice of global batch s, for s = start .. steps - 1, computed lazily."""

    def __init__(self, num_examples: int, config: TrainConfig, info: DistInfo, start: int) -> None:
        self.n, self.config, self.start = num_examples, config, start
        self.b = config.batch_size // info.world_size
        self.lo = info.rank * self.b

    def __len__(self) -> int:
        return max(0, self.config.steps - self.start)

    def __iter__(self) -> Iterator[np.ndarray]:
        c = self.config
        for s in range(self.start, c.steps):
            idx = batch_indices(s, batch_size=c.batch_size, num_examples=self.n, seed=c.seed)  # (B,)
            yield idx[self.lo:self.lo + self.b]


def batch_stream(dataset: Any, config: TrainConfig, info: DistInfo, start: int) -> Iterator[torch.Tensor]:
    """This rank's slice of each global batch from ``start`` on: (B / world, C, H, W)."""
    sampler = _RankBatchSampler(len(dataset), config, info, start)
    if config.num_workers == 0:
        return (dataset.get_batch(idx) for idx in sampler)
    loader = torch.utils.data.DataLoader(
        _Batches(dataset), sampler=sampler, batch_size=None, num_workers=config.num_workers,
        pin_memory=info.device.type == "cuda", prefetch_factor=4,
        generator=derived_generator(config.seed, Stream.LOADER),  # not torch's global RNG
    )
    return _unwrap(iter(loader))
