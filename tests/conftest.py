"""Fixtures shared by several test modules (pytest finds them here without an import)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from stand_ins import LEGIBLE_T as T
from stand_ins import TINY_T
from tiny_runs import N_IMAGES, RES, Recorder, tiny_config

from ddpmkit.data.sources import ArrayImageDataset
from ddpmkit.diffusion import DiffusionConfig, GaussianDiffusion
from ddpmkit.nn import UNet, UNetConfig
from ddpmkit.train import train


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


@pytest.fixture(scope="module")
def noise_npz(tmp_path_factory) -> Path:
    """24 distinct uniform-noise 8x8 grey images: none is mirror-symmetric along either axis, so a
    seen image tells which flip (if any) was applied."""
    rng = np.random.default_rng(12)
    images = rng.integers(0, 256, (N_IMAGES, RES, RES, 1), dtype=np.uint8)
    for a in images:
        assert not np.array_equal(a, a[:, ::-1]) and not np.array_equal(a, a[::-1])
    path = tmp_path_factory.mktemp("data") / "noise.npz"
    np.savez(path, images)
    return path


@pytest.fixture
def rec(monkeypatch) -> Recorder:
    r = Recorder()
    adam = torch.optim.Adam

    class RecordingAdam(adam):
        def __init__(self, params, **kw):
            params = list(params)
            super().__init__(params, **kw)
            r.w0 = [p.detach().clone() for p in params]
            self._grads: list[torch.Tensor | None] = [None] * len(params)
            for i, p in enumerate(params):
                p.register_post_accumulate_grad_hook(
                    lambda p, i=i: self._grads.__setitem__(i, p.grad.clone()))

        def step(self, closure=None):
            g = self.param_groups[0]
            r.lrs.append(float(g["lr"]))
            r.groups.append({"betas": tuple(g["betas"]), "eps": g["eps"]})
            r.raw_grads.append(list(self._grads))
            r.step_grads.append([p.grad.clone() for p in g["params"]])
            r.w_before.append([p.detach().clone() for p in g["params"]])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)

    get_batch = ArrayImageDataset.get_batch

    def recording_get_batch(self, indices):
        out = get_batch(self, indices)
        r.indices.append(np.asarray(indices).copy())
        r.batches.append(out.clone())
        return out

    monkeypatch.setattr(ArrayImageDataset, "get_batch", recording_get_batch)

    losses = GaussianDiffusion.training_losses

    def recording_losses(self, model, x0, t, noise=None, **kw):
        out = losses(self, model, x0, t, noise, **kw)
        r.x0.append(x0.detach().clone())
        r.train_mode.append(model.training)
        r.losses.append((self, x0.detach().clone(), t.clone(), noise.clone(), out["loss"].detach().clone()))
        return out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", recording_losses)

    import ddpmkit.sampling

    sample = ddpmkit.sampling.sample_ancestral

    def recording_sample(net, *a, **kw):
        r.sampled.append(({k: v.detach().clone() for k, v in net.state_dict().items()}, net.training))
        return sample(net, *a, **kw)

    monkeypatch.setattr(ddpmkit.sampling, "sample_ancestral", recording_sample)
    return r


@pytest.fixture(scope="module")
def finished_run(tiny_npz, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (keep_last 2), copied by each test that edits it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(tiny_npz, steps=4, checkpoint_every=2, keep_last=2), run, progress=False)
    return run


# ------------------------------------------------------------------------- checkpoint manifests
@pytest.fixture(scope="module")
def run(tiny_npz, tmp_path_factory) -> Path:
    """A finished 2-step run with one checkpoint."""
    path = tmp_path_factory.mktemp("props") / "run"
    train(tiny_config(tiny_npz, steps=2, checkpoint_every=2), path, progress=False)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = UNet(config=UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1,),
                                 num_res_blocks=1, attn_resolutions=()))
    path = tmp_path_factory.mktemp("model") / "tiny"
    net.save(path, diffusion=DiffusionConfig(num_timesteps=T, beta_start=0.01, beta_end=0.4))
    return path


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(name, options)``: a real tmpfs mounted at tmp_path/name with the mount ``options``
    (e.g. "ro,size=1m", "size=2m"), unmounted afterwards; the test is skipped where mounting is not
    permitted (it needs root)."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        mnt = tmp_path / name
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
