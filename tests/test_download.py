"""Weights download against a local HTTP server: success, checksum, 404, truncated body, offline."""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from utils.weights.download import (WEIGHT_URLS, DownloadError, default_weights_path, download, download_weights,
                            ensure_weights, weights_url)


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802 (http.server API)
        if self.path == "/efficientdet-d0.pth":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.payload)))
            self.end_headers()
            self.wfile.write(self.payload)
        elif self.path == "/truncated.pth":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.payload) + 1000))
            self.end_headers()
            self.wfile.write(self.payload[: len(self.payload) // 2])
        else:
            self.send_error(404, "Not Found")

    def log_message(self, format, *args):  # noqa: A002 (silence the server)
        return


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Talk to 127.0.0.1 directly even where a proxy is configured."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server(tmp_path):
    """A local server for one test: serves a checkpoint the test saved; stopped afterwards."""
    checkpoint = tmp_path / "source.pth"
    torch.save({"layer.weight": torch.arange(5000, dtype=torch.float32)}, checkpoint)
    payload = checkpoint.read_bytes()
    handler = type("Handler", (_Handler,), {"payload": payload})
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    httpd.timeout = 5
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", payload
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


def test_download_success_with_checksum(server, tmp_path):
    url, payload = server
    dest = tmp_path / "weights" / "efficientdet-d0.pth"
    result = download(f"{url}/efficientdet-d0.pth", dest, sha256=hashlib.sha256(payload).hexdigest(), progress=True)
    assert result == dest and dest.read_bytes() == payload
    assert torch.equal(torch.load(dest, weights_only=True)["layer.weight"], torch.arange(5000, dtype=torch.float32))
    assert leftovers(dest.parent) == ["efficientdet-d0.pth"]  # no temporary file left


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    url, _ = server
    dest = tmp_path / "efficientdet-d0.pth"
    with pytest.raises(DownloadError, match="SHA-256"):
        download(f"{url}/efficientdet-d0.pth", dest, sha256="0" * 64, progress=False)
    assert leftovers(tmp_path) == ["source.pth"]


def test_http_404_leaves_nothing(server, tmp_path):
    url, _ = server
    dest = tmp_path / "out" / "efficientdet-d3.pth"
    with pytest.raises(DownloadError) as info:
        download(f"{url}/nothing.pth", dest, progress=False)
    message = str(info.value)
    assert "404" in message and str(dest) in message and "\n" not in message
    assert leftovers(dest.parent) == []


def test_truncated_body_leaves_nothing(server, tmp_path):
    url, _ = server
    dest = tmp_path / "out" / "efficientdet-d0.pth"
    with pytest.raises(DownloadError, match="incomplete|IncompleteRead"):
        download(f"{url}/truncated.pth", dest, progress=False)
    assert leftovers(dest.parent) == []


def test_offline_is_a_connection_error_saying_where_to_put_the_file(tmp_path):
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dest = tmp_path / "efficientdet-d0.pth"
    with pytest.raises(ConnectionError) as info:
        download(f"http://127.0.0.1:{port}/efficientdet-d0.pth", dest, timeout=5, progress=False)
    assert "by hand" in str(info.value) and str(dest) in str(info.value)
    assert leftovers(tmp_path) == []


def test_ensure_weights_downloads_only_the_default(server, tmp_path):
    url, payload = server
    weights_dir = tmp_path / "weights"
    path = ensure_weights(0, None, weights_dir=weights_dir, url=f"{url}/efficientdet-d0.pth", progress=False)
    assert path == default_weights_path(0, weights_dir) and path.read_bytes() == payload
    # Present now: used as is, even with a broken URL.
    assert ensure_weights(0, None, weights_dir=weights_dir, url=f"{url}/nothing.pth") == path
    # An explicit path is never downloaded.
    with pytest.raises(FileNotFoundError, match="mine.pth"):
        ensure_weights(0, tmp_path / "mine.pth", weights_dir=weights_dir, url=f"{url}/efficientdet-d0.pth")
    other = download_weights(0, tmp_path / "copy.pth", url=f"{url}/efficientdet-d0.pth", progress=False)
    assert other.read_bytes() == payload


def test_published_urls():
    assert weights_url(0).endswith("/releases/download/1.0/efficientdet-d0.pth")
    assert weights_url(6).endswith("/releases/download/1.0/efficientdet-d6.pth")
    assert weights_url(7).endswith("/releases/download/1.2/efficientdet-d7.pth")
    assert weights_url(8).endswith("/releases/download/1.2/efficientdet-d8.pth")
    assert all(u.startswith("https://github.com/zylo117/Yet-Another-Efficient-Pytorch/") for u in WEIGHT_URLS.values())
    with pytest.raises(ValueError, match="9"):
        weights_url(9)


def test_default_weights_folder_is_the_repository_weights_folder():
    """``weights/`` beside the scripts (the published place), whatever package the download code lives in."""
    from utils.weights.download import WEIGHTS_DIR

    repository = Path(__file__).resolve().parents[1]
    assert WEIGHTS_DIR == repository / "weights" and (repository / "efficientdet_test.py").is_file()
    assert default_weights_path(3) == repository / "weights" / "efficientdet-d3.pth"
