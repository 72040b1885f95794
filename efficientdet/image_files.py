"""Image files: a cheap check without decoding (header and end marker of each file, before the first
training step), and decoding that refuses broken files, naming them."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import (Any, BinaryIO, Callable, Dict, List, Mapping, NamedTuple, Optional, Protocol, Sequence, Tuple,
                    Union)

import cv2
import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

#: Bytes read at the end of a file to find its end marker (JPEG ``FF D9``, PNG ``IEND``, GIF ``3B``).
TAIL_BYTES = 4096
#: :func:`verify_image_files` shows a tqdm bar above this many images (with ``progress``).
PROGRESS_MIN_IMAGES = 200
#: Kinds of :class:`ImageProblem` / :class:`BadImageError`.
PROBLEM_KINDS = ("missing", "empty", "unreadable", "unknown_format", "corrupt_header", "truncated", "decode_failed")
#: JPEG start-of-frame markers (they hold the image size); C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_MAX_JPEG_SEGMENTS = 4096
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # the IEND chunk type and its CRC


class ImageInfo(NamedTuple):
    """What an image file's header says.

    ``format``: ``'jpeg'``, ``'png'``, ``'bmp'``, ``'webp'``, ``'gif'``, ``'tiff'``, ``'jpeg2000'``, ``'avif'``,
    ``'pnm'``, ``'pfm'``, ``'hdr'`` or ``'sunraster'``; ``width`` / ``height`` in pixels as stored (before any
    EXIF rotation), None where not parsed (TIFF, JPEG 2000, AVIF, PNM, PFM, HDR); ``size``: file size in bytes.
    """

    format: str
    width: Optional[int]
    height: Optional[int]
    size: int


class ImageProblem(NamedTuple):
    """One bad image of a set: its COCO id, file, ``kind`` (one of :data:`PROBLEM_KINDS`) and a one-line reason."""

    image_id: int
    path: Path
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} (image id {self.image_id}): {self.reason}"


class BadImageError(ValueError):
    """An image file that cannot be used (a ``ValueError`` whose message names the file and the image id).

    Attributes: ``path``, ``kind`` (one of :data:`PROBLEM_KINDS`), ``reason``, ``image_id`` (None if unknown).
    Constructible from the message alone (DataLoader workers re-raise exceptions that way).
    """

    def __init__(self, message: str, path: Union[str, Path, None] = None, kind: str = "decode_failed",
                 reason: str = "", image_id: Optional[int] = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.kind = kind
        self.reason = reason or message
        self.image_id = image_id


class _FormatError(Exception):
    """Raised by the parsers below: ``kind`` and a reason; the callers add the file name."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class _ByteSource(Protocol):
    size: int

    def read(self, offset: int, count: int) -> bytes: ...


class _MemorySource:
    """The bytes of a whole file, in memory (decode time)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read(self, offset: int, count: int) -> bytes:
        return self.data[offset:offset + count]


class _FileSource:
    """An open file, read only where asked (construction time: the header and the tail)."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.size = size

    def read(self, offset: int, count: int) -> bytes:
        self.handle.seek(offset)
        return self.handle.read(count)


def _be16(data: bytes) -> int:
    return int.from_bytes(data[:2], "big")


def _le16(data: bytes) -> int:
    return int.from_bytes(data[:2], "little")


def _le32(data: bytes) -> int:
    return int.from_bytes(data[:4], "little")


def _tail(source: _ByteSource, start: int = 0) -> bytes:
    """The last :data:`TAIL_BYTES` bytes of ``source``, not before ``start``."""
    begin = max(start, source.size - TAIL_BYTES)
    return source.read(begin, source.size - begin)


def _sniff(head: bytes) -> Optional[str]:
    """The image format of a file starting with ``head`` (magic bytes), None if unknown."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\xff\x4f\xff\x51") or head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"):
        return "jpeg2000"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "avif"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n#":
        return "pnm"
    if head[:3] in (b"PF\n", b"Pf\n", b"PF\r", b"Pf\r"):
        return "pfm"
    if head.startswith(b"#?RADIANCE") or head.startswith(b"#?RGBE"):
        return "hdr"
    if head.startswith(b"\x59\xa6\x6a\x95"):
        return "sunraster"
    return None


def _jpeg(source: _ByteSource, head: bytes) -> Tuple[int, int]:
    """Walk the JPEG segments up to the first scan (SOS) for the frame size, then look for the end marker.

    ``FF D9`` cannot occur in entropy-coded data (an ``FF`` there is followed by ``00`` or a restart marker),
    so an ``FF D9`` among the last :data:`TAIL_BYTES` bytes after the scan start is the end of the image;
    padding or other trailing bytes after it are allowed.
    """
    pos, width, height, scan = 2, None, None, None
    for _ in range(_MAX_JPEG_SEGMENTS):
        marker = source.read(pos, 4)
        if len(marker) < 2:
            raise _FormatError("truncated", f"file ends in the JPEG header (byte {pos}): truncated")
        if marker[0] != 0xFF:
            raise _FormatError("corrupt_header", f"corrupt JPEG header: no marker at byte {pos}")
        code = marker[1]
        if code == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if code == 0xD9:
            raise _FormatError("corrupt_header", "JPEG end marker before any image data")
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # markers without a length
            pos += 2
            continue
        if code < 0xC0:
            raise _FormatError("corrupt_header", f"corrupt JPEG header: no marker FF {code:02X} exists (byte {pos})")
        if len(marker) < 4:
            raise _FormatError("truncated", f"file ends in the JPEG header (byte {pos}): truncated")
        length = _be16(marker[2:])
        if length < 2:
            raise _FormatError("corrupt_header", f"corrupt JPEG header: segment length {length} at byte {pos}")
        if code in _JPEG_SOF:
            frame = source.read(pos + 4, 5)
            if len(frame) < 5:
                raise _FormatError("truncated", "file ends in the JPEG frame header: truncated")
            height, width = _be16(frame[1:3]), _be16(frame[3:5])
        if code == 0xDA:
            scan = pos + 2 + length
            break
        pos += 2 + length
    else:
        raise _FormatError("corrupt_header", f"corrupt JPEG header: no image data after {_MAX_JPEG_SEGMENTS} segments")
    if width is None or height is None:
        raise _FormatError("corrupt_header", "corrupt JPEG header: image data before the frame header (SOF)")
    if width == 0 or height == 0:
        raise _FormatError("corrupt_header", f"JPEG frame header gives size {width}x{height}")
    if scan >= source.size or _tail(source, scan).rfind(b"\xff\xd9") < 0:
        raise _FormatError("truncated", "no JPEG end marker (FF D9) at the end of the file: truncated")
    return width, height


def _png(source: _ByteSource, head: bytes) -> Tuple[int, int]:
    """IHDR must be the first chunk (the size); the IEND chunk must end the file (trailing bytes allowed)."""
    if len(head) < 24:
        raise _FormatError("truncated", "file ends in the PNG header: truncated")
    if head[12:16] != b"IHDR":
        raise _FormatError("corrupt_header", "corrupt PNG header: the first chunk is not IHDR")
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if width == 0 or height == 0:
        raise _FormatError("corrupt_header", f"PNG header gives size {width}x{height}")
    if _PNG_IEND not in _tail(source, 24):
        raise _FormatError("truncated", "no PNG IEND chunk at the end of the file: truncated")
    return width, height


def _bmp(source: _ByteSource, head: bytes) -> Tuple[int, int]:
    """Size from the DIB header; the file must be as long as the BMP header declares (when it does)."""
    declared, dib = _le32(head[2:6]), _le32(head[14:18])
    if dib == 12:  # BITMAPCOREHEADER: 16-bit sides
        width, height = _le16(head[18:20]), _le16(head[20:22])
    else:
        width = int.from_bytes(head[18:22], "little", signed=True)
        height = abs(int.from_bytes(head[22:26], "little", signed=True))  # negative: rows top-down
    if width <= 0 or height == 0:
        raise _FormatError("corrupt_header", f"BMP header gives size {width}x{height}")
    if declared and source.size < declared:
        raise _FormatError("truncated", f"BMP header declares {declared} bytes, the file has {source.size}: truncated")
    return width, height


def _webp(source: _ByteSource, head: bytes) -> Tuple[Optional[int], Optional[int]]:
    """The RIFF length must fit in the file; size from the VP8 / VP8L / VP8X chunk."""
    declared = _le32(head[4:8]) + 8
    if source.size < declared:
        raise _FormatError("truncated", f"WebP header declares {declared} bytes, the file has {source.size}: truncated")
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30:
        return _le16(head[26:28]) & 0x3FFF, _le16(head[28:30]) & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25:
        bits = _le32(head[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None, None


def _gif(source: _ByteSource, head: bytes) -> Tuple[int, int]:
    """Size from the logical screen descriptor; the file must end with the trailer ``3B`` (padding allowed)."""
    if len(head) < 10:
        raise _FormatError("truncated", "file ends in the GIF header: truncated")
    if not _tail(source, 10).rstrip(b"\x00").endswith(b";"):
        raise _FormatError("truncated", "no GIF trailer (3B) at the end of the file: truncated")
    return _le16(head[6:8]), _le16(head[8:10])


def _sunraster(source: _ByteSource, head: bytes) -> Tuple[int, int]:
    if len(head) < 12:
        raise _FormatError("truncated", "file ends in the Sun raster header: truncated")
    return int.from_bytes(head[4:8], "big"), int.from_bytes(head[8:12], "big")


_PARSERS: Dict[str, Callable[[_ByteSource, bytes], Tuple[Optional[int], Optional[int]]]] = {
    "jpeg": _jpeg, "png": _png, "bmp": _bmp, "webp": _webp, "gif": _gif, "sunraster": _sunraster}


def _inspect(source: _ByteSource) -> ImageInfo:
    """Format, size and completeness of an image from its header and tail; raises :class:`_FormatError`."""
    if source.size == 0:
        raise _FormatError("empty", "empty file (0 bytes)")
    head = source.read(0, 32)
    fmt = _sniff(head)
    if fmt is None:
        raise _FormatError("unknown_format", f"not an image of a known format (first bytes: {head[:8].hex(' ')})")
    parser = _PARSERS.get(fmt)
    width, height = parser(source, head) if parser is not None else (None, None)
    return ImageInfo(fmt, width, height, source.size)


def _where(path: Path, image_id: Optional[int]) -> str:
    return f"{path}" + (f" (image id {image_id})" if image_id is not None else "")


def inspect_image_file(path: Union[str, Path], image_id: Optional[int] = None) -> ImageInfo:
    """Check one image file without decoding it: the header and the last :data:`TAIL_BYTES` bytes only.

    Known formats by magic bytes (JPEG, PNG, BMP, WebP, GIF, TIFF, JPEG 2000, AVIF, PNM, PFM, Radiance HDR, Sun
    raster); truncation is detected for JPEG (no end marker ``FF D9`` after the image data), PNG (no IEND
    chunk), GIF (no trailer), BMP and WebP (shorter than their header declares). A JPEG followed by more than
    :data:`TAIL_BYTES` bytes of other data (e.g. a motion photo's video) reads as truncated.

    Raises:
        FileNotFoundError: no such file ("image file not found: PATH (image id N)").
        BadImageError: (a ValueError) empty, unreadable, unknown format, corrupt header or truncated, naming
            the file, the image id and the reason.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _inspect(_FileSource(handle, os.fstat(handle.fileno()).st_size))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {_where(path, image_id)}") from None
    except _FormatError as exc:
        raise BadImageError(f"cannot read image {_where(path, image_id)}: {exc.reason}", path, exc.kind,
                            exc.reason, image_id) from None
    except OSError as exc:  # a directory, no permission, an I/O error
        reason = f"cannot read the file ({exc.strerror or exc})"
        raise BadImageError(f"cannot read image {_where(path, image_id)}: {reason}", path, "unreadable", reason,
                            image_id) from None


def read_image(path: Union[str, Path], image_id: Optional[int] = None) -> np.ndarray:
    """Read and decode an image file: ``np.ndarray[H, W, 3] uint8``, BGR (as ``cv2.imread(path)``).

    The bytes get the checks of :func:`inspect_image_file` first (in memory), so a truncated JPEG is an
    error instead of an image completed in grey by libjpeg; then ``cv2.imdecode(..., cv2.IMREAD_COLOR)``
    (EXIF orientation applied, as ``cv2.imread``).

    Raises:
        FileNotFoundError: no such file, naming it and the image id.
        BadImageError: (a ValueError) unreadable, empty, unknown format, corrupt header, truncated, or OpenCV
            cannot decode it; naming the file, the image id and the reason.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {_where(path, image_id)}") from None
    except OSError as exc:
        reason = f"cannot read the file ({exc.strerror or exc})"
        raise BadImageError(f"cannot read image {_where(path, image_id)}: {reason}", path, "unreadable", reason,
                            image_id) from None
    try:
        _inspect(_MemorySource(data))
    except _FormatError as exc:
        raise BadImageError(f"cannot read image {_where(path, image_id)}: {exc.reason}", path, exc.kind,
                            exc.reason, image_id) from None
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        reason = "OpenCV cannot decode it (corrupt image data)"
        raise BadImageError(f"cannot read image {_where(path, image_id)}: {reason}", path, "decode_failed", reason,
                            image_id)
    return image


def _check_file(image_id: int, path: Path) -> Tuple[Optional[ImageInfo], Optional[ImageProblem]]:
    """(info, None) for a good file, (None, problem) for a bad one."""
    try:
        return inspect_image_file(path, image_id), None
    except FileNotFoundError:
        return None, ImageProblem(image_id, path, "missing", "image file not found")
    except BadImageError as exc:
        return None, ImageProblem(image_id, path, exc.kind, exc.reason)


def verify_image_files(images: Sequence[Tuple[int, Union[str, Path]]], progress: bool = True,
                       expected_sizes: Optional[Mapping[int, Tuple[int, int]]] = None,
                       desc: str = "checking images") -> List[ImageProblem]:
    """Check ``(image_id, path)`` pairs with :func:`inspect_image_file` (header and tail, no decoding).

    Returns the problems in the order given (empty: all good). With ``progress``, a tqdm bar above
    :data:`PROGRESS_MIN_IMAGES` images. ``expected_sizes`` maps image ids to the ``(width, height)`` of the
    annotation file: images whose header says otherwise are logged (one warning for all), not problems.
    """
    problems: List[ImageProblem] = []
    mismatched: List[str] = []
    bar = tqdm(images, desc=desc, unit="img", leave=False,
               disable=not progress or len(images) <= PROGRESS_MIN_IMAGES)
    for image_id, path in bar:
        info, problem = _check_file(image_id, Path(path))
        if problem is not None:
            problems.append(problem)
        expected = expected_sizes.get(image_id) if expected_sizes is not None and info is not None else None
        if expected is not None and info.width is not None and (info.width, info.height) != tuple(expected):
            mismatched.append(f"{path} (image id {image_id}) is {info.width}x{info.height}, "
                              f"listed as {expected[0]}x{expected[1]}")
    if mismatched:
        logger.warning("%d of %d images differ in size from their annotation entry (boxes are used as given; "
                       "EXIF-rotated JPEGs decode rotated); first: %s", len(mismatched), len(images), mismatched[0])
    return problems


class DatasetImages(Protocol):
    """What :func:`verify_images` reads of an ``efficientdet.dataset.CocoDataset`` (this module does not import it)."""
    set_name: str
    _records: Sequence[Any]  # image_id, path, width, height


def verify_images(dataset: DatasetImages, progress: bool = True) -> List[ImageProblem]:
    """Check every image ``dataset`` kept, without decoding (:func:`verify_image_files`); [] if all good.
    ``CocoDataset`` runs this check when constructed (``verify_images=True``, the default)."""
    records = dataset._records
    return verify_image_files([(r.image_id, r.path) for r in records], progress,
                              {r.image_id: (r.width, r.height) for r in records},
                              desc=f"checking {dataset.set_name} images")
