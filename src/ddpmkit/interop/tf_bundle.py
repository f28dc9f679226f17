"""A reader for TensorFlow's V2 checkpoint format (the "tensor bundle"), in Python and NumPy only.

A checkpoint `PREFIX` is the files

- `PREFIX.index`: an SSTable (the LevelDB table format) mapping each variable name to a
  `BundleEntryProto` (dtype, shape, shard, byte offset, byte size, masked crc32c); the entry with the
  empty key holds the `BundleHeaderProto` (number of shards, endianness).
- `PREFIX.data-0000k-of-0000n`: the raw little-endian tensor bytes, one file per shard.

The protobuf wire format and the table format are decoded by hand, so no TensorFlow and no protobuf
package is needed. Every block of the index and every tensor read is checked against its crc32c.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["TFCheckpointReader", "BundleEntry", "crc32c", "masked_crc32c", "unmask_crc32c"]

# --------------------------------------------------------------------------- crc32c (Castagnoli)

_CRC32C_POLY_REFLECTED = 0x82F63B78
_CRC_MASK_DELTA = 0xA282EAD8  # LevelDB / TF: masked = rotate_right(crc, 15) + delta


def _make_crc32c_table() -> np.ndarray:
    """(256,) uint32: the byte-at-a-time table of the reflected Castagnoli polynomial."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC32C_POLY_REFLECTED), table >> 1)
    return table.astype(np.uint32)


_TABLE = _make_crc32c_table()
_TABLE_LIST: list[int] = _TABLE.tolist()


def _crc32c_register_python(data: bytes | memoryview, register: int = 0) -> int:
    """The raw register update (no pre/post inversion) one byte at a time; for short inputs."""
    table = _TABLE_LIST
    for byte in bytes(data):
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


@lru_cache(maxsize=32)
def _zeros_shift_tables(length: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """The linear map c -> register after feeding `length` zero bytes to register c, as 4 byte tables.

    The map is linear over GF(2), so it is fixed by the images of the 32 basis registers; the
    table for byte k of c holds the XOR of the images of the bits set in each value 0..255.
    """
    regs = np.uint32(1) << np.arange(32, dtype=np.uint32)  # (32,) basis registers
    for _ in range(length):
        regs = (regs >> np.uint32(8)) ^ _TABLE[regs & np.uint32(0xFF)]
    bits = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1  # (256, 8)
    tables = []
    for k in range(4):
        images = regs[8 * k : 8 * k + 8]  # (8,) images of the bits of byte k
        tables.append(np.bitwise_xor.reduce(np.where(bits == 1, images[None, :], 0), axis=1).tolist())
    return tables[0], tables[1], tables[2], tables[3]


def _crc32c_register_numpy(data: np.ndarray) -> int:
    """Raw register of `data` (uint8, starting from register 0), vectorised over chunks.

    The input is left-padded with zeros (which leave a zero register unchanged) to N chunks of L
    bytes; all chunks advance together one byte per step, then the chunk registers are folded left
    to right with the "feed L zero bytes" map: R(A || B) = shift_L(R(A)) ^ R(B).
    """
    n = data.size
    chunk = 1 << max(6, round(math.log2(math.sqrt(n) / 2)))  # L ~ sqrt(n)/2, a power of two
    num_chunks = -(-n // chunk)
    padded = np.zeros(num_chunks * chunk, dtype=np.uint8)
    padded[num_chunks * chunk - n :] = data
    columns = np.ascontiguousarray(padded.reshape(num_chunks, chunk).T)  # (L, N)
    regs = np.zeros(num_chunks, dtype=np.uint32)
    low = np.empty(num_chunks, dtype=np.uint8)
    eight = np.uint32(8)
    for j in range(chunk):
        np.bitwise_xor(regs.astype(np.uint8), columns[j], out=low)
        regs >>= eight
        regs ^= _TABLE[low]
    t0, t1, t2, t3 = _zeros_shift_tables(chunk)
    register = 0
    for r in regs.tolist():
        shifted = t0[register & 0xFF] ^ t1[(register >> 8) & 0xFF]
        register = shifted ^ t2[(register >> 16) & 0xFF] ^ t3[register >> 24] ^ r
    return register


def _crc32c_fallback(data: bytes | bytearray | memoryview) -> int:
    view = np.frombuffer(data, dtype=np.uint8)
    if view.size < 4096:
        return _crc32c_register_python(view.tobytes(), 0xFFFFFFFF) ^ 0xFFFFFFFF
    # Starting from register 0xFFFFFFFF equals starting from 0 with the first 4 bytes inverted.
    head = view.copy()
    head[:4] ^= np.uint8(0xFF)
    return _crc32c_register_numpy(head) ^ 0xFFFFFFFF


def _pick_crc32c_backend():
    try:  # the `crc32c` package (hardware accelerated)
        import crc32c as _crc32c_pkg

        return lambda data: _crc32c_pkg.crc32c(data)
    except ImportError:
        pass
    try:  # google-crc32c
        import google_crc32c

        return lambda data: google_crc32c.value(bytes(data))
    except ImportError:
        pass
    return _crc32c_fallback


_crc32c_backend = _pick_crc32c_backend()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) of `data`, the standard one: crc32c(b"123456789") == 0xE3069283."""
    return int(_crc32c_backend(data))


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """The checksum as LevelDB and TensorFlow store it: rotate right by 15, add 0xa282ead8 (mod 2^32)."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def unmask_crc32c(masked: int) -> int:
    rot = (masked - _CRC_MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# --------------------------------------------------------------------------- protobuf wire format


def _read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at `pos`; returns (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _iter_fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) of a protobuf message: ints for varint / fixed
    fields, bytes for length-delimited ones."""
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = bytes(buf[pos : pos + length]), pos + length
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {field})")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, wire, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# tensorflow/core/framework/types.proto: DataType enum -> NumPy dtype (little-endian)
_NUMPY_DTYPES: dict[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 8: "complex64",
    9: "int64", 10: "bool", 17: "uint16", 18: "complex128", 19: "float16", 22: "uint32", 23: "uint64",
}
_OTHER_DTYPES: dict[int, str] = {
    7: "string", 11: "qint8", 12: "quint8", 13: "qint32", 14: "bfloat16", 15: "qint16", 16: "quint16",
    20: "resource", 21: "variant",
}


@dataclass(frozen=True)
class BundleEntry:
    """One `BundleEntryProto`: where a tensor's bytes are and how to check them."""

    dtype: int  # TF DataType enum value
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked; None when the entry has none
    num_slices: int  # > 0 for a partitioned variable (its bytes live under other keys)

    @classmethod
    def parse(cls, buf: bytes) -> BundleEntry:
        values = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": None}
        num_slices = 0
        for field, _, value in _iter_fields(buf):
            if field == 1:
                values["dtype"] = value
            elif field == 2:
                values["shape"] = _parse_shape(value)
            elif field in (3, 4, 5):
                values[{3: "shard_id", 4: "offset", 5: "size"}[field]] = _signed64(value)
            elif field == 6:
                values["crc32c"] = value
            elif field == 7:
                num_slices += 1
        return cls(**values, num_slices=num_slices)

    @property
    def dtype_name(self) -> str:
        return _NUMPY_DTYPES.get(self.dtype) or _OTHER_DTYPES.get(self.dtype, f"DataType({self.dtype})")


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    """TensorShapeProto: repeated Dim dim = 2 (Dim: int64 size = 1); bool unknown_rank = 3."""
    dims = []
    for field, _, value in _iter_fields(buf):
        if field == 2:
            size = 0
            for dim_field, _, dim_value in _iter_fields(value):
                if dim_field == 1:
                    size = _signed64(dim_value)
            dims.append(size)
        elif field == 3 and value:
            raise ValueError("a checkpoint tensor of unknown rank")
    return tuple(dims)


# --------------------------------------------------------------------------- the SSTable (.index)

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
_BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c


def _read_block(table: bytes, offset: int, size: int, path: Path) -> bytes:
    """The contents of the block at (offset, size), its checksum verified and decompressed."""
    end = offset + size + _BLOCK_TRAILER_SIZE
    if end > len(table):
        raise ValueError(f"{path} is truncated: a block ends at byte {end}, the file has {len(table)}")
    contents = table[offset : offset + size]
    compression = table[offset + size]
    stored = int.from_bytes(table[offset + size + 1 : end], "little")
    if masked_crc32c(table[offset : offset + size + 1]) != stored:
        raise ValueError(f"{path} is corrupted: checksum mismatch in the block at byte {offset}")
    if compression == 0:
        return contents
    if compression == 1:
        try:
            import snappy
        except ImportError as err:
            raise ValueError(
                f"{path} has snappy-compressed blocks; install python-snappy (pip install python-snappy)"
            ) from err
        return snappy.decompress(contents)
    raise ValueError(f"{path}: unknown block compression type {compression}")


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) of a table block: prefix-compressed entries, then the restart array."""
    if len(block) < 4:
        raise ValueError("table block too short")
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise ValueError("table block restart array overflows the block")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _read_varint(block, pos)
        non_shared, pos = _read_varint(block, pos)
        value_length, pos = _read_varint(block, pos)
        if shared > len(key) or pos + non_shared + value_length > limit:
            raise ValueError("corrupted table block entry")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        yield key, block[pos : pos + value_length]
        pos += value_length


def read_sstable(path: Path) -> dict[bytes, bytes]:
    """All (key, value) pairs of a LevelDB-format table file."""
    table = path.read_bytes()
    if len(table) < _FOOTER_SIZE:
        raise ValueError(f"{path} is not a checkpoint index: {len(table)} bytes, shorter than its footer")
    footer = table[-_FOOTER_SIZE:]
    (magic,) = struct.unpack("<Q", footer[-8:])
    if magic != _TABLE_MAGIC:
        raise ValueError(f"{path} is not a checkpoint index (bad table magic {magic:#x})")
    _, pos = _read_varint(footer, 0)  # metaindex offset (unused: TF writes no filters)
    _, pos = _read_varint(footer, pos)  # metaindex size
    index_offset, pos = _read_varint(footer, pos)
    index_size, pos = _read_varint(footer, pos)
    entries: dict[bytes, bytes] = {}
    for _, handle in _block_entries(_read_block(table, index_offset, index_size, path)):
        offset, hpos = _read_varint(handle, 0)
        size, _ = _read_varint(handle, hpos)
        entries.update(_block_entries(_read_block(table, offset, size, path)))
    return entries


# --------------------------------------------------------------------------- the checkpoint reader


def _resolve_prefix(prefix: str | os.PathLike) -> Path:
    """Accept PREFIX, PREFIX.index, PREFIX.data-*, or a folder with a TF `checkpoint` file."""
    path = Path(prefix)
    if path.is_dir() and (path / "checkpoint").is_file():
        for line in (path / "checkpoint").read_text().splitlines():
            if line.startswith("model_checkpoint_path:"):
                name = line.split(":", 1)[1].strip().strip('"')
                return Path(name) if Path(name).is_absolute() else path / name
    name = path.name
    if name.endswith(".index"):
        return path.with_name(name[: -len(".index")])
    if ".data-" in name and "-of-" in name:
        return path.with_name(name[: name.rindex(".data-")])
    return path


class TFCheckpointReader:
    """Read the variables of a TF V2 checkpoint without TensorFlow.

    `prefix` is what TF's `Saver.save` returned (e.g. `.../model.ckpt-790000`); `PREFIX.index`,
    a `.data-*` file or a folder holding a TF `checkpoint` file are accepted too.
    """

    def __init__(self, prefix: str | os.PathLike, *, verify: bool = True):
        self.prefix = _resolve_prefix(prefix)
        self.verify = verify
        index_path = self.prefix.with_name(self.prefix.name + ".index")
        if not index_path.is_file():
            raise ValueError(
                f"no TF checkpoint at prefix {str(prefix)!r}: looked for {index_path} "
                f"(and {self.prefix.name}.data-00000-of-NNNNN beside it)"
            )
        raw = read_sstable(index_path)
        header = raw.pop(b"", None)
        if header is None:
            raise ValueError(f"{index_path} has no bundle header (is it a TF V2 checkpoint index?)")
        self.num_shards, self.big_endian = _parse_header(header)
        self._entries = {key.decode("utf-8"): BundleEntry.parse(value) for key, value in raw.items()}
        self._check_shards()

    def _data_path(self, shard_id: int) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def _check_shards(self) -> None:
        """Every data shard exists and is long enough for the entries that point into it."""
        needed: dict[int, int] = {}
        for entry in self._entries.values():
            needed[entry.shard_id] = max(needed.get(entry.shard_id, 0), entry.offset + entry.size)
        missing = [str(self._data_path(s)) for s in sorted(needed) if not self._data_path(s).is_file()]
        if missing:
            raise ValueError(f"TF checkpoint {self.prefix} is missing its data file(s): {', '.join(missing)}")
        for shard, size in needed.items():
            actual = self._data_path(shard).stat().st_size
            if actual < size:
                raise ValueError(
                    f"{self._data_path(shard)} is truncated: the index needs at least {size} bytes, "
                    f"the file has {actual}"
                )

    def keys(self) -> list[str]:
        """The variable names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> BundleEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no variable {name!r} in TF checkpoint {self.prefix}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        """The NumPy dtype of a variable; ValueError for TF types NumPy cannot hold (string, ...)."""
        entry = self.entry(name)
        if entry.dtype not in _NUMPY_DTYPES:
            raise ValueError(f"variable {name!r} has dtype {entry.dtype_name}, which this reader cannot read")
        return np.dtype(_NUMPY_DTYPES[entry.dtype]).newbyteorder(">" if self.big_endian else "<")

    def read(self, name: str) -> np.ndarray:
        """The variable's value, a writable array in native byte order with the stored shape."""
        entry = self.entry(name)
        if entry.num_slices:
            raise ValueError(f"variable {name!r} is partitioned ({entry.num_slices} slices): not supported")
        dtype = self.dtype(name)
        count = math.prod(entry.shape)
        if count * dtype.itemsize != entry.size:
            raise ValueError(
                f"variable {name!r}: the index says {entry.size} bytes, shape {entry.shape} "
                f"of {dtype.name} needs {count * dtype.itemsize}"
            )
        path = self._data_path(entry.shard_id)
        buf = bytearray(entry.size)
        with open(path, "rb") as f:
            f.seek(entry.offset)
            got = f.readinto(buf)
        if got != entry.size:
            raise ValueError(
                f"{path} is truncated: variable {name!r} needs bytes up to {entry.offset + entry.size}, "
                f"the file has {path.stat().st_size}"
            )
        if self.verify and entry.crc32c is not None and masked_crc32c(buf) != entry.crc32c:
            raise ValueError(f"checksum mismatch for variable {name!r} in {path}: the file is corrupted")
        array = np.frombuffer(buf, dtype=dtype).reshape(entry.shape)
        return array.astype(dtype.newbyteorder("="), copy=False) if self.big_endian else array

    def read_all(self) -> dict[str, np.ndarray]:
        return {name: self.read(name) for name in self.keys()}


def _parse_header(buf: bytes) -> tuple[int, bool]:
    """BundleHeaderProto: int32 num_shards = 1; Endianness endianness = 2 (LITTLE 0, BIG 1)."""
    num_shards, big_endian = 1, False
    for field, _, value in _iter_fields(buf):
        if field == 1:
            num_shards = value
        elif field == 2:
            big_endian = value == 1
    return num_shards, big_endian
