"""ddpmkit's FID and IS end to end against ``torch_fidelity.calculate_metrics`` on the same images.

Both run the same deterministic stand-in feature network (the real Inception weights are not
downloaded in tests), registered with torch-fidelity as a feature extractor, so what is compared
is everything around the network: uint8 handling, batching, the statistics, the Frechet distance
and the Inception Score with and without torch-fidelity's shuffle.

torch-fidelity's package ``__init__`` imports torchvision, which cannot be installed next to the
pinned CPU torch (it pulls another torch). When torchvision is absent or broken, a stand-in module
is put in ``sys.modules`` while the test runs: it only satisfies the imports, and nothing in
``calculate_metrics`` with Dataset inputs and no resizing calls it (any attribute used would be
missing and fail the test). CI installs torch-fidelity with ``--no-deps`` (see ``.ci/run``) and
sets DDPMKIT_REQUIRE_FIDELITY=1, so there the test cannot skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch
from stand_ins import StandInFeatures

from ddpmkit.evaluate.fid import compute_fid

_PREFIXES = ("torch_fidelity", "torchvision")


def _stub_torchvision() -> dict[str, types.ModuleType]:
    tv = types.ModuleType("torchvision")
    tv.datasets = types.ModuleType("torchvision.datasets")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
    tv.models = types.ModuleType("torchvision.models")
    for name in ("CIFAR10", "CIFAR100", "STL10"):
        setattr(tv.datasets, name, type(name, (), {}))  # imported by name, never used
    return {"torchvision": tv, "torchvision.datasets": tv.datasets, "torchvision.transforms": tv.transforms,
            "torchvision.transforms.functional": tv.transforms.functional, "torchvision.models": tv.models}


@pytest.fixture
def torch_fidelity():
    """The full torch_fidelity package (its ``__init__`` run), torchvision stubbed if needed."""
    if importlib.util.find_spec("torch_fidelity") is None:
        if os.environ.get("DDPMKIT_REQUIRE_FIDELITY") == "1":
            pytest.fail("DDPMKIT_REQUIRE_FIDELITY=1 but torch-fidelity is not installed")
        pytest.skip("torch-fidelity is not installed (pip install --no-deps 'torch-fidelity>=0.3,<0.5')")
    saved = {k: v for k, v in sys.modules.items() if k.startswith(_PREFIXES)}
    for k in saved:
        del sys.modules[k]  # ddpmkit may have registered the package without its __init__
    try:
        try:
            importlib.import_module("torchvision")
        except Exception:  # noqa: BLE001 - absent, or built for another torch
            for k in [k for k in sys.modules if k.startswith("torchvision")]:
                del sys.modules[k]
            sys.modules.update(_stub_torchvision())
        yield importlib.import_module("torch_fidelity")
    finally:
        for k in [k for k in sys.modules if k.startswith(_PREFIXES)]:
            del sys.modules[k]
        sys.modules.update(saved)


def StandIn() -> StandInFeatures:  # noqa: N802 - reads as the class it was
    return StandInFeatures(name=STAND_IN_NAME, logit_scale=4.0)


STAND_IN_NAME = "stand-in-parity-v1"


def _register(tf) -> str:
    """The stand-in as a torch-fidelity feature extractor. Its features carry the names of
    torch-fidelity's Inception ("2048" for FID, "logits_unbiased" for IS), which torch-fidelity 0.3
    requests whatever the extractor."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class FidelityStandIn(tf.FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = StandIn()

        @staticmethod
        def get_provided_features_list():
            return "2048", "logits_unbiased"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"fid": "2048", "isc": "logits_unbiased"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x):
            out = self.net(x)
            return tuple(out[{"2048": "pool", "logits_unbiased": "logits"}[k]] for k in self.features_list)

    name = STAND_IN_NAME
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        tf.register_feature_extractor(name, FidelityStandIn)
    return name


class _Images(torch.utils.data.Dataset):
    """uint8 (N, H, W, C) -> items uint8 (C, H, W), torch-fidelity's input format."""

    def __init__(self, images: np.ndarray) -> None:
        self.x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


@pytest.mark.filterwarnings("ignore::ddpmkit.evaluate.fid.FewSamplesWarning")
def test_fid_and_is_equal_torch_fidelity_calculate_metrics(torch_fidelity, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (73, 8, 8, 3), dtype=np.uint8)
    ref = rng.integers(0, 256, (91, 8, 8, 3), dtype=np.uint8)
    ref[:50] //= 3  # the two sets differ
    np.savez(tmp_path / "ref.npz", ref)
    name = _register(torch_fidelity)
    common = dict(input1=_Images(samples), input2=_Images(ref), cuda=False, fid=True, isc=True,
                  feature_extractor=name, batch_size=16, cache=False, verbose=False, save_cpu_ram=True)
    theirs = torch_fidelity.calculate_metrics(**common)  # default: shuffled IS splits, seed 2020
    theirs_ordered = torch_fidelity.calculate_metrics(**common, samples_shuffle=False)
    ours = compute_fid(samples, str(tmp_path / "ref.npz"), extractor=StandIn(), batch_size=7,
                       use_cache=False)
    ours_shuffled = compute_fid(samples, str(tmp_path / "ref.npz"), extractor=StandIn(), batch_size=32,
                                use_cache=False, is_shuffle_seed=2020)

    assert ours["fid"] > 0.05  # a real difference, not two zeros
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)
    assert ours_shuffled["fid"] == pytest.approx(ours["fid"], rel=1e-12)
    # in order: ddpmkit's default = the original code = torch-fidelity with samples_shuffle=False
    assert ours["is_mean"] == pytest.approx(theirs_ordered["inception_score_mean"], rel=1e-12)
    assert ours["is_std"] == pytest.approx(theirs_ordered["inception_score_std"], rel=1e-9)
    # torch-fidelity's default shuffle, reproduced by is_shuffle_seed=2020
    assert ours_shuffled["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert ours_shuffled["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-9)
    # and the shuffle does change the std here, so the two checks above are not the same check
    assert abs(theirs["inception_score_std"] - theirs_ordered["inception_score_std"]) > 1e-4
