"""Download of the published checkpoints (zylo117's release page) into ``weights/``.

A download streams into a temporary file in the destination folder and is renamed onto the final name
(``os.replace``) only after the size (``Content-Length``) and, when given, the SHA-256 check out: a partial
or failed download never appears under the final name. Any failure is a :class:`DownloadError` (a
``ConnectionError``) whose one-line message names the URL and where to put the file by hand.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Optional, Union

from tqdm import tqdm

from efficientdet.config import MODEL_CONFIGS

logger = logging.getLogger(__name__)

RELEASES = "https://github.com/zylo117/Yet-Another-Efficient-Pytorch/releases/download"
# efficientdet-d{c}.pth per compound coefficient (d8 is D7x).
WEIGHT_URLS: Dict[int, str] = {
    **{c: f"{RELEASES}/1.0/efficientdet-d{c}.pth" for c in range(7)},
    7: f"{RELEASES}/1.2/efficientdet-d7.pth",
    8: f"{RELEASES}/1.2/efficientdet-d8.pth",
}
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
CHUNK_BYTES = 1 << 20


class DownloadError(ConnectionError):
    """A download failed (network, HTTP status, size or checksum); nothing was left under the final name."""


def weights_url(compound_coef: int) -> str:
    """URL of the published ``efficientdet-d{c}.pth``; ValueError outside 0…8."""
    if compound_coef not in WEIGHT_URLS:
        raise ValueError(f"no published weights for compound coefficient {compound_coef!r}: "
                         f"use 0..{len(MODEL_CONFIGS) - 1}")
    return WEIGHT_URLS[compound_coef]


def default_weights_path(compound_coef: int, weights_dir: Union[str, Path] = WEIGHTS_DIR) -> Path:
    """``weights/efficientdet-d{c}.pth``."""
    return Path(weights_dir) / f"efficientdet-d{compound_coef}.pth"


def download(url: str, dest: Union[str, Path], sha256: Optional[str] = None, timeout: float = 30.0,
             progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` atomically, with a progress bar, size and optional SHA-256 check.

    Returns:
        ``dest`` as a Path.

    Raises:
        DownloadError: offline, HTTP error, truncated body, size or checksum mismatch; the message names the
            URL and says where to put the file manually. No file is left at ``dest`` (nor a temporary one).
    """
    dest = Path(dest)
    manual = f"download {url} by hand and save it as {dest}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=str(dest.parent))
    tmp_path = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        received = 0
        with os.fdopen(handle, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    length_header = response.headers.get("Content-Length")
                    expected = int(length_header) if length_header and length_header.isdigit() else None
                    with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                              disable=not progress, leave=False) as bar:
                        while True:
                            chunk = response.read(CHUNK_BYTES)
                            if not chunk:
                                break
                            out.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
            except urllib.error.HTTPError as exc:
                raise DownloadError(f"could not download {url}: HTTP {exc.code} {exc.reason}; {manual}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise DownloadError(f"could not download {url} ({type(exc).__name__}: {reason}); {manual}") from None
        if expected is not None and received != expected:
            raise DownloadError(f"download of {url} is incomplete ({received} of {expected} bytes); {manual}")
        if received == 0:
            raise DownloadError(f"download of {url} is empty; {manual}")
        if sha256 is not None and digest.hexdigest().lower() != sha256.strip().lower():
            raise DownloadError(f"download of {url} has SHA-256 {digest.hexdigest()}, expected {sha256}; {manual}")
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    logger.info("downloaded %s (%d bytes) to %s", url, received, dest)
    return dest


def download_weights(compound_coef: int, dest: Optional[Union[str, Path]] = None, url: Optional[str] = None,
                     sha256: Optional[str] = None, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download the published checkpoint of ``-c compound_coef`` (default ``weights/efficientdet-d{c}.pth``).

    ``url`` overrides the published address (mirrors, tests). Raises DownloadError / ValueError.
    """
    url = url or weights_url(compound_coef)
    dest = Path(dest) if dest is not None else default_weights_path(compound_coef)
    return download(url, dest, sha256=sha256, timeout=timeout, progress=progress)


def ensure_weights(compound_coef: int, weights: Optional[Union[str, Path]] = None,
                   weights_dir: Union[str, Path] = WEIGHTS_DIR, url: Optional[str] = None,
                   progress: bool = True) -> Path:
    """The checkpoint a script should load.

    An explicit ``weights`` path must exist (FileNotFoundError otherwise: never downloaded over). Without
    one, ``weights_dir/efficientdet-d{c}.pth`` is used and downloaded first when missing (DownloadError
    when that fails).
    """
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        return path
    path = default_weights_path(compound_coef, weights_dir)
    if path.is_file():
        return path
    logger.info("%s is missing: downloading the published checkpoint", path)
    return download_weights(compound_coef, path, url=url, progress=progress)
