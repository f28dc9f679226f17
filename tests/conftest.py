"""Fixtures shared by several test modules (pytest finds them here without an import)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stand_ins import TINY_T


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than several, and much faster on a busy machine.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    """The first 40 training digits as an npz data source (the trainer tests' tiny data set)."""
    import numpy as np

    from ddpmkit.data import load_digits_uint8

    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, load_digits_uint8("train")[0][:40])
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved 8x8 one-channel U-Net (32 channels, one level) with T = TINY_T, its weights moved
    away from the near-zero output init so that samples differ."""
    from ddpmkit.diffusion import DiffusionConfig
    from ddpmkit.nn import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(config=UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1,),
                                 num_res_blocks=1, attn_resolutions=()))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("model") / "tiny"
    net.save(path, diffusion=DiffusionConfig(num_timesteps=TINY_T, beta_start=0.01, beta_end=0.4))
    return path
