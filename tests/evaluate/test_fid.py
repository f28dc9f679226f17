"""The FID/IS pipeline end to end with a small stand-in feature network (nothing is downloaded),
the Inception weights' lookup and hash check, and the errors for bad input."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from stand_ins import StandInFeatures

from ddpmkit.evaluate import fid as fidmod
from ddpmkit.evaluate.fid import FewSamplesWarning, compute_fid, load_samples
from ddpmkit.evaluate.frechet import inception_score
from ddpmkit.evaluate.inception import INCEPTION_URL, InceptionFeatures, find_inception_weights
from ddpmkit.images import to_uint8_nhwc


def StandIn() -> StandInFeatures:  # noqa: N802 - reads as the class it was
    return StandInFeatures(name="stand-in-v1", logit_scale=20.0)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached Inception weights
    monkeypatch.delenv("DDPMKIT_INCEPTION_WEIGHTS", raising=False)


def _images(n: int, seed: int, size: int = 8, c: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, c), dtype=np.uint8)


def _direct_fid(samples: np.ndarray, ref: np.ndarray) -> tuple[float, tuple[float, float]]:
    """All features at once, np.cov, scipy's sqrtm: the textbook computation."""
    net = StandIn()
    fs = net(torch.from_numpy(samples).permute(0, 3, 1, 2))
    fr = net(torch.from_numpy(ref).permute(0, 3, 1, 2))["pool"].numpy()
    a = fs["pool"].numpy()
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), fr.mean(0), np.cov(fr, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    return d, inception_score(fs["logits"], splits=10)


def test_fid_end_to_end_matches_the_direct_computation(tmp_path):
    samples, ref = _images(60, 1), _images(80, 2)
    ref[:40] //= 2  # make the two sets differ
    np.savez(tmp_path / "samples.npz", samples)
    np.savez(tmp_path / "ref.npz", ref)
    with pytest.warns(FewSamplesWarning, match="not comparable with the paper"):
        res = compute_fid(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), extractor=StandIn(),
                          batch_size=16)
    expected_fid, (is_mean, is_std) = _direct_fid(samples, ref)
    assert res["fid"] == pytest.approx(expected_fid, rel=1e-8)
    assert res["is_mean"] == pytest.approx(is_mean, rel=1e-10)
    assert res["is_std"] == pytest.approx(is_std, rel=1e-8)
    assert res["num_samples"] == 60 and res["num_ref"] == 80 and not res["ref_cached"]
    assert "not comparable with the paper" in res["warnings"][0]
    assert res["fid"] > 0.01  # the sets do differ


def test_fid_does_not_depend_on_batch_size_and_reference_is_cached(tmp_path):
    samples, ref = _images(50, 3), _images(70, 4)
    np.savez(tmp_path / "ref.npz", ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)
        results = [compute_fid(samples, str(tmp_path / "ref.npz"), extractor=StandIn(), batch_size=bs)
                   for bs in (1, 7, 50)]
    fids = [r["fid"] for r in results]
    assert max(fids) - min(fids) <= 1e-10 * fids[0]
    assert [r["ref_cached"] for r in results] == [False, True, True]  # computed once, then read
    assert len(list((tmp_path / "cache" / "fid_stats").glob("*.npz"))) == 1
    assert results[0]["is_mean"] == pytest.approx(results[2]["is_mean"], rel=1e-12)


def test_precomputed_reference_statistics(tmp_path):
    samples, ref = _images(30, 5), _images(40, 6)
    feats = StandIn()(torch.from_numpy(ref).permute(0, 3, 1, 2))["pool"].numpy()
    np.savez(tmp_path / "stats.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    np.savez(tmp_path / "ref.npz", ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)
        a = compute_fid(samples, str(tmp_path / "stats.npz"), extractor=StandIn())
        b = compute_fid(samples, str(tmp_path / "ref.npz"), extractor=StandIn())
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-9)


def test_float_samples_are_rounded_not_truncated(tmp_path):
    # (x + 1) * 127.5 = 10.7 and 200.5 - 1e-3: rounding gives 11 and 199/200, truncation 10 and 199
    vals = torch.tensor([10.7, 200.4, 0.2, 254.6], dtype=torch.float64) / 127.5 - 1.0
    x = vals.view(1, 1, 2, 2)
    a = to_uint8_nhwc(x)
    assert a.dtype == np.uint8 and a.shape == (1, 2, 2, 1)
    assert a.ravel().tolist() == [11, 200, 0, 255]
    # float samples go through the pipeline as their rounded uint8 version
    xs = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    u8 = ((xs + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    trunc = ((xs + 1) * 127.5).floor().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    assert (to_uint8_nhwc(xs) == u8).all() and not (u8 == trunc).all()
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, _images(30, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)
        f_float = compute_fid(xs, ref, extractor=StandIn(), use_cache=False)
        f_u8 = compute_fid(u8, ref, extractor=StandIn(), use_cache=False)
        f_trunc = compute_fid(trunc, ref, extractor=StandIn(), use_cache=False)
    assert f_float["fid"] == f_u8["fid"] and f_float["fid"] != f_trunc["fid"]


def test_image_folder_samples(tmp_path):
    imgs = _images(12, 8)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    np.testing.assert_array_equal(load_samples(folder), imgs)


def test_a_ddpm_sample_folder_counts_only_its_index_pngs(tmp_path):
    imgs = _images(5, 9)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / f"{i:06d}.png")
    Image.fromarray(_images(1, 0, size=24)[0]).save(tmp_path / "grid.png")  # another size
    (tmp_path / "sampling.json").write_text("{}")
    np.testing.assert_array_equal(load_samples(tmp_path), imgs)


def test_bad_input_gives_clear_errors(tmp_path):
    # mismatched image sizes: samples 8x8, reference 16x16
    np.savez(tmp_path / "ref16.npz", _images(10, 0, size=16))
    with pytest.raises(ValueError, match="mismatched image sizes"):
        compute_fid(_images(10, 1), str(tmp_path / "ref16.npz"), extractor=StandIn())
    # ... and within a sample folder
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(_images(1, 0)[0]).save(folder / "a.png")
    Image.fromarray(_images(1, 0, size=16)[0]).save(folder / "b.png")
    with pytest.raises(ValueError, match="mismatched image sizes"):
        load_samples(folder)
    # an empty sample set: an empty folder, an npz of zero images, an empty array
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_samples(tmp_path / "empty")
    np.savez(tmp_path / "zero.npz", np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no images"):
        load_samples(tmp_path / "zero.npz")
    with pytest.raises(ValueError, match="empty"):
        to_uint8_nhwc(np.zeros((0, 8, 8, 3), np.uint8))
    # a corrupt npz
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_samples(tmp_path / "bad.npz")
    # precomputed statistics of another feature network
    np.savez(tmp_path / "stats64.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="64 features, the feature network gives 12"):
        compute_fid(_images(10, 1), str(tmp_path / "stats64.npz"), extractor=StandIn())
    # a missing sample path
    with pytest.raises(ValueError, match="not found"):
        load_samples(tmp_path / "nope.npz")


def test_missing_inception_weights_offline_say_what_to_fetch_and_where(tmp_path):
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(ValueError) as err:
        find_inception_weights()
    msg = str(err.value)
    assert INCEPTION_URL in msg and str(expected) in msg
    assert not expected.exists()  # nothing was downloaded
    # the default extractor goes through the same check
    with pytest.raises(ValueError, match="Inception weights not found"):
        compute_fid(_images(10, 1), "digits", extractor=None)
    with pytest.raises(ValueError, match=str(tmp_path / "mine.pth")):
        find_inception_weights(tmp_path / "mine.pth")


def test_wrong_weights_file_fails_the_hash_check(tmp_path):
    bad = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    bad.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="has sha256"):
        find_inception_weights(bad)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                    reason="the optional [fid] dependency torch-fidelity is not installed")
def test_torch_fidelity_inception_architecture_with_random_weights(tmp_path):
    """The real TF-compatible network (random weights, hash given): eval mode, shapes, batching."""
    from ddpmkit.evaluate.inception import _torch_fidelity_inception_class, sha256_file

    cls = _torch_fidelity_inception_class()
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    orig_url, orig_load = fe.load_state_dict_from_url, cls.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: None
    cls.load_state_dict = lambda self, *a, **k: None
    try:
        torch.manual_seed(0)
        state = cls("random", ["2048"]).state_dict()
    finally:
        fe.load_state_dict_from_url, cls.load_state_dict = orig_url, orig_load
    path = tmp_path / "random-inception.pth"
    torch.save(state, path)
    net = InceptionFeatures(path, expected_sha256=sha256_file(path))
    net.train()
    assert not net.training and not net.net.training
    x = torch.from_numpy(_images(3, 0, size=32)).permute(0, 3, 1, 2)
    out = net(x)
    assert out["pool"].shape == (3, 2048) and out["logits"].shape == (3, 1008)
    one = torch.cat([net(x[i:i + 1])["pool"] for i in range(3)])
    torch.testing.assert_close(one, out["pool"], rtol=1e-5, atol=1e-6)
    gray = net(x[:, :1])["pool"]
    torch.testing.assert_close(gray, net(x[:, :1].expand(-1, 3, -1, -1))["pool"])
    assert fidmod.PAPER_NUM_SAMPLES == 50_000


@pytest.fixture
def _fresh_fidelity_modules():
    """torch_fidelity/torchvision removed from sys.modules for the test, restored after."""
    import sys

    prefixes = ("torch_fidelity", "torchvision")
    saved = {k: v for k, v in sys.modules.items() if k.startswith(prefixes)}
    for k in saved:
        del sys.modules[k]
    yield
    for k in [k for k in sys.modules if k.startswith(prefixes)]:
        del sys.modules[k]
    sys.modules.update(saved)


def _package(root, name, files):
    pkg = root / name
    pkg.mkdir(parents=True)
    for fname, text in files.items():
        (pkg / fname).write_text(text)


def test_a_broken_torchvision_is_worked_around(tmp_path, monkeypatch, _fresh_fidelity_modules):
    """torchvision built for another torch raises RuntimeError on import (not ModuleNotFoundError):
    the Inception module is still reached, without the package's __init__."""
    from ddpmkit.evaluate.inception import _torch_fidelity_inception_class

    _package(tmp_path, "torchvision", {"__init__.py": "raise RuntimeError('operator torchvision::nms does "
                                                      "not exist')\n"})
    _package(tmp_path, "torch_fidelity", {
        "__init__.py": "import torchvision\n",
        "feature_extractor_inceptionv3.py": "class FeatureExtractorInceptionV3:\n    pass\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = _torch_fidelity_inception_class()
    assert cls.__name__ == "FeatureExtractorInceptionV3" and cls.__module__.startswith("torch_fidelity")


def test_an_unimportable_torch_fidelity_is_one_line(tmp_path, monkeypatch, capsys, _fresh_fidelity_modules):
    from ddpmkit.cli import main
    from ddpmkit.evaluate.inception import _torch_fidelity_inception_class

    _package(tmp_path, "torch_fidelity", {
        "__init__.py": "raise ImportError('no torchvision')\n",
        "feature_extractor_inceptionv3.py": "from torch_fidelity.helpers import vassert\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot be imported \(ModuleNotFoundError: No module named "
                                         r"'torch_fidelity.helpers'\); reinstall it with pip install "
                                         r"--no-deps"):
        _torch_fidelity_inception_class()
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    np.savez(tmp_path / "s.npz", _images(10, 0))
    monkeypatch.setattr("ddpmkit.evaluate.inception.find_inception_weights", lambda *a, **k: weights)
    assert main(["eval", "fid", str(tmp_path / "s.npz"), "--ref", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reinstall it with pip install --no-deps" in err[0], err


def test_download_weights_offline_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import urllib.error

    from ddpmkit.cli import main

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    np.savez(tmp_path / "s.npz", _images(10, 0))
    assert main(["eval", "fid", str(tmp_path / "s.npz"), "--ref", "digits", "--download-weights"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "could not download the Inception weights" in err[0] and "name resolution" in err[0]
    assert "--inception-weights FILE" in err[0]
    with pytest.raises(ValueError, match="could not download"):
        find_inception_weights(download=True)
