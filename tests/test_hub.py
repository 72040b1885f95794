"""torch.hub entries (``hubconf.py``): every model entry builds the published layout, pretrained weights come
from a (local) server through the download code, and ``torch.hub.load(..., source="local")`` works from a clone."""
from __future__ import annotations

import http.server
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

# Parameter counts of the published checkpoints (90 classes), D0 … D7x, as the paper lists them (3.9M … 77.0M).
PUBLISHED_PARAMS = {"d0": 3_880_067, "d1": 6_625_898, "d2": 8_097_039, "d3": 12_032_296, "d4": 20_723_675,
                    "d5": 33_653_315, "d6": 51_871_934, "d7": 51_871_934, "d7x": 77_147_318}
CLASS_OUTPUT = "classifier.header.pointwise_conv.conv"


def load_hubconf():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def d0_file(tmp_path_factory):
    """A seeded D0 (90 classes) state_dict saved as ``efficientdet-d0.pth``: (path, state_dict)."""
    from backbone import EfficientDet

    torch.manual_seed(3)
    state = EfficientDet(num_classes=90, compound_coef=0).state_dict()
    path = tmp_path_factory.mktemp("served") / "efficientdet-d0.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture
def server(d0_file):
    """Serves ``/efficientdet-d0.pth`` on 127.0.0.1 (404 for anything else); yields its URL."""
    payload = d0_file[0].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            if self.path != "/efficientdet-d0.pth":
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format, *args):  # noqa: A002
            return

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/efficientdet-d0.pth"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_dependencies_are_importable_names_and_nothing_heavy_at_import():
    hub = load_hubconf()
    assert set(hub.dependencies) >= {"torch", "numpy", "cv2", "yaml"}
    assert all(importlib.util.find_spec(name) is not None for name in hub.dependencies)
    text = (REPO / "hubconf.py").read_text(encoding="utf-8")
    top_level = [line for line in text.splitlines() if line.startswith(("import ", "from "))]
    assert top_level == [], top_level  # entries import the library when called


def test_every_model_entry_builds_the_published_layout():
    """All nine entries on the meta device (no memory, no weights): the published parameter counts."""
    hub = load_hubconf()
    public = sorted(name for name in dir(hub) if callable(getattr(hub, name)) and not name.startswith("_"))
    assert public == sorted([f"efficientdet_{n}" for n in PUBLISHED_PARAMS] + ["detector"])
    for name, params in PUBLISHED_PARAMS.items():
        with torch.device("meta"):
            model = getattr(hub, f"efficientdet_{name}")()
        assert sum(p.numel() for p in model.parameters()) == params, name
        assert model.config.name.lower() == name and not model.training and model.num_classes == 90
        assert getattr(hub, f"efficientdet_{name}").__doc__.startswith(f"EfficientDet {model.config.name} ")


def test_d0_entry_built_for_real_runs_and_takes_anchors():
    hub = load_hubconf()
    model = hub.efficientdet_d0(num_classes=3, ratios=[(1.0, 1.0)], scales=[1.0, 2.0])
    with torch.no_grad():
        _, regression, classification, anchors = model(torch.zeros(1, 3, 128, 128))
    anchors_per_level = [(128 // 2 ** level) ** 2 * 2 for level in range(3, 8)]  # 1 ratio x 2 scales
    assert regression.shape == (1, sum(anchors_per_level), 4) and classification.shape[-1] == 3
    with pytest.raises(ValueError, match="pretrained=True"):
        hub.efficientdet_d0(weights="x.pth")


def test_pretrained_downloads_from_the_server_and_loads_exactly(server, d0_file, tmp_path):
    hub = load_hubconf()
    model = hub.efficientdet_d0(pretrained=True, url=server, weights_dir=tmp_path, progress=False)
    assert (tmp_path / "efficientdet-d0.pth").read_bytes() == d0_file[0].read_bytes()
    expected = d0_file[1]
    got = model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_pretrained_with_other_classes_reinitialises_only_the_class_output(server, d0_file, tmp_path, caplog):
    hub = load_hubconf()
    with caplog.at_level(logging.WARNING):
        model = hub.efficientdet_d0(pretrained=True, num_classes=3, url=server, weights_dir=tmp_path, progress=False)
    expected = d0_file[1]
    for key, value in model.state_dict().items():
        if key.startswith(CLASS_OUTPUT):
            assert value.shape[0] == 9 * 3
        else:
            assert torch.equal(value, expected[key]), key
    assert "re-initialised" in caplog.text and "classifier.header.pointwise_conv" in caplog.text


def test_offline_download_is_one_clear_connection_error(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hub = load_hubconf()
    with pytest.raises(ConnectionError) as info:
        hub.efficientdet_d0(pretrained=True, url=f"http://127.0.0.1:{port}/efficientdet-d0.pth",
                            weights_dir=tmp_path, progress=False)
    message = str(info.value)
    assert "by hand" in message and str(tmp_path / "efficientdet-d0.pth") in message and "\n" not in message


def test_detector_entry_and_torch_hub_load_local(server, d0_file, tmp_path):
    detector = torch.hub.load(str(REPO), "detector", compound_coef=0, source="local", url=server,
                              weights_dir=tmp_path, progress=False, device="cpu", input_size=128)
    assert type(detector).__name__ == "Detector" and detector.input_hw == (128, 128)
    assert torch.equal(detector.model.state_dict()["bifpn.0.conv6_up.pointwise_conv.conv.weight"],
                       d0_file[1]["bifpn.0.conv6_up.pointwise_conv.conv.weight"])
    model = torch.hub.load(str(REPO), "efficientdet_d0", source="local", pretrained=True,
                           weights=tmp_path / "efficientdet-d0.pth")
    assert torch.equal(model.state_dict()[f"{CLASS_OUTPUT}.bias"], d0_file[1][f"{CLASS_OUTPUT}.bias"])
    random = torch.hub.load(str(REPO), "detector", source="local", pretrained=False, device="cpu")
    assert random.model.num_classes == 90 and random.input_hw == (512, 512)


def repository_files():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [name for name in listed if (REPO / name).is_file()]


def test_torch_hub_load_from_a_temporary_clone(tmp_path):
    """The repository's files copied elsewhere (what a clone holds), loaded by a fresh interpreter outside it."""
    if shutil.which("git") is None:
        pytest.skip("git not found")
    clone = tmp_path / "clone"
    for name in repository_files():
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    code = ("import sys, torch; m = torch.hub.load(sys.argv[1], 'efficientdet_d0', source='local'); "
            "print(sum(p.numel() for p in m.parameters()), sys.modules['backbone'].__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code, str(clone)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    params, backbone_file = result.stdout.split()
    assert int(params) == PUBLISHED_PARAMS["d0"] and Path(backbone_file).parent == clone
