"""Read TensorFlow checkpoint bundles (``model.index`` + ``model.data-*``) without TensorFlow.

A bundle is a prefix ``P`` with

- ``P.index``: a LevelDB-style sorted table (SSTable). Its last 48 bytes are the footer: the block
  handles (varint offset, varint size) of the metaindex and index blocks, zero padding, and the
  magic number ``0xdb4775248b80fb57`` (little-endian). The index block maps separator keys to the
  handles of the data blocks. Every block is followed by a 5-byte trailer: a type byte (0 = not
  compressed; TensorFlow writes no other) and the masked crc32c of block contents + type byte.
  A block holds entries ``varint shared, varint non_shared, varint value_length, key delta, value``
  (keys are prefix-compressed against the previous key), then the uint32 restart offsets and their
  count.
- In the data blocks, the empty key ``""`` holds a ``BundleHeaderProto`` (num_shards = 1,
  endianness = 2, version = 3); every other key is a tensor name whose value is a
  ``BundleEntryProto``: dtype = 1 (``DataType`` enum), shape = 2 (``TensorShapeProto``: repeated
  dim = 2 of ``{size = 1, name = 2}``, unknown_rank = 3), shard_id = 3, offset = 4, size = 5,
  crc32c = 6 (fixed32, masked), slices = 7.
- ``P.data-SSSSS-of-NNNNN``: shard ``SSSSS`` of ``NNNNN``, the raw little-endian tensor bytes.

The masked crc32c of each tensor's bytes and of each table block is verified on reading
(:mod:`utils.weights.crc32c`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from utils.weights.crc32c import crc32c, mask_crc

logger = logging.getLogger(__name__)

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5

# TensorFlow DataType enum -> little-endian numpy dtype (DT_BFLOAT16 is widened to float32).
DTYPES: Dict[int, Tuple[str, np.dtype]] = {
    1: ("float32", np.dtype("<f4")),
    2: ("float64", np.dtype("<f8")),
    3: ("int32", np.dtype("<i4")),
    4: ("uint8", np.dtype("u1")),
    5: ("int16", np.dtype("<i2")),
    6: ("int8", np.dtype("i1")),
    9: ("int64", np.dtype("<i8")),
    10: ("bool", np.dtype("?")),
    14: ("bfloat16", np.dtype("<u2")),
    17: ("uint16", np.dtype("<u2")),
    19: ("float16", np.dtype("<f2")),
    22: ("uint32", np.dtype("<u4")),
    23: ("uint64", np.dtype("<u8")),
}
DT_BFLOAT16 = 14


# ------------------------------------------------------------------------------------------- protobuf

def _varint(buf: bytes, pos: int, origin: str) -> Tuple[int, int]:
    """Decode a base-128 varint at ``pos`` -> (value, next position)."""
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError(f"{origin}: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"{origin}: varint longer than 10 bytes")


def parse_protobuf(buf: bytes, origin: str) -> Dict[int, List[Union[int, bytes]]]:
    """Split a protobuf message into ``{field number: [values]}``.

    Varints and fixed-width fields become ints (fixed fields little-endian unsigned), length-delimited
    fields bytes. Groups (wire types 3, 4) are rejected.
    """
    fields: Dict[int, List[Union[int, bytes]]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, origin)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"{origin}: protobuf field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, origin)
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise ValueError(f"{origin}: truncated fixed{width * 8} field {number}")
            value = int.from_bytes(buf[pos:pos + width], "little")
            pos += width
        elif wire == 2:
            length, pos = _varint(buf, pos, origin)
            if pos + length > len(buf):
                raise ValueError(f"{origin}: truncated field {number} ({length} bytes)")
            value = bytes(buf[pos:pos + length])
            pos += length
        else:
            raise ValueError(f"{origin}: unsupported protobuf wire type {wire} (field {number})")
        fields.setdefault(number, []).append(value)
    return fields


def _last_int(fields: Dict[int, List[Union[int, bytes]]], number: int, default: int, origin: str) -> int:
    values = fields.get(number)
    if not values:
        return default
    value = values[-1]
    if not isinstance(value, int):
        raise ValueError(f"{origin}: field {number} should be a number")
    return value


@dataclass(frozen=True)
class BundleEntry:
    """Where one tensor lives: ``BundleEntryProto`` decoded."""

    name: str
    dtype_enum: int
    shape: Tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int

    @property
    def dtype(self) -> str:
        """numpy name of the tensor's dtype ("float32", "int64", ...; "bfloat16" for DT_BFLOAT16)."""
        return DTYPES[self.dtype_enum][0]


def _parse_shape(buf: bytes, origin: str) -> Tuple[int, ...]:
    fields = parse_protobuf(buf, origin)
    if _last_int(fields, 3, 0, origin):
        raise ValueError(f"{origin}: shape of unknown rank")
    dims = []
    for dim in fields.get(2, []):
        if not isinstance(dim, bytes):
            raise ValueError(f"{origin}: malformed shape dimension")
        size = _last_int(parse_protobuf(dim, origin), 1, 0, origin)
        if size >= 1 << 63:
            raise ValueError(f"{origin}: negative (unknown) dimension in shape")
        dims.append(size)
    return tuple(dims)


def parse_bundle_entry(name: str, buf: bytes, origin: str) -> BundleEntry:
    """Decode the ``BundleEntryProto`` of tensor ``name``."""
    where = f"{origin}: entry {name!r}"
    fields = parse_protobuf(buf, where)
    if fields.get(7):
        raise ValueError(f"{where}: partitioned (sliced) tensors are not supported")
    dtype_enum = _last_int(fields, 1, 0, where)
    if dtype_enum not in DTYPES:
        raise ValueError(f"{where}: unsupported TensorFlow dtype enum {dtype_enum}")
    shape_values = fields.get(2, [])
    shape: Tuple[int, ...] = ()
    if shape_values:
        if not isinstance(shape_values[-1], bytes):
            raise ValueError(f"{where}: malformed shape")
        shape = _parse_shape(shape_values[-1], where)
    entry = BundleEntry(name=name, dtype_enum=dtype_enum, shape=shape, shard_id=_last_int(fields, 3, 0, where),
                        offset=_last_int(fields, 4, 0, where), size=_last_int(fields, 5, 0, where),
                        crc32c=_last_int(fields, 6, 0, where))
    expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype_enum][1].itemsize
    if entry.size != expected:
        raise ValueError(f"{where}: {entry.size} bytes stored for shape {shape} {entry.dtype} ({expected} expected)")
    return entry


# ---------------------------------------------------------------------------------------------- table

def _read_block(data: bytes, offset: int, size: int, origin: str) -> bytes:
    """Contents of the block at ``offset`` (``size`` bytes before its trailer), crc checked."""
    end = offset + size + BLOCK_TRAILER_SIZE
    if offset < 0 or end > len(data):
        raise ValueError(f"{origin}: block at offset {offset} (size {size}) runs past the end of the file "
                         f"({len(data)} bytes): truncated or not a checkpoint index")
    contents = data[offset:offset + size]
    block_type = data[offset + size]
    if block_type != 0:
        raise ValueError(f"{origin}: block at offset {offset} is compressed (type {block_type}); "
                         "only uncompressed blocks are supported")
    stored = int.from_bytes(data[offset + size + 1:end], "little")
    actual = mask_crc(crc32c(data[offset:offset + size + 1]))
    if stored != actual:
        raise ValueError(f"{origin}: crc32c mismatch in the block at offset {offset} (stored {stored:#010x}, "
                         f"computed {actual:#010x}): the index file is corrupt")
    return contents


def _block_entries(block: bytes, origin: str) -> List[Tuple[bytes, bytes]]:
    """(key, value) pairs of one table block, prefix-compressed keys expanded."""
    if len(block) < 4:
        raise ValueError(f"{origin}: table block of {len(block)} bytes is too short")
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise ValueError(f"{origin}: table block claims {num_restarts} restart points, more than fit")
    entries: List[Tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < limit:
        shared, pos = _varint(block, pos, origin)
        non_shared, pos = _varint(block, pos, origin)
        value_length, pos = _varint(block, pos, origin)
        if shared > len(key) or pos + non_shared + value_length > limit:
            raise ValueError(f"{origin}: corrupt table entry at block offset {pos}")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos:pos + value_length]))
        pos += value_length
    return entries


def _block_handle(buf: bytes, pos: int, origin: str) -> Tuple[int, int, int]:
    offset, pos = _varint(buf, pos, origin)
    size, pos = _varint(buf, pos, origin)
    return offset, size, pos


def read_table(path: Path) -> List[Tuple[bytes, bytes]]:
    """All (key, value) pairs of a LevelDB-format table file, in key order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated, corrupt or not a table (the message names the file).
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint index not found: {path}")
    data = path.read_bytes()
    origin = str(path)
    if len(data) < FOOTER_SIZE:
        raise ValueError(f"{origin}: {len(data)} bytes, too short for a checkpoint index (truncated?)")
    footer = data[-FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != TABLE_MAGIC:
        raise ValueError(f"{origin}: no table magic number at the end: truncated or not a TensorFlow checkpoint index")
    _, _, pos = _block_handle(footer, 0, origin)
    index_offset, index_size, _ = _block_handle(footer, pos, origin)
    entries: List[Tuple[bytes, bytes]] = []
    for _, handle in _block_entries(_read_block(data, index_offset, index_size, origin), origin):
        offset, size, _ = _block_handle(handle, 0, origin)
        entries.extend(_block_entries(_read_block(data, offset, size, origin), origin))
    keys = [k for k, _ in entries]
    if any(a >= b for a, b in zip(keys, keys[1:])):
        raise ValueError(f"{origin}: table keys are not in strictly increasing order: corrupt index")
    return entries


# --------------------------------------------------------------------------------------------- reader

def resolve_prefix(path_or_prefix: Union[str, Path]) -> Path:
    """The bundle prefix of a checkpoint directory (its ``checkpoint`` file's ``model_checkpoint_path``),
    of a prefix (``DIR/model``) or of its ``.index`` file.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: the ``checkpoint`` file names no ``model_checkpoint_path``.
    """
    path = Path(path_or_prefix)
    if path.is_dir():
        state = path / "checkpoint"
        if not state.is_file():
            candidates = sorted(path.glob("*.index"))
            if len(candidates) == 1:
                return candidates[0].with_suffix("")
            raise FileNotFoundError(f"no 'checkpoint' file in checkpoint directory {path}")
        prefix: Optional[str] = None
        for line in state.read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model_checkpoint_path":
                prefix = value.strip().strip('"')
        if not prefix:
            raise ValueError(f"{state}: no model_checkpoint_path line")
        result = Path(prefix) if Path(prefix).is_absolute() else path / prefix
        if not Path(str(result) + ".index").is_file():
            raise FileNotFoundError(f"{state} names {prefix!r} but {result}.index does not exist")
        return result
    if path.suffix == ".index" and path.is_file():
        return path.with_suffix("")
    if Path(str(path) + ".index").is_file():
        return path
    raise FileNotFoundError(f"TensorFlow checkpoint not found: {path} (neither a directory nor a prefix with "
                            f"{path.name}.index)")


class TFCheckpointReader:
    """Tensors of a TensorFlow checkpoint bundle as numpy arrays, without TensorFlow.

    Args:
        path_or_prefix: a checkpoint directory (uses its ``checkpoint`` file), a bundle prefix
            (``DIR/model``) or the ``.index`` file.

    Raises:
        FileNotFoundError: the checkpoint, or a data shard it names, does not exist.
        ValueError: a truncated or corrupt index (naming the file).
    """

    def __init__(self, path_or_prefix: Union[str, Path]) -> None:
        self.prefix = resolve_prefix(path_or_prefix)
        self.index_path = Path(str(self.prefix) + ".index")
        origin = str(self.index_path)
        self.num_shards = 1
        self._entries: Dict[str, BundleEntry] = {}
        header_seen = False
        for key, value in read_table(self.index_path):
            if key == b"":
                header = parse_protobuf(value, f"{origin}: bundle header")
                self.num_shards = _last_int(header, 1, 1, origin)
                endianness = _last_int(header, 2, 0, origin)
                if endianness != 0:
                    raise ValueError(f"{origin}: big-endian bundles are not supported")
                header_seen = True
                continue
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{origin}: tensor name {key[:60]!r} is not UTF-8") from None
            self._entries[name] = parse_bundle_entry(name, value, origin)
        if not header_seen:
            raise ValueError(f"{origin}: no bundle header (empty key): not a TensorFlow checkpoint index")
        if self.num_shards < 1:
            raise ValueError(f"{origin}: bundle header says {self.num_shards} shards")
        for entry in self._entries.values():
            if not 0 <= entry.shard_id < self.num_shards:
                raise ValueError(f"{origin}: tensor {entry.name!r} is in shard {entry.shard_id} of {self.num_shards}")
        logger.debug("%s: %d tensors in %d shard(s)", origin, len(self._entries), self.num_shards)

    def shard_path(self, shard_id: int) -> Path:
        """``PREFIX.data-SSSSS-of-NNNNN`` of shard ``shard_id``."""
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def names(self) -> List[str]:
        """Tensor names, sorted (the index order)."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> BundleEntry:
        """The index entry of ``name``; ValueError naming it when absent."""
        entry = self._entries.get(name)
        if entry is None:
            raise ValueError(f"{self.index_path}: no tensor named {name!r}")
        return entry

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.entry(name).shape

    def dtype(self, name: str) -> str:
        """numpy dtype name of ``name`` ("float32", "int64", "bfloat16", ...)."""
        return self.entry(name).dtype

    def _read_bytes(self, entry: BundleEntry) -> bytes:
        path = self.shard_path(entry.shard_id)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint data shard not found: {path}")
        with path.open("rb") as handle:
            handle.seek(entry.offset)
            raw = handle.read(entry.size)
        if len(raw) != entry.size:
            raise ValueError(f"{path}: tensor {entry.name!r} at bytes {entry.offset}..{entry.offset + entry.size} "
                             f"lies past the end of the file: truncated data file")
        return raw

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a numpy array (bfloat16 widened to float32), crc32c verified.

        Raises:
            FileNotFoundError: its data shard is missing.
            ValueError: unknown name, data past the end of the shard, or a crc32c mismatch (naming the tensor).
        """
        entry = self.entry(name)
        raw = self._read_bytes(entry)
        actual = mask_crc(crc32c(raw))
        if actual != entry.crc32c:
            raise ValueError(f"{self.shard_path(entry.shard_id)}: crc32c mismatch in tensor {name!r} "
                             f"(index {entry.crc32c:#010x}, data {actual:#010x}): the checkpoint is corrupt")
        array = np.frombuffer(raw, dtype=DTYPES[entry.dtype_enum][1]).reshape(entry.shape)
        if entry.dtype_enum == DT_BFLOAT16:
            return (array.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return array.astype(array.dtype.newbyteorder("="), copy=True)

    def read_all(self) -> Dict[str, np.ndarray]:
        """Every tensor, by name."""
        return {name: self.read(name) for name in self._entries}
