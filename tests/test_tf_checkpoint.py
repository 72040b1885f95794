"""utils/weights/tf_checkpoint.py: TF checkpoint bundles read without TensorFlow."""
from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from utils.weights.crc32c import _raw_crc_python, crc32c, mask_crc
from utils.weights.tf_checkpoint import TABLE_MAGIC, TFCheckpointReader, parse_protobuf, resolve_prefix

PROBE = "resample_p6/conv2d/kernel"  # 1x1x320x64 float32, large enough for the vectorised crc path


# ------------------------------------------------------------------ a minimal bundle writer (for tests)

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _entry_proto(dtype: int, shape: Tuple[int, ...], shard: int, offset: int, data: bytes) -> bytes:
    dims = b"".join(_field(2, 2, _varint(len(d)) + d) for d in (_field(1, 0, _varint(s)) for s in shape))
    out = _field(1, 0, _varint(dtype)) + _field(2, 2, _varint(len(dims)) + dims)
    if shard:
        out += _field(3, 0, _varint(shard))
    if offset:
        out += _field(4, 0, _varint(offset))
    out += _field(5, 0, _varint(len(data))) + _field(6, 5, struct.pack("<I", mask_crc(crc32c(data))))
    return out


def _block(entries: List[Tuple[bytes, bytes]], restart_interval: int = 2) -> bytes:
    """A table block with prefix-compressed keys (restart every ``restart_interval`` entries)."""
    out = bytearray()
    restarts = []
    previous = b""
    for i, (key, value) in enumerate(entries):
        if i % restart_interval == 0:
            restarts.append(len(out))
            shared = 0
        else:
            shared = 0
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        previous = key
    for r in restarts or [0]:
        out += struct.pack("<I", r)
    out += struct.pack("<I", len(restarts or [0]))
    return bytes(out)


def write_bundle(prefix: Path, tensors: Dict[str, Tuple[int, np.ndarray, int]], num_shards: int,
                 entries_per_block: int = 3) -> None:
    """Write ``{name: (dtype enum, little-endian array, shard)}`` as a TF bundle (uncompressed table)."""
    shard_data = [bytearray() for _ in range(num_shards)]
    entries = [(b"", _field(1, 0, _varint(num_shards)) + _field(3, 2, _varint(2) + _field(1, 0, _varint(1))))]
    for name in sorted(tensors):
        dtype, array, shard = tensors[name]
        data = array.tobytes()
        entries.append((name.encode(), _entry_proto(dtype, array.shape, shard, len(shard_data[shard]), data)))
        shard_data[shard] += data
    for shard, data in enumerate(shard_data):
        Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}").write_bytes(bytes(data))

    table = bytearray()
    index_entries = []

    def add_block(contents: bytes) -> Tuple[int, int]:
        offset = len(table)
        trailer = b"\x00" + struct.pack("<I", mask_crc(crc32c(contents + b"\x00")))
        table.extend(contents + trailer)
        return offset, len(contents)

    for start in range(0, len(entries), entries_per_block):
        chunk = entries[start:start + entries_per_block]
        offset, size = add_block(_block(chunk))
        index_entries.append((chunk[-1][0] + b"\xff", _varint(offset) + _varint(size)))
    meta = add_block(_block([]))
    index = add_block(_block(index_entries, restart_interval=1))
    handles = _varint(meta[0]) + _varint(meta[1]) + _varint(index[0]) + _varint(index[1])
    footer = handles + b"\x00" * (40 - len(handles)) + struct.pack("<Q", TABLE_MAGIC)
    Path(f"{prefix}.index").write_bytes(bytes(table) + footer)


# -------------------------------------------------------------------------------------------- crc32c

def test_crc32c_known_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def test_crc32c_vectorised_path_equals_bytewise():
    rng = np.random.default_rng(0)
    for size in (32767, 32768, 32768 + 4095, 100003, 4096 * 64):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc32c(data) == _raw_crc_python(data, 0xFFFFFFFF) ^ 0xFFFFFFFF, size


def test_crc32c_differs_from_zlib_crc32():
    # Castagnoli, not the IEEE polynomial of zlib.
    assert crc32c(b"123456789") != zlib.crc32(b"123456789")


def test_parse_protobuf_fields():
    message = _field(1, 0, _varint(300)) + _field(2, 2, _varint(3) + b"abc") + _field(6, 5, struct.pack("<I", 7))
    assert parse_protobuf(message, "m") == {1: [300], 2: [b"abc"], 6: [7]}
    with pytest.raises(ValueError, match="truncated"):
        parse_protobuf(message[:-2], "m")


# ---------------------------------------------------------------------------------- the shared bundle

def test_reads_every_tensor_with_the_listed_shape_and_dtype(reader):
    tensors = reader.read_all()
    assert list(tensors) == reader.names() and len(tensors) > 1000
    for name, array in tensors.items():
        assert array.shape == reader.shape(name), name
        assert array.dtype == np.dtype(reader.dtype(name)), name
    assert reader.dtype("global_step") == "int64" and reader.shape("global_step") == ()
    assert reader.shape(PROBE) == (1, 1, 320, 64)
    assert reader.shape("fpn_cells/cell_0/fnode0/WSM") == ()
    # Shadows are distinct tensors from the raw variables in this seeded bundle.
    assert not np.array_equal(tensors[PROBE], tensors[PROBE + "/ExponentialMovingAverage"])


def test_directory_prefix_and_index_path_are_equivalent(bundle_dir, reader):
    assert resolve_prefix(bundle_dir) == bundle_dir / "model"
    for source in (bundle_dir / "model", bundle_dir / "model.index", str(bundle_dir / "model")):
        other = TFCheckpointReader(source)
        assert other.names() == reader.names()
        np.testing.assert_array_equal(other.read(PROBE), reader.read(PROBE))


def test_unknown_tensor_and_missing_checkpoint(reader, tmp_path):
    with pytest.raises(ValueError, match="no/such"):
        reader.read("no/such")
    with pytest.raises(FileNotFoundError, match="nothing"):
        TFCheckpointReader(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        TFCheckpointReader(tmp_path)  # empty directory


def _copy_bundle(bundle_dir: Path, target: Path) -> Path:
    target.mkdir()
    for item in bundle_dir.iterdir():
        shutil.copyfile(item, target / item.name)
    return target


def test_corrupted_data_byte_names_the_tensor(bundle_dir, reader, tmp_path):
    copy = _copy_bundle(bundle_dir, tmp_path / "ckpt")
    entry = reader.entry(PROBE)
    data_path = copy / "model.data-00000-of-00001"
    data = bytearray(data_path.read_bytes())
    data[entry.offset + entry.size // 2] ^= 0x40
    data_path.write_bytes(bytes(data))
    corrupt = TFCheckpointReader(copy)
    with pytest.raises(ValueError, match=f"crc32c mismatch in tensor '{PROBE}'"):
        corrupt.read(PROBE)
    with pytest.raises(ValueError, match=PROBE):
        corrupt.read_all()
    # Neighbours are intact.
    np.testing.assert_array_equal(corrupt.read("resample_p6/conv2d/bias"), reader.read("resample_p6/conv2d/bias"))


def test_small_tensor_corruption_is_detected(bundle_dir, reader, tmp_path):
    copy = _copy_bundle(bundle_dir, tmp_path / "ckpt")
    name = "fpn_cells/cell_0/fnode0/WSM/ExponentialMovingAverage"
    entry = reader.entry(name)
    data_path = copy / "model.data-00000-of-00001"
    data = bytearray(data_path.read_bytes())
    data[entry.offset] ^= 0x01
    data_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=name):
        TFCheckpointReader(copy).read(name)


def test_truncated_index_is_a_clear_error(bundle_dir, tmp_path):
    copy = _copy_bundle(bundle_dir, tmp_path / "ckpt")
    index = copy / "model.index"
    full = index.read_bytes()
    for cut in (len(full) // 2, 20, 0):
        index.write_bytes(full[:cut])
        with pytest.raises(ValueError, match=r"model\.index.*(truncated|too short)"):
            TFCheckpointReader(copy)


def test_garbage_index_and_corrupt_block_are_clear_errors(bundle_dir, tmp_path):
    copy = _copy_bundle(bundle_dir, tmp_path / "ckpt")
    index = copy / "model.index"
    full = bytearray(index.read_bytes())
    index.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"model\.index: no table magic"):
        TFCheckpointReader(copy)
    full[100] ^= 0xFF  # inside the first data block
    index.write_bytes(bytes(full))
    with pytest.raises(ValueError, match=r"model\.index: crc32c mismatch in the block"):
        TFCheckpointReader(copy)


def test_truncated_data_file_names_the_tensor(bundle_dir, reader, tmp_path):
    copy = _copy_bundle(bundle_dir, tmp_path / "ckpt")
    data_path = copy / "model.data-00000-of-00001"
    last = max(reader.names(), key=lambda n: reader.entry(n).offset)
    data_path.write_bytes(data_path.read_bytes()[:reader.entry(last).offset + 1])
    with pytest.raises(ValueError, match="truncated data file"):
        TFCheckpointReader(copy).read(last)


# --------------------------------------------------------------------------- synthetic bundles

def test_multi_shard_bundle_with_several_dtypes(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        "a/kernel": (1, rng.standard_normal((3, 3, 4, 5)).astype("<f4"), 0),
        "a/kernel/ExponentialMovingAverage": (1, rng.standard_normal((3, 3, 4, 5)).astype("<f4"), 1),
        "b/bias": (2, rng.standard_normal(7).astype("<f8"), 1),
        "global_step": (9, np.array(12345, dtype="<i8"), 0),
        "counts": (3, np.arange(6, dtype="<i4").reshape(2, 3), 2),
        "half": (19, np.array([1.5, -2.0], dtype="<f2"), 2),
        "big": (1, rng.standard_normal(20000).astype("<f4"), 0),
    }
    write_bundle(tmp_path / "model", tensors, num_shards=3)
    reader = TFCheckpointReader(tmp_path / "model")
    assert reader.num_shards == 3
    assert reader.names() == sorted(tensors)
    assert reader.shard_path(2).name == "model.data-00002-of-00003"
    for name, (_, array, _) in tensors.items():
        got = reader.read(name)
        assert got.dtype == array.dtype.newbyteorder("=") and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
    bf16 = np.array([0x3FC0, 0xC000], dtype="<u2")  # 1.5, -2.0 as bfloat16
    write_bundle(tmp_path / "bf", {"x": (14, bf16, 0)}, num_shards=1)
    bf_reader = TFCheckpointReader(tmp_path / "bf")
    assert bf_reader.dtype("x") == "bfloat16"
    np.testing.assert_array_equal(bf_reader.read("x"), np.array([1.5, -2.0], dtype=np.float32))


def test_missing_shard_is_named(tmp_path):
    write_bundle(tmp_path / "model", {"x": (1, np.ones(3, "<f4"), 1), "y": (1, np.ones(2, "<f4"), 0)}, num_shards=2)
    (tmp_path / "model.data-00001-of-00002").unlink()
    reader = TFCheckpointReader(tmp_path / "model")
    np.testing.assert_array_equal(reader.read("y"), np.ones(2, np.float32))
    with pytest.raises(FileNotFoundError, match="model.data-00001-of-00002"):
        reader.read("x")


def test_checkpoint_file_names_the_prefix(tmp_path):
    write_bundle(tmp_path / "model.ckpt-100", {"x": (1, np.ones(3, "<f4"), 0)}, num_shards=1)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-100"\n'
                                         'all_model_checkpoint_paths: "model.ckpt-100"\n')
    assert TFCheckpointReader(tmp_path).prefix == tmp_path / "model.ckpt-100"
    (tmp_path / "checkpoint").write_text("something else\n")
    with pytest.raises(ValueError, match="model_checkpoint_path"):
        TFCheckpointReader(tmp_path)
