"""The TF checkpoint reader (interop/tf_bundle.py) and the conversion of the authors' checkpoints
(interop/tf_checkpoint.py).

References: a checkpoint written once by real TensorFlow (tests/fixtures/tf_small, see
make_tf_fixture.py), the published CRC-32C test vectors, the diffusers UNet2DModel, and — behind
the `tf` marker — TensorFlow itself (tf.compat.v1.train.Saver writes, our reader reads; our
test-side writer writes, TF reads).
"""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpmkit.convert import convert_from_tf
from ddpmkit.interop import tf_bundle
from ddpmkit.interop.tf_bundle import TFCheckpointReader, crc32c, masked_crc32c, unmask_crc32c
from ddpmkit.interop.tf_checkpoint import (
    diffusers_state_dict_from_tf,
    diffusers_unet_config,
    infer_tf_unet_layout,
    read_tf_unet_variables,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "tf_small"

# --------------------------------------------------------------------------- a test-side writer
# A minimal TF V2 bundle writer, written from the format description rather than from the reader:
# one data block with a restart point at every entry (no shared key prefixes), an empty metaindex
# block, every protobuf field written explicitly.

_TF_DTYPES = {np.dtype("float32"): 1, np.dtype("float64"): 2, np.dtype("int32"): 3, np.dtype("int64"): 9}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb_varint(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _pb_bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _pb_fixed32(field: int, value: int) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<I", value)


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body, restarts = bytearray(), []
    for key, value in entries:
        restarts.append(len(body))
        body += _varint(0) + _varint(len(key)) + _varint(len(value)) + key + value
    restarts = restarts or [0]
    return bytes(body) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def _with_trailer(contents: bytes) -> bytes:
    return contents + b"\x00" + struct.pack("<I", masked_crc32c(contents + b"\x00"))


def write_tf_bundle(
    prefix: Path,
    tensors: dict[str, np.ndarray],
    *,
    entries_per_block: int = 1 << 30,
    big_endian: bool = False,
) -> None:
    """Write `tensors` as a one-shard TF V2 checkpoint at `prefix`, `entries_per_block` index
    entries to a data block of the table."""
    header = _pb_varint(1, 1) + _pb_varint(2, int(big_endian)) + _pb_bytes(3, _pb_varint(1, 1))
    data, entries = bytearray(), [(b"", header)]
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        raw = arr.astype(arr.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
        shape = b"".join(_pb_bytes(2, _pb_varint(1, d)) for d in arr.shape)
        proto = (
            _pb_varint(1, _TF_DTYPES[arr.dtype])
            + _pb_bytes(2, shape)
            + _pb_varint(3, 0)
            + _pb_varint(4, len(data))
            + _pb_varint(5, len(raw))
            + _pb_fixed32(6, masked_crc32c(raw))
        )
        entries.append((name.encode(), proto))
        data += raw
    table, index = bytearray(), []
    for start in range(0, len(entries), entries_per_block):
        chunk = entries[start : start + entries_per_block]
        block = _with_trailer(_block(chunk))
        index.append((chunk[-1][0], _varint(len(table)) + _varint(len(block) - 5)))  # key >= the block's keys
        table += block
    meta_block = _with_trailer(_block([]))
    index_block = _with_trailer(_block(index))
    meta_off, index_off = len(table), len(table) + len(meta_block)
    handles = (
        _varint(meta_off) + _varint(len(meta_block) - 5) + _varint(index_off) + _varint(len(index_block) - 5)
    )
    footer = handles.ljust(40, b"\x00") + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(f"{prefix}.index").write_bytes(bytes(table) + meta_block + index_block + footer)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))


# --------------------------------------------------------------------------- the authors' U-Net


def authors_unet_shapes(*, ch, ch_mult, num_res_blocks, attn_levels, in_ch=3, out_ch=3) -> dict[str, tuple]:
    """Variable shapes of diffusion_tf/models/unet.py's `model` (names under `model/`)."""
    s: dict[str, tuple] = {}

    def dense(name, i, o):
        s[f"{name}/W"], s[f"{name}/b"] = (i, o), (o,)

    def conv(name, i, o):
        s[f"{name}/W"], s[f"{name}/b"] = (3, 3, i, o), (o,)

    def norm(name, c):
        s[f"{name}/gamma"], s[f"{name}/beta"] = (c,), (c,)

    def resnet(name, i, o):
        norm(f"{name}/norm1", i), conv(f"{name}/conv1", i, o), dense(f"{name}/temb_proj", 4 * ch, o)
        norm(f"{name}/norm2", o), conv(f"{name}/conv2", o, o)
        if i != o:
            dense(f"{name}/nin_shortcut", i, o)

    def attn(name, c):
        norm(f"{name}/norm", c)
        for p in ("q", "k", "v", "proj_out"):
            dense(f"{name}/{p}", c, c)

    dense("temb/dense0", ch, 4 * ch), dense("temb/dense1", 4 * ch, 4 * ch), conv("conv_in", in_ch, ch)
    hs, cur, levels = [ch], ch, len(ch_mult)
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resnet(f"down_{i}/block_{j}", cur, ch * m)
            cur = ch * m
            if i in attn_levels:
                attn(f"down_{i}/attn_{j}", cur)
            hs.append(cur)
        if i != levels - 1:
            conv(f"down_{i}/downsample/conv", cur, cur)
            hs.append(cur)
    resnet("mid/block_1", cur, cur), attn("mid/attn_1", cur), resnet("mid/block_2", cur, cur)
    for i in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            resnet(f"up_{i}/block_{j}", cur + hs.pop(), ch * ch_mult[i])
            cur = ch * ch_mult[i]
            if i in attn_levels:
                attn(f"up_{i}/attn_{j}", cur)
        if i != 0:
            conv(f"up_{i}/upsample/conv", cur, cur)
    norm("norm_out", cur), conv("conv_out", cur, out_ch)
    return s


TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,))  # resolution 32, attention at 16


def tiny_checkpoint_tensors(seed: int = 0, *, ema: bool = True, out_ch: int = 3) -> dict[str, np.ndarray]:
    """Random authors'-layout weights (std 0.1, so the U-Net's output is not dominated by one
    layer), their EMA shadows, Adam slots and the global step, as the authors' checkpoints hold."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {"global_step": np.array(790000, dtype=np.int64)}
    for name, shape in authors_unet_shapes(**TINY, out_ch=out_ch).items():
        key = f"model/{name}"
        out[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if ema:
            out[f"{key}/ExponentialMovingAverage"] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        out[f"{key}/Adam"] = rng.standard_normal(shape).astype(np.float32)
    return out


_TF_TO_OURS = [  # (pattern on the TF name under model/, our UNet's module name); regex groups fill in
    (r"temb/dense0", "time_embedding.linear_1"),
    (r"temb/dense1", "time_embedding.linear_2"),
    (r"conv_in", "conv_in"),
    (r"norm_out", "conv_norm_out"),
    (r"conv_out", "conv_out"),
    (r"mid/block_1/(.+)", "mid_block.resnets.0.{0}"),
    (r"mid/block_2/(.+)", "mid_block.resnets.1.{0}"),
    (r"mid/attn_1/(.+)", "mid_block.attentions.0.{0}"),
    (r"down_(\d+)/block_(\d+)/(.+)", "down_blocks.{0}.resnets.{1}.{2}"),
    (r"down_(\d+)/attn_(\d+)/(.+)", "down_blocks.{0}.attentions.{1}.{2}"),
    (r"down_(\d+)/downsample/conv", "down_blocks.{0}.downsample.conv"),
    (r"up_(\d+)/block_(\d+)/(.+)", "up_blocks.{UP}.resnets.{1}.{2}"),
    (r"up_(\d+)/attn_(\d+)/(.+)", "up_blocks.{UP}.attentions.{1}.{2}"),
    (r"up_(\d+)/upsample/conv", "up_blocks.{UP}.upsample.conv"),
]
_PARAM_NAMES = {"W": "weight", "gamma": "weight", "b": "bias", "beta": "bias"}
_LAYER_NAMES = {
    "temb_proj": "time_emb_proj",
    "nin_shortcut": "conv_shortcut",
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out",
}


def direct_state_dict(variables: dict[str, np.ndarray], levels: int, target: dict) -> dict[str, torch.Tensor]:
    """TF names -> OUR U-Net's names directly (no diffusers in between), laid out by target shapes."""
    state = {}
    for name, value in variables.items():
        scope, param = name.rsplit("/", 1)
        for pattern, fmt in _TF_TO_OURS:
            m = re.fullmatch(pattern, scope)
            if m:
                groups = [_LAYER_NAMES.get(g, g) for g in m.groups()]
                up = levels - 1 - int(m.group(1)) if "{UP}" in fmt else 0
                module = fmt.replace("{UP}", str(up)).format(*groups)
                break
        else:
            raise AssertionError(f"unmapped {name}")
        key = f"{module}.{_PARAM_NAMES[param]}"
        t = torch.from_numpy(value)
        if t.ndim == 4:
            t = t.permute(3, 2, 0, 1)
        elif t.ndim == 2:
            t = t.T.reshape(target[key].shape)  # Linear (out, in) or a 1x1 Conv2d (out, in, 1, 1)
        state[key] = t.contiguous()
    return state


# --------------------------------------------------------------------------- crc32c


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_published_vectors_and_a_bitwise_reference():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC catalogue's check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    rng = np.random.default_rng(1)
    for n in (0, 1, 5, 4095, 4096, 4097, 20_011):  # both the short path and the vectorised one
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tf_bundle._crc32c_fallback(data) == _crc32c_bitwise(data), n
    assert unmask_crc32c(masked_crc32c(b"foo")) == crc32c(b"foo") != masked_crc32c(b"foo")


def test_crc32c_fallback_is_fast_enough_for_a_real_checkpoint():
    data = np.random.default_rng(2).integers(0, 256, 8_000_000, dtype=np.uint8).tobytes()
    import time

    start = time.perf_counter()
    tf_bundle._crc32c_fallback(data)
    elapsed = time.perf_counter() - start
    # ~140 MB for the CIFAR-10 checkpoint: 8 MB must take well under a second (measured ~0.1 s)
    assert elapsed < 2.0, elapsed


# --------------------------------------------------------------------------- reading real TF output


def test_reader_reads_every_tensor_of_a_real_tf_checkpoint():
    expected = np.load(FIXTURE / "expected.npz")
    reader = TFCheckpointReader(FIXTURE / "model.ckpt-7")
    assert reader.keys() == sorted(expected.files)
    assert "model/conv_in/W/ExponentialMovingAverage" in reader
    for name in reader.keys():
        value = reader.read(name)
        assert value.dtype == expected[name].dtype, name
        assert reader.dtype(name) == expected[name].dtype and reader.shape(name) == expected[name].shape
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    # the EMA shadows differ from the raw values (the fixture moved the variables after apply())
    assert not np.array_equal(
        reader.read("model/conv_in/W"), reader.read("model/conv_in/W/ExponentialMovingAverage")
    )


@pytest.mark.parametrize("form", ["folder", "index", "data"])
def test_reader_accepts_the_usual_ways_of_naming_a_checkpoint(form):
    path = {
        "folder": FIXTURE,
        "index": FIXTURE / "model.ckpt-7.index",
        "data": FIXTURE / "model.ckpt-7.data-00000-of-00001",
    }[form]
    reader = TFCheckpointReader(path)
    assert reader.prefix == FIXTURE / "model.ckpt-7"
    assert reader.read("global_step") == 7


def _copy_fixture(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "ckpt")
    return tmp_path / "ckpt" / "model.ckpt-7"


def test_wrong_prefix_names_the_files_it_looked_for(tmp_path):
    with pytest.raises(ValueError, match=r"no TF checkpoint .*model\.ckpt-8\.index.*data-00000-of"):
        TFCheckpointReader(FIXTURE / "model.ckpt-8")


def test_truncated_data_file_names_the_file_and_the_sizes(tmp_path):
    prefix = _copy_fixture(tmp_path)
    data = Path(f"{prefix}.data-00000-of-00001")
    full = data.stat().st_size
    data.write_bytes(data.read_bytes()[: full - 10])
    with pytest.raises(
        ValueError, match=rf"data-00000-of-00001 is truncated: .*{full} bytes, the file has {full - 10}"
    ):
        TFCheckpointReader(prefix)


def test_missing_data_file_is_named(tmp_path):
    prefix = _copy_fixture(tmp_path)
    Path(f"{prefix}.data-00000-of-00001").unlink()
    with pytest.raises(ValueError, match=r"missing its data file\(s\): .*model\.ckpt-7\.data-00000-of-00001"):
        TFCheckpointReader(prefix)


def test_checksum_mismatch_names_the_variable(tmp_path):
    prefix = _copy_fixture(tmp_path)
    entry = TFCheckpointReader(prefix).entry("model/down_0/block_0/conv1/W")
    data = Path(f"{prefix}.data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 17] ^= 0x01  # one flipped bit in that tensor
    data.write_bytes(bytes(raw))
    reader = TFCheckpointReader(prefix)
    reader.read("model/conv_in/W")  # the others still read
    with pytest.raises(ValueError, match=r"checksum mismatch for variable 'model/down_0/block_0/conv1/W'"):
        reader.read("model/down_0/block_0/conv1/W")
    assert TFCheckpointReader(prefix, verify=False).read("model/down_0/block_0/conv1/W").shape == (3, 3, 4, 8)


def test_corrupted_index_block_is_detected(tmp_path):
    prefix = _copy_fixture(tmp_path)
    index = Path(f"{prefix}.index")
    raw = bytearray(index.read_bytes())
    raw[20] ^= 0x40  # inside the first data block
    index.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"\.index is corrupted: checksum mismatch"):
        TFCheckpointReader(prefix)


def test_snappy_block_without_python_snappy_says_what_to_install(tmp_path, monkeypatch):
    prefix = _copy_fixture(tmp_path)
    index = Path(f"{prefix}.index")
    raw = bytearray(index.read_bytes())
    footer = raw[-48:]
    index_offset, pos = tf_bundle._read_varint(
        footer, tf_bundle._read_varint(footer, tf_bundle._read_varint(footer, 0)[1])[1]
    )
    index_size, _ = tf_bundle._read_varint(footer, pos)
    raw[index_offset + index_size] = 1  # mark the index block snappy-compressed, with a valid checksum
    crc = masked_crc32c(bytes(raw[index_offset : index_offset + index_size + 1]))
    raw[index_offset + index_size + 1 : index_offset + index_size + 5] = struct.pack("<I", crc)
    index.write_bytes(bytes(raw))
    monkeypatch.setitem(__import__("sys").modules, "snappy", None)  # import snappy -> ImportError
    with pytest.raises(ValueError, match=r"snappy-compressed blocks; install python-snappy"):
        TFCheckpointReader(prefix)


def test_test_writer_round_trips_through_the_reader(tmp_path):
    tensors = {
        "a/W": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([1, -2], dtype=np.int64),
        "c": np.float64(3.5) * np.ones((2, 1, 2)),
    }
    write_tf_bundle(tmp_path / "x", tensors, entries_per_block=2)  # the table's index spans 2 blocks
    reader = TFCheckpointReader(tmp_path / "x")
    assert reader.keys() == ["a/W", "b", "c"]
    for k, v in tensors.items():
        np.testing.assert_array_equal(reader.read(k), v)
        assert reader.read(k).dtype == v.dtype


# --------------------------------------------------------------------------- conversion


def test_layout_inference_at_the_papers_sizes_and_diffusers_names():
    """Full-size CIFAR-10 and 256x256 layouts from shapes alone; the mapped names and shapes are
    exactly those of diffusers' UNet2DModel built from the inferred config."""
    from diffusers import UNet2DModel

    from ddpmkit.interop.tf_checkpoint import _to_torch_weight, tf_to_diffusers_layers

    cifar = authors_unet_shapes(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,))
    layout = infer_tf_unet_layout(cifar)
    assert (layout.ch, layout.ch_mult, layout.num_res_blocks, layout.attn_levels) == (
        128,
        (1, 2, 2, 2),
        2,
        (1,),
    )
    assert layout.resolution() == 32
    big = authors_unet_shapes(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_levels=(4,))
    big_layout = infer_tf_unet_layout(big)
    assert big_layout.ch_mult == (1, 1, 2, 2, 4, 4) and big_layout.resolution() == 256
    assert sum(np.prod(s) for s in cifar.values()) == 35_746_307  # the paper's 35.7M
    assert sum(np.prod(s) for s in big.values()) == 113_673_219  # and 114M

    with torch.device("meta"):  # shapes only, no 35.7M-parameter allocation
        reference = UNet2DModel.from_config(diffusers_unet_config(layout, 32)).state_dict()
    mapped = {}
    for tf_scope, hf_name, kind in tf_to_diffusers_layers(layout, cifar):
        pairs = (
            [("gamma", "weight"), ("beta", "bias")] if kind == "norm" else [("W", "weight"), ("b", "bias")]
        )
        for tf_p, hf_p in pairs:
            shape = cifar[f"{tf_scope}/{tf_p}"]
            w = np.empty(shape, dtype=np.float32)
            mapped[f"{hf_name}.{hf_p}"] = _to_torch_weight(w, kind).shape if tf_p == "W" else shape
    assert mapped.keys() == reference.keys()
    for k, v in reference.items():
        assert tuple(mapped[k]) == tuple(v.shape), k


@pytest.fixture(scope="module")
def tiny_prefix(tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("tfckpt") / "model.ckpt-790000"
    write_tf_bundle(prefix, tiny_checkpoint_tensors())
    return prefix


@pytest.mark.parametrize("ema", [True, False])
def test_converted_model_equals_a_direct_name_mapping(tiny_prefix, tmp_path, ema):
    from ddpmkit.nn import UNet, UNetConfig, read_model_folder

    convert_from_tf(tiny_prefix, tmp_path / "out", ema=ema)
    unet, diffusion = read_model_folder(tmp_path / "out")
    assert unet.config == UNetConfig(
        resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.1
    )
    assert diffusion["var_type"] == "fixedlarge" and diffusion["mean_type"] == "eps"
    assert (diffusion["num_timesteps"], diffusion["beta_start"], diffusion["beta_end"]) == (1000, 1e-4, 0.02)

    tensors = tiny_checkpoint_tensors()
    suffix = "/ExponentialMovingAverage" if ema else ""
    variables = {
        k[len("model/") :]: tensors[k + suffix]
        for k in tensors
        if k.startswith("model/") and not k.endswith(("/ExponentialMovingAverage", "/Adam"))
    }
    direct = UNet(config=unet.config)
    direct.load_state_dict(direct_state_dict(variables, 2, direct.state_dict()), strict=True)
    ours = unet.state_dict()
    assert ours.keys() == direct.state_dict().keys()
    for k, v in direct.state_dict().items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 999])
    with torch.no_grad():
        torch.testing.assert_close(unet.eval()(x, t), direct.eval()(x, t), rtol=1e-5, atol=1e-5)


def test_converted_model_matches_diffusers_unet2dmodel_on_the_same_weights(tiny_prefix, tmp_path):
    """An independent implementation of the authors' network: diffusers loads the mapped state
    dict strictly and computes the same output as our converted U-Net."""
    from diffusers import UNet2DModel

    from ddpmkit.nn import read_model_folder

    reader = TFCheckpointReader(tiny_prefix)
    variables = read_tf_unet_variables(reader, ema=True)
    layout = infer_tf_unet_layout({k: v.shape for k, v in variables.items()})
    reference = UNet2DModel.from_config(diffusers_unet_config(layout, 32)).eval()
    reference.load_state_dict(diffusers_state_dict_from_tf(variables, layout), strict=True)
    convert_from_tf(tiny_prefix, tmp_path / "out")
    unet, _ = read_model_folder(tmp_path / "out")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = reference(x, t).sample
        torch.testing.assert_close(unet.eval()(x, t), expected, rtol=1e-4, atol=1e-4)
    assert expected.abs().mean() > 0.05  # a non-trivial output


def test_missing_and_unknown_variables_are_listed(tmp_path):
    tensors = tiny_checkpoint_tensors()
    for key in ("model/mid/attn_1/q/b", "model/mid/attn_1/q/b/ExponentialMovingAverage"):
        del tensors[key]
    tensors["model/mid/extra/W"] = tensors["model/mid/extra/W/ExponentialMovingAverage"] = np.ones(
        3, np.float32
    )
    write_tf_bundle(tmp_path / "bad", tensors)
    with pytest.raises(ValueError, match=r"missing 1: model/mid/attn_1/q/b; unknown 1: model/mid/extra/W"):
        convert_from_tf(tmp_path / "bad", tmp_path / "out")


def test_ema_requested_but_absent_says_so(tmp_path):
    write_tf_bundle(tmp_path / "raw", tiny_checkpoint_tensors(ema=False))
    with pytest.raises(
        ValueError, match=r"no ExponentialMovingAverage shadows under the scope 'model/'.*--no-ema"
    ):
        convert_from_tf(tmp_path / "raw", tmp_path / "out")
    convert_from_tf(tmp_path / "raw", tmp_path / "out", ema=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()

    partial = tiny_checkpoint_tensors()
    del partial["model/conv_out/b/ExponentialMovingAverage"]
    write_tf_bundle(tmp_path / "partial", partial)
    with pytest.raises(
        ValueError, match=r"no ExponentialMovingAverage shadow for 1 variable\(s\): conv_out/b;"
    ):
        convert_from_tf(tmp_path / "partial", tmp_path / "out2")


def test_ema_only_export_converts(tmp_path):
    """A checkpoint holding only the shadows (raw values stripped) gives the same model."""
    full = tiny_checkpoint_tensors()
    write_tf_bundle(
        tmp_path / "ema_only", {k: v for k, v in full.items() if k.endswith("ExponentialMovingAverage")}
    )
    from ddpmkit.nn import read_model_folder

    convert_from_tf(tmp_path / "ema_only", tmp_path / "out")
    unet, _ = read_model_folder(tmp_path / "out")
    expected = full["model/mid/attn_1/proj_out/W/ExponentialMovingAverage"].T
    np.testing.assert_array_equal(unet.mid_block.attentions[0].to_out.weight.detach().numpy(), expected)


def test_256_layout_gets_fixedsmall(tmp_path):
    from ddpmkit.interop.tf_checkpoint import authors_diffusion_config

    layout = infer_tf_unet_layout(
        authors_unet_shapes(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_levels=(4,))
    )
    assert authors_diffusion_config(layout.resolution(), False).var_type.value == "fixedsmall"
    assert authors_diffusion_config(32, False).var_type.value == "fixedlarge"


def test_cli_convert_from_tf_end_to_end(tiny_prefix, tmp_path, capsys):
    from ddpmkit.cli import main
    from ddpmkit.nn import read_model_folder

    assert main(["convert", "--from-tf", str(tiny_prefix), "--out", str(tmp_path / "m")]) == 0
    unet, diffusion = read_model_folder(tmp_path / "m")
    assert diffusion["var_type"] == "fixedlarge" and unet.config.ch == 32
    assert main(["convert", "--from-tf", str(tiny_prefix), "--no-ema", "--out", str(tmp_path / "raw")]) == 0
    raw, _ = read_model_folder(tmp_path / "raw")
    assert not torch.equal(raw.conv_in.weight, unet.conv_in.weight)
    capsys.readouterr()
    assert main(["convert", "--from-tf", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.index" in err and "Traceback" not in err


# --------------------------------------------------------------------------- against TensorFlow itself


@pytest.mark.tf
def test_tf_saver_checkpoint_reads_back_exactly(tmp_path):
    """tf.compat.v1.train.Saver writes the authors' variables (reduced width) with EMA shadows and
    Adam slots; our reader returns every tensor exactly; the conversion takes the EMA values."""
    tf = pytest.importorskip("tensorflow", reason="needs tensorflow-cpu (pip install -e .[tf])")
    tf1 = tf.compat.v1
    rng = np.random.default_rng(3)
    shapes = authors_unet_shapes(**TINY)
    graph = tf1.Graph()
    with graph.as_default():
        variables = {
            name: tf1.get_variable(
                f"model/{name}", initializer=(0.1 * rng.standard_normal(shape)).astype(np.float32)
            )
            for name, shape in shapes.items()
        }
        global_step = tf1.train.get_or_create_global_step()
        loss = tf1.add_n([tf1.reduce_sum(tf1.square(v)) for v in variables.values()])
        train_op = tf1.train.AdamOptimizer(1e-2).minimize(loss, global_step=global_step)
        ema = tf1.train.ExponentialMovingAverage(decay=0.9)
        with tf1.control_dependencies([train_op]):
            ema_op = ema.apply(list(variables.values()))
        with tf1.Session(graph=graph) as sess:
            sess.run(tf1.global_variables_initializer())
            for _ in range(3):
                sess.run(ema_op)
            values = {v.op.name: sess.run(v) for v in tf1.global_variables()}
            prefix = tf1.train.Saver().save(
                sess, str(tmp_path / "model.ckpt"), global_step=global_step, write_meta_graph=False
            )
    reader = TFCheckpointReader(prefix)
    assert set(reader.keys()) == set(values)
    assert "model/up_1/attn_0/proj_out/W/ExponentialMovingAverage" in values
    assert "model/conv_in/W/Adam_1" in values
    for name, value in values.items():
        got = reader.read(name)
        assert got.dtype == value.dtype and got.shape == value.shape, name
        np.testing.assert_array_equal(got, value, err_msg=name)

    convert_from_tf(prefix, tmp_path / "out")
    from ddpmkit.nn import read_model_folder

    unet, _ = read_model_folder(tmp_path / "out")
    ema_conv_in = values["model/conv_in/W/ExponentialMovingAverage"].transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(unet.conv_in.weight.detach().numpy(), ema_conv_in)


@pytest.mark.tf
def test_tensorflow_reads_the_test_side_writer(tmp_path):
    """Our test-side writer produces checkpoints TF itself accepts (so the no-TF tests above stand
    on a valid format)."""
    tf = pytest.importorskip("tensorflow", reason="needs tensorflow-cpu (pip install -e .[tf])")
    tensors = tiny_checkpoint_tensors(5)
    write_tf_bundle(tmp_path / "w", tensors, entries_per_block=50)
    tf_reader = tf.train.load_checkpoint(str(tmp_path / "w"))
    assert set(tf_reader.get_variable_to_shape_map()) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(tf_reader.get_tensor(name), value, err_msg=name)


def test_big_endian_bundle_reads_in_native_order(tmp_path):
    tensors = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "n": np.arange(3, dtype=np.int64)}
    write_tf_bundle(tmp_path / "be", tensors, big_endian=True)
    reader = TFCheckpointReader(tmp_path / "be")
    for k, v in tensors.items():
        got = reader.read(k)
        np.testing.assert_array_equal(got, v)
        assert got.dtype.isnative


def test_learned_variance_and_resolution_override(tmp_path):
    """out_channels = 2 x in_channels is a learned-variance net; `resolution` overrides the
    inferred image size (and with it the attention resolution)."""
    write_tf_bundle(tmp_path / "lv", tiny_checkpoint_tensors(out_ch=6))
    from ddpmkit.nn import read_model_folder

    convert_from_tf(tmp_path / "lv", tmp_path / "out", resolution=64)
    unet, diffusion = read_model_folder(tmp_path / "out")
    assert (
        unet.config.learned_variance and unet.config.out_channels == 3 and unet.conv_out.weight.shape[0] == 6
    )
    assert unet.config.resolution == 64 and unet.config.attn_resolutions == (32,)
    assert diffusion["var_type"] == "learned"


def test_resolution_cannot_be_guessed_without_attention_or_a_known_level_count():
    layout = infer_tf_unet_layout(
        authors_unet_shapes(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_levels=())
    )
    with pytest.raises(
        ValueError, match=r"cannot infer the image resolution .* 3 levels .* pass resolution="
    ):
        layout.resolution()
    assert layout.resolution(48) == 48
