"""crc32c (Castagnoli, reflected polynomial ``0x82f63b78``) and TensorFlow's masked form
(``mask(c) = rotr(c, 15) + 0xa282ead8``), computed with numpy: many lanes of the data at once, the lanes
then combined with GF(2) "advance by n zero bytes" operators."""
from __future__ import annotations

from typing import List, Union

import numpy as np

CRC_MASK_DELTA = 0xA282EAD8
CRC32C_POLY = 0x82F63B78


def _make_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ CRC32C_POLY if c & 1 else c >> 1
        table[n] = c
    return table


_TABLE = _make_table()
_TABLE_LIST = [int(v) for v in _TABLE]
_BITS = np.arange(32, dtype=np.uint32)
_LANES = 4096
_SMALL = 8 * _LANES


def _apply(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """GF(2) matrix (32 column words) times each uint32 of ``vector``."""
    bits = (vector[..., None] >> _BITS) & np.uint32(1)
    return np.bitwise_xor.reduce(np.where(bits.astype(bool), matrix, np.uint32(0)), axis=-1)


def _one_zero_byte_operator() -> np.ndarray:
    columns = np.left_shift(np.uint32(1), _BITS)
    return (columns >> np.uint32(8)) ^ _TABLE[columns & np.uint32(0xFF)]


_ZERO_BYTE = _one_zero_byte_operator()
_POWERS: List[np.ndarray] = [_ZERO_BYTE]  # _POWERS[k] advances the raw register over 2**k zero bytes


def _zeros_operator(count: int) -> np.ndarray:
    """Operator advancing the raw (init 0, no final xor) CRC register over ``count`` zero bytes."""
    result = np.left_shift(np.uint32(1), _BITS)  # identity
    k = 0
    while count:
        while len(_POWERS) <= k:
            _POWERS.append(_apply(_POWERS[-1], _POWERS[-1]))
        if count & 1:
            result = _apply(_POWERS[k], result)
        count >>= 1
        k += 1
    return result


def _raw_crc_python(data: bytes, crc: int) -> int:
    table = _TABLE_LIST
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def _raw_crc_lanes(data: np.ndarray) -> int:
    """Raw CRC (init 0) of ``data`` (uint8, length a multiple of ``_LANES``), all lanes at once."""
    lanes = data.reshape(_LANES, -1)
    length = lanes.shape[1]
    state = np.zeros(_LANES, dtype=np.uint32)
    columns = np.ascontiguousarray(lanes.T).astype(np.uint32)
    for j in range(length):
        state = _TABLE[(state ^ columns[j]) & np.uint32(0xFF)] ^ (state >> np.uint32(8))
    # Tree combination: crc(A || B) = advance(crc(A), |B|) ^ crc(B) for init-0 registers.
    span = length
    while state.shape[0] > 1:
        state = _apply(_zeros_operator(span), state[0::2]) ^ state[1::2]
        span *= 2
    return int(state[0])


def crc32c(data: Union[bytes, bytearray, memoryview, np.ndarray]) -> int:
    """CRC-32C (Castagnoli) of ``data``, as ``crc32c::Value`` in TensorFlow / LevelDB."""
    if isinstance(data, np.ndarray):
        data = data.tobytes()
    buffer = np.frombuffer(data, dtype=np.uint8)
    size = buffer.shape[0]
    if size < _SMALL:
        return _raw_crc_python(buffer.tobytes(), 0xFFFFFFFF) ^ 0xFFFFFFFF
    bulk = size - size % _LANES
    raw = _raw_crc_lanes(buffer[:bulk])
    init = int(_apply(_zeros_operator(bulk), np.array([0xFFFFFFFF], dtype=np.uint32))[0])
    crc = _raw_crc_python(buffer[bulk:].tobytes(), raw ^ init)
    return crc ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """LevelDB / TensorFlow crc masking: rotate right by 15 bits and add a constant."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + CRC_MASK_DELTA) & 0xFFFFFFFF
