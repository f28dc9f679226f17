"""ddpmkit.data: every source, the unreadable-file policy, the pixel conversions, `ddpm data verify`.

References are independent of the code under test: sklearn's digits arrays, images written by the
test with Pillow from known pixels, Pillow's documented integer luma formula, CIFAR-10 batches
assembled opcode by opcode in the Python 2 pickle format of the official archive.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from json_inputs import FAST, one_line
from PIL import Image

from ddpmkit.cli import main
from ddpmkit.data import (
    BadImageWarning,
    SourceKind,
    from_uint8_nhwc,
    inspect_source,
    load_digits_uint8,
    load_npz_uint8,
    open_source,
    random_horizontal_flip,
    verify_source,
)
from ddpmkit.data import cifar as cifar_mod
from ddpmkit.images import to_uint8_nhwc

NOT_ACCEPTED = "not an image of an accepted type (PNG, JPEG, BMP, GIF, WEBP, TIFF)"


def test_uint8_round_trip_is_exact_for_every_value():
    a = torch.arange(256, dtype=torch.uint8).reshape(1, 4, 64, 1).repeat(2, 1, 1, 3)  # (2, 4, 64, 3)
    x = from_uint8_nhwc(a)
    assert x.shape == (2, 3, 4, 64) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert np.array_equal(to_uint8_nhwc(x), a.numpy())
    assert np.array_equal(to_uint8_nhwc(from_uint8_nhwc(a.numpy())), a.numpy())  # numpy input too


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 7)  # (N=1, C=1, H=1, W=7)
    # (x + 1) * 127.5 = -127.5, 0, 63.75, 127.5, 191.25, 255, 510 -> clamp/round half to even
    assert to_uint8_nhwc(x).flatten().tolist() == [0, 0, 64, 128, 191, 255, 255]
    assert to_uint8_nhwc(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_from_uint8_rejects_other_dtypes():
    with pytest.raises(ValueError, match="uint8"):
        from_uint8_nhwc(np.zeros((1, 2, 2, 3), dtype=np.float32))


def test_random_horizontal_flip_draws_b_uniforms_from_the_generator():
    x = torch.randn(64, 2, 3, 5)
    y = random_horizontal_flip(x, generator=torch.Generator().manual_seed(7))
    flips = torch.rand(64, generator=torch.Generator().manual_seed(7)) < 0.5
    assert 10 < int(flips.sum()) < 54
    for i in range(64):
        assert torch.equal(y[i], x[i].flip(-1) if flips[i] else x[i])
    assert torch.equal(random_horizontal_flip(x, generator=torch.Generator().manual_seed(7)), y)


def test_digits_scaled_split_and_deterministic():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ref_u8 = np.floor(ref.images * 255 / 16 + 0.5)  # v * 255 / 16 is never k + 0.5 except v = 8
    ref_u8[ref.images == 8] = 128  # 127.5 -> 128 under either rounding rule
    train = open_source(None, resolution=8, channels=1)
    test = open_source("digits", resolution=8, channels=1, split="test")
    everything = open_source("DIGITS", resolution=8, channels=1, split="all")
    assert (len(train), len(test), len(everything)) == (1437, 360, 1797)
    assert train.kind is SourceKind.DIGITS and train.image_shape == (1, 8, 8)
    all_u8 = everything.uint8_images()
    np.testing.assert_array_equal(all_u8[..., 0], ref_u8)
    # the splits partition the data in order: train = first 1437, test = last 360
    np.testing.assert_array_equal(np.concatenate([train.uint8_images(), test.uint8_images()]), all_u8)
    np.testing.assert_array_equal(np.concatenate([train.labels, test.labels]), ref.target)
    assert np.bincount(test.labels, minlength=10).min() >= 33
    x = train[5]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(ref_u8[5]).float()[None] / 127.5 - 1)
    batch = everything.get_batch(torch.arange(1797))
    assert batch.min().item() == -1.0 and batch.max().item() == 1.0
    assert torch.equal(batch[[3, 1000]], torch.stack([everything[3], everything[1000]]))
    again = open_source("digits", resolution=8, channels=1)
    assert torch.equal(again.get_batch(range(1437)), train.get_batch(range(1437)))
    images, labels = load_digits_uint8("test")
    np.testing.assert_array_equal(images, test.uint8_images())


def test_digits_at_other_resolution_and_channels():
    ds = open_source("digits", resolution=16, channels=3, split="test")
    assert ds.image_shape == (3, 16, 16) and len(ds) == 360
    src = load_digits_uint8("test")[0][0, :, :, 0]
    ref = np.asarray(Image.fromarray(src, "L").resize((16, 16), Image.Resampling.BICUBIC))
    for c in range(3):
        np.testing.assert_array_equal(ds.uint8_images([0])[0, :, :, c], ref)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="unknown split 'valid'; choose one of train, test, all$"):
        open_source("digits", resolution=8, channels=1, split="valid")
    with pytest.raises(ValueError, match="unknown on_bad_image 'ignore'; choose one of skip, error$"):
        open_source("digits", resolution=8, channels=1, on_bad_image="ignore")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        open_source("digits", resolution=8, channels=4)
    with pytest.raises(IndexError):
        open_source("digits", resolution=8, channels=1, split="test")[360]


def _save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


@pytest.fixture
def image_folder(tmp_path):
    """16x16 images: 5 readable (one an upper-case .JPG), 4 unreadable, 2 ignored files."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    good = {}
    for name in ("a.png", "c.png", "sub/e.bmp", "sub/g.tiff"):
        good[name] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        _save(root / name, good[name])
    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 1, 3))
    _save(root / "sub/UPPER.JPG", smooth, "JPEG")  # valid JPEG, upper-case extension
    _save(root / "b_truncated.jpg", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    jpeg = (root / "b_truncated.jpg").read_bytes()
    (root / "b_truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])  # cut inside the scan data
    (root / "d_zero.png").write_bytes(b"")
    (root / "f_fake.png").write_text("this is a text file, not a PNG\n")
    Image.fromarray(good["a.png"]).save(root / "h_icon.png", format="ICO")  # a real ICO
    (root / "notes.txt").write_text("ignored: not an image extension")
    _save(root / ".hidden/x.png", good["a.png"])  # hidden folders are skipped
    (root / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork: skipped
    return root, good


EXPECTED_ORDER = ["a.png", "b_truncated.jpg", "c.png", "d_zero.png", "f_fake.png", "h_icon.png",
                  "sub/UPPER.JPG", "sub/e.bmp", "sub/g.tiff"]


def test_verify_reports_exactly_the_unreadable_files(image_folder):
    root, _ = image_folder
    bad = verify_source(root)
    assert [p for p, _ in bad] == [str(root / n) for n in
                                    ("b_truncated.jpg", "d_zero.png", "f_fake.png", "h_icon.png")]
    reasons = dict(bad)
    assert reasons[str(root / "b_truncated.jpg")].startswith("corrupt or truncated JPEG data (")
    assert reasons[str(root / "d_zero.png")] == "empty file (0 bytes)"
    assert reasons[str(root / "f_fake.png")] == NOT_ACCEPTED
    assert reasons[str(root / "h_icon.png")] == NOT_ACCEPTED
    report = inspect_source(root, workers=2)
    assert (report.kind, report.num_checked, report.num_ignored) == (SourceKind.FOLDER, 9, 1)


def test_folder_images_are_exact_and_bad_ones_replaced_by_the_next_good(image_folder):
    root, good = image_folder
    ds = open_source(root, resolution=16, channels=3)
    assert [p.relative_to(root).as_posix() for p in ds.files] == EXPECTED_ORDER
    assert len(ds) == 9 and ds.num_skipped == 0
    with pytest.warns(BadImageWarning) as record:
        got = ds.uint8_images()
    messages = [str(w.message) for w in record]
    assert len(messages) == 4
    for name, msg in zip(["b_truncated.jpg", "d_zero.png", "f_fake.png", "h_icon.png"], messages,
                         strict=True):
        assert msg.startswith(f"skipping unreadable image {root / name}: ")
    assert ds.num_skipped == 4
    assert ds.skipped_files == [str(root / n) for n in
                                ("b_truncated.jpg", "d_zero.png", "f_fake.png", "h_icon.png")]
    # index -> file actually read: a bad file's slot holds the next readable file (cyclically)
    stands_for = ["a.png", "c.png", "c.png", "sub/UPPER.JPG", "sub/UPPER.JPG", "sub/UPPER.JPG",
                  "sub/UPPER.JPG", "sub/e.bmp", "sub/g.tiff"]
    for i, name in enumerate(stands_for):
        if name in good:
            np.testing.assert_array_equal(got[i], good[name])
    jpeg = np.asarray(Image.open(root / "sub/UPPER.JPG").convert("RGB"))
    np.testing.assert_array_equal(got[3], jpeg)
    assert torch.equal(ds[2], from_uint8_nhwc(good["c.png"]))
    # the replacement does not depend on the order items are read (resume-safe)
    fresh = open_source(root, resolution=16, channels=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        backwards = np.stack([fresh.uint8_images([i])[0] for i in reversed(range(9))])[::-1]
    np.testing.assert_array_equal(backwards, got)
    assert fresh.num_skipped == 4


def test_skip_count_is_shared_with_dataloader_workers(image_folder):
    root, _ = image_folder
    ds = open_source(root, resolution=16, channels=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(3, 3, 16, 16)] * 3
    assert ds.num_skipped == 4


def test_on_bad_image_error_stops_before_training(image_folder):
    root, _ = image_folder
    with pytest.raises(ValueError, match=r"4 of 9 image files in .* are unreadable") as err:
        open_source(root, resolution=16, channels=3, on_bad_image="error")
    assert str(root / "b_truncated.jpg") in str(err.value) and "and 1 more" in str(err.value)


def test_all_files_unreadable_is_a_clear_error(tmp_path):
    (tmp_path / "x.png").write_text("nope")
    ds = open_source(tmp_path, resolution=8, channels=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        with pytest.raises(ValueError, match="none of the 1 image files .* is readable"):
            ds[0]


def test_empty_or_missing_sources_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    for src in (tmp_path / "empty", tmp_path / "only_text"):
        with pytest.raises(ValueError, match=r"no image files in .*looked recursively for \.bmp"):
            open_source(src, resolution=8, channels=3)
        with pytest.raises(ValueError, match="no image files in"):
            verify_source(src)
    with pytest.raises(ValueError, match=r"data source '.*nowhere' not found: expected 'digits'"):
        open_source(tmp_path / "nowhere", resolution=8, channels=3)
    with pytest.raises(ValueError, match="not found"):
        verify_source(str(tmp_path / "nowhere"))
    _save(tmp_path / "single.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="a single image; put it in a folder"):
        open_source(tmp_path / "single.png", resolution=8, channels=3)
    with pytest.raises(ValueError, match="has no test split"):
        open_source(tmp_path / "only_text", resolution=8, channels=3, split="test")


def test_center_crop_resize_and_channel_conversion(tmp_path):
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # (H, W, C): crop columns 8..32
    _save(tmp_path / "wide.png", wide)
    rgb = open_source(tmp_path, resolution=12, channels=3).uint8_images()[0]
    ref = Image.fromarray(np.ascontiguousarray(wide[:, 8:32])).resize((12, 12), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(rgb, np.asarray(ref))
    gray = open_source(tmp_path, resolution=24, channels=1).uint8_images()[0, :, :, 0]
    sq = wide[:, 8:32].astype(np.int64)  # Pillow's documented integer ITU-R 601-2 luma
    luma = (sq[..., 0] * 19595 + sq[..., 1] * 38470 + sq[..., 2] * 7471 + 0x8000) >> 16
    np.testing.assert_array_equal(gray, luma)


def test_sixteen_bit_palette_and_alpha_images(tmp_path):
    v16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 7  # up to 63007
    Image.fromarray(v16).save(tmp_path / "a16.png")
    palette = Image.new("P", (8, 8))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1] * 32)
    palette.save(tmp_path / "b_palette.gif")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 77, 5
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c_alpha.webp", lossless=True)
    u8 = open_source(tmp_path, resolution=8, channels=3).uint8_images()
    np.testing.assert_array_equal(u8[0, :, :, 1], np.round(v16 / 257).astype(np.uint8))
    expect = np.array([[10, 20, 30], [200, 100, 50]] * 32, np.uint8).reshape(8, 8, 3)
    np.testing.assert_array_equal(u8[1], expect)
    np.testing.assert_array_equal(u8[2], np.full((8, 8, 3), 77, np.uint8))  # alpha dropped


def _pickle_str(b: bytes) -> bytes:
    """Python 2 `str` as cPickle protocol 2 writes it (SHORT_BINSTRING / BINSTRING)."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _pickle_int(v: int) -> bytes:
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def _py2_uint8_array(a: np.ndarray) -> bytes:
    """A 2-D uint8 ndarray exactly as Python 2 numpy pickled it (what the official files hold)."""
    dtype = (b"cnumpy\ndtype\n" + _pickle_str(b"u1") + _pickle_int(0) + _pickle_int(1) + b"\x87R"
             + b"(" + _pickle_int(3) + _pickle_str(b"|") + b"NNN" + _pickle_int(-1) + _pickle_int(-1)
             + _pickle_int(0) + b"tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
            + _pickle_int(0) + b"\x85" + _pickle_str(b"b") + b"\x87R"
            + b"(" + _pickle_int(1) + _pickle_int(a.shape[0]) + _pickle_int(a.shape[1]) + b"\x86"
            + dtype + b"\x89" + _pickle_str(a.tobytes()) + b"tb")


def py2_cifar_batch(images: np.ndarray, labels: list[int], name: bytes) -> bytes:
    """images: uint8 (N, 32, 32, 3) -> a batch file in the official format."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # R plane, G plane, B plane
    items = [(b"batch_label", _pickle_str(name)),
             (b"labels", b"](" + b"".join(_pickle_int(v) for v in labels) + b"e"),
             (b"data", _py2_uint8_array(data)),
             (b"filenames", b"](" + b"".join(_pickle_str(b"f%d.png" % i) for i in range(len(labels))) + b"e")]
    body = b"".join(_pickle_str(k) + v for k, v in items)
    return b"\x80\x02}(" + body + b"u."


CIFAR_NAMES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


@pytest.fixture
def cifar_batches():
    """3 images per batch: 15 train, 3 test; pixel values and labels all known."""
    rng = np.random.default_rng(2)
    batches = {}
    for k, name in enumerate(CIFAR_NAMES):
        images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        labels = [(3 * k + j) % 10 for j in range(3)]
        batches[name] = (images, labels, py2_cifar_batch(images, labels, name.encode()))
    return batches


def _write_cifar_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_py2_batch_matches_what_pickle_itself_reads(cifar_batches):
    images, labels, raw = cifar_batches["data_batch_1"]
    plain = pickle.loads(raw, encoding="bytes")  # the official loading recipe, for reference
    assert plain[b"labels"] == labels
    got_images, got_labels = cifar_mod.unpickle_batch(raw, name="data_batch_1")
    np.testing.assert_array_equal(plain[b"data"], images.transpose(0, 3, 1, 2).reshape(3, 3072))
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.tolist() == labels


def test_cifar_archive_and_folder(tmp_path, cifar_batches):
    archive = tmp_path / "cifar-10-python.tar.gz"
    _write_cifar_tar(archive, {n: raw for n, (_, _, raw) in cifar_batches.items()}
                     | {"batches.meta": b"not read"})
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for n, (_, _, raw) in cifar_batches.items():
        (folder / n).write_bytes(raw)
    train_ref = np.concatenate([cifar_batches[n][0] for n in CIFAR_NAMES[:5]])
    test_ref = cifar_batches["test_batch"][0]
    for src in (archive, folder, str(archive)):
        train = open_source(src, resolution=32, channels=3)
        assert train.kind is SourceKind.CIFAR10 and len(train) == 15
        np.testing.assert_array_equal(train.uint8_images(), train_ref)
        assert train.labels.tolist() == [v for n in CIFAR_NAMES[:5] for v in cifar_batches[n][1]]
        test = open_source(src, resolution=32, channels=3, split="test")
        np.testing.assert_array_equal(test.uint8_images(), test_ref)
        assert len(open_source(src, resolution=32, channels=3, split="all")) == 18
        assert torch.equal(test[1], from_uint8_nhwc(test_ref[1]))
    small = open_source(archive, resolution=16, channels=1, split="test").uint8_images()
    ref = Image.fromarray(test_ref[2]).convert("L").resize((16, 16), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(small[2, :, :, 0], np.asarray(ref))
    assert verify_source(archive) == [] and verify_source(folder) == []
    assert inspect_source(archive).num_checked == 18


def test_cifar_by_name_from_the_data_root(tmp_path, monkeypatch, cifar_batches):
    monkeypatch.setenv("DDPMKIT_DATA", str(tmp_path))
    with pytest.raises(ValueError) as err:
        open_source("cifar10", resolution=32, channels=3)
    msg = str(err.value)
    assert cifar_mod.CIFAR10_URL in msg and cifar_mod.CIFAR10_MD5 in msg
    assert str(tmp_path / "cifar-10-python.tar.gz") in msg
    assert main(["data", "verify", "cifar10"]) == 2
    _write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", {n: r for n, (_, _, r) in cifar_batches.items()})
    assert len(open_source("cifar10", resolution=32, channels=3)) == 15
    test = open_source("CIFAR10-test", resolution=32, channels=3)  # the suffix picks the split
    np.testing.assert_array_equal(test.uint8_images(), cifar_batches["test_batch"][0])
    assert len(open_source("cifar10-train", resolution=32, channels=3, split="test")) == 15


def test_malicious_cifar_pickle_is_refused(tmp_path, cifar_batches):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = pickle.dumps({b"data": Evil(), b"labels": [1]}, protocol=2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for n, (_, _, raw) in cifar_batches.items():
        (folder / n).write_bytes(hostile if n == "data_batch_3" else raw)
    with pytest.raises(ValueError, match=r"data_batch_3: not a readable CIFAR-10 batch .*refusing to load"):
        open_source(folder, resolution=32, channels=3)
    bad = verify_source(folder)
    assert [p for p, _ in bad] == [str(folder / "data_batch_3")]
    assert "refusing to load posix.system" in bad[0][1] or "refusing to load os.system" in bad[0][1]
    assert not marker.exists()
    # the test split does not touch the hostile batch
    assert len(open_source(folder, resolution=32, channels=3, split="test")) == 3


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python3_pickled_batches_also_load(protocol):
    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    raw = pickle.dumps({b"data": images.transpose(0, 3, 1, 2).reshape(2, 3072), b"labels": [4, 5]},
                       protocol=protocol)
    got, labels = cifar_mod.unpickle_batch(raw, name="b")
    np.testing.assert_array_equal(got, images)
    assert labels.tolist() == [4, 5]


def test_broken_cifar_sources_are_reported(tmp_path, cifar_batches):
    partial = tmp_path / "partial.tar.gz"
    _write_cifar_tar(partial, {n: r for n, (_, _, r) in cifar_batches.items() if n != "data_batch_2"})
    with pytest.raises(ValueError, match="no data_batch_2"):
        open_source(partial, resolution=32, channels=3)
    assert verify_source(partial) == [(f"{partial}:data_batch_2", "missing CIFAR-10 batch")]
    torn = tmp_path / "torn.tar.gz"
    torn.write_bytes(partial.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable tar archive"):
        open_source(torn, resolution=32, channels=3)
    assert [p for p, _ in verify_source(torn)] == [str(torn)]
    wrong = tmp_path / "wrong.tar.gz"
    _write_cifar_tar(wrong, {"test_batch": pickle.dumps({b"data": np.zeros((2, 5)), b"labels": [1, 2]})})
    with pytest.raises(ValueError, match=r"test_batch: b'data' must be uint8 \(N, 3072\) with N labels, "
                       r"got float64 \(2, 5\)"):
        open_source(wrong, resolution=32, channels=3, split="test")


def test_cifar_download_checks_md5_and_never_leaves_partial_files(tmp_path, monkeypatch, cifar_batches):
    archive_bytes = io.BytesIO()
    with tarfile.open(fileobj=archive_bytes, mode="w:gz") as tar:
        for n, (_, _, raw) in cifar_batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{n}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    payload = archive_bytes.getvalue()
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(cifar_mod.urllib.request, "urlopen", fake_urlopen)
    root = tmp_path / "root"
    with pytest.raises(ValueError, match=f"expected {cifar_mod.CIFAR10_MD5}"):
        cifar_mod.find_cifar10(root, download=True)  # the payload is not the official archive
    assert urls == [cifar_mod.CIFAR10_URL] and list(root.iterdir()) == []
    got = cifar_mod.download_cifar10(root, md5=hashlib.md5(payload).hexdigest())
    assert got == root / "cifar-10-python.tar.gz" and got.read_bytes() == payload
    assert [p.name for p in root.iterdir()] == ["cifar-10-python.tar.gz"]

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar_mod.urllib.request, "urlopen", offline)
    with pytest.raises(ValueError, match="could not download .*fetch it by hand"):
        cifar_mod.find_cifar10(tmp_path / "other", download=True)


def test_npz_sources(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images, np.arange(5))  # arr_0 and arr_1
    np.savez(tmp_path / "b.npz", samples=images[..., :1])  # the only array, 1 channel
    ds = open_source(tmp_path / "a.npz", resolution=6, channels=3)
    assert ds.kind is SourceKind.NPZ and ds.labels is None
    np.testing.assert_array_equal(ds.uint8_images(), images)
    assert torch.equal(ds.get_batch([4, 0]), from_uint8_nhwc(images[[4, 0]]))
    gray = open_source(tmp_path / "b.npz", resolution=6, channels=3, split="all").uint8_images()
    np.testing.assert_array_equal(gray, np.repeat(images[..., :1], 3, axis=-1))
    assert verify_source(tmp_path / "a.npz") == []


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 4, 4, 3), np.float32), "expected uint8 images .* got dtype float32"),
        (np.zeros((2, 3, 8, 8), np.uint8), r"this looks like NCHW: use a.transpose\(0, 2, 3, 1\)"),
        (np.zeros((2, 8, 8), np.uint8), r"got shape \(2, 8, 8\)"),
        (np.zeros((0, 8, 8, 3), np.uint8), "holds no images"),
    ],
)
def test_npz_wrong_dtype_or_layout(tmp_path, array, message):
    np.savez(tmp_path / "x.npz", array)
    with pytest.raises(ValueError, match=message):
        open_source(tmp_path / "x.npz", resolution=8, channels=3)
    assert len(verify_source(tmp_path / "x.npz")) == 1


def test_npz_unusable_files(tmp_path):
    np.savez(tmp_path / "two.npz", x=np.zeros((1, 2, 2, 3), np.uint8), y=np.zeros(1))
    with pytest.raises(ValueError, match=r"under 'arr_0' or as the only array, found \['x', 'y'\]"):
        open_source(tmp_path / "two.npz", resolution=2, channels=3)
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        open_source(tmp_path / "junk.npz", resolution=2, channels=3)
    np.savez(tmp_path / "ok.npz", np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="has no test split"):
        open_source(tmp_path / "ok.npz", resolution=2, channels=3, split="test")


def test_cli_data_verify_end_to_end(image_folder, tmp_path, capsys):
    root, good = image_folder
    assert main(["data", "verify", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [f"{root / 'b_truncated.jpg'}: " + verify_source(root)[0][1],
                       f"{root / 'd_zero.png'}: empty file (0 bytes)",
                       f"{root / 'f_fake.png'}: {NOT_ACCEPTED}",
                       f"{root / 'h_icon.png'}: {NOT_ACCEPTED}"]
    assert out[4] == (f"4 unreadable in image folder {root}: 9 image files checked "
                      "(1 other file ignored by extension)")
    assert len(out) == 5

    clean = tmp_path / "clean"
    _save(clean / "x.PNG", good["a.png"])
    assert main(["data", "verify", str(clean)]) == 0
    assert capsys.readouterr().out == f"all readable: 1 image files in image folder {clean}\n"

    assert main(["data", "verify", "digits"]) == 0
    assert capsys.readouterr().out == "all readable: 1797 images in digits\n"

    assert main(["data", "verify", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm data: error: data source ") and "not found" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["data", "verify", str(tmp_path / "empty")]) == 2
    assert "no image files in" in capsys.readouterr().err


def test_exif_orientation_is_applied(tmp_path):
    a = np.arange(16 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels must be turned 90 degrees clockwise to display
    Image.fromarray(a).save(tmp_path / "rotated.png", exif=exif)
    got = open_source(tmp_path, resolution=4, channels=3).uint8_images()[0]
    np.testing.assert_array_equal(got, np.rot90(a, k=-1))


def test_data_root_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("DDPMKIT_DATA", raising=False)
    assert cifar_mod.data_root() == cifar_mod.Path.home() / ".cache" / "ddpmkit" / "data"
    monkeypatch.setenv("DDPMKIT_DATA", str(tmp_path))
    assert cifar_mod.data_root() == tmp_path


# ------------------------------------------------------------------------- bombs and FIFOs
def _png_header_only(width: int, height: int) -> bytes:
    """A 1-bit grayscale PNG claiming ``width`` x ``height`` pixels, its data a few bytes."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


@pytest.fixture
def bad_folder(tmp_path):
    """Four good 8x8 PNGs, a 60000^2 decompression bomb and a FIFO named zz.png."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "bomb.png").write_bytes(_png_header_only(60000, 60000))
    os.mkfifo(folder / "zz.png")
    return folder


@pytest.fixture
def no_hang():
    """Fail, instead of hanging the suite, if the test blocks (opening a FIFO with no writer)."""
    import signal

    class Hung(BaseException):  # not an OSError, which the code under test may catch
        pass

    def stop(*_):
        raise Hung("blocked for 20 s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_bomb_or_a_fifo_in_an_image_folder_is_a_bad_image(bad_folder, no_hang):
    from ddpmkit.data import source_shape

    shape = source_shape(bad_folder)  # the header scan: neither opened nor a traceback
    assert shape.sizes == ((8, 8),) and shape.channels == 1
    bad = dict(verify_source(bad_folder))
    assert set(bad) == {str(bad_folder / "bomb.png"), str(bad_folder / "zz.png")}
    assert "not a regular file" in bad[str(bad_folder / "zz.png")]
    with pytest.raises(ValueError, match="2 of 6 image files .* are unreadable"):
        open_source(bad_folder, resolution=8, channels=1, on_bad_image="error")
    ds = open_source(bad_folder, resolution=8, channels=1, on_bad_image="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds.uint8_images()
    assert ds.num_skipped == 2 and sorted(Path(f).name for f in ds.skipped_files) == ["bomb.png", "zz.png"]
    assert len([w for w in caught if issubclass(w.category, BadImageWarning)]) == 2


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_train_on_a_folder_with_a_bomb_and_a_fifo(bad_folder, no_hang, tmp_path, capsys, policy):
    args = ["train", "-o", str(tmp_path / "run"), "--data", str(bad_folder), "--no-progress", "--steps", "1",
            "--batch-size", "2", "--num-workers", "0", "--on-bad-image", policy,
            "--set", "unet.ch_mult=1", "--set", "unet.ch=32", "--set", "diffusion.num_timesteps=10"]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        rc = main(args)
    err = capsys.readouterr().err
    if policy == "skip":
        assert rc == 0, err
    else:
        assert rc == 2 and err.count("\n") == 1 and "are unreadable" in err, err


# ------------------------------------------------------------------------- npz edge cases
def _npz_claiming(path, shape, dtype="|u1", data=b"\0" * 64):
    """An .npz whose arr_0.npy header claims ``shape`` and ``dtype`` over ``data``."""
    import zipfile

    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": dtype, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", member.getvalue() + data)
    return path


@pytest.mark.parametrize("case", ["npy renamed", "huge shape", "short data", "float header", "text", "fifo",
                                  "3 dims"])
def test_an_npz_input_is_checked_before_allocating(tmp_path, case, capsys, no_hang):
    from ddpmkit.evaluate.fid import load_samples

    path = tmp_path / "x.npz"
    if case == "npy renamed":
        np.save(tmp_path / "x.npy", np.zeros((4, 8, 8, 1), np.uint8))
        (tmp_path / "x.npy").rename(path)
    elif case == "huge shape":
        _npz_claiming(path, (10**11, 8, 8, 1))
    elif case == "short data":
        _npz_claiming(path, (4, 8, 8, 1))  # 256 bytes claimed, 64 present
    elif case == "float header":
        _npz_claiming(path, (10**11, 8, 8, 1), dtype="<f4")
    elif case == "text":
        path.write_text("not an npz")
    elif case == "fifo":
        os.mkfifo(path)
    else:
        _npz_claiming(path, (1, 8, 8), data=b"\0" * 64)
    with pytest.raises(ValueError, match=r"x\.npz: ") as err:
        open_source(path, resolution=8, channels=1)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"x\.npz"):
        load_samples(path)
    assert main(["eval", "digits", str(path), "--out", str(tmp_path / "d.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


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
        one_line(e)
        assert str(e).startswith(str(path))
    else:
        assert a.dtype == np.uint8 and a.ndim == 4 and a.shape[0] > 0 and a.shape[-1] in (1, 3)
