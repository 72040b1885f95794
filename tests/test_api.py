"""The Python API: ``Detector.detect`` on paths, BGR arrays, RGB arrays (``color="rgb"``) and PIL images, and the
README's "Python API" snippets run as written."""
from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from backbone import EfficientDet
from benchmark.speed import calibrate_class_bias
from tests.conftest import REPO
from tests.test_hub import d0_file, no_proxy, server  # noqa: F401 (fixtures)
from utils.config.project import load_project
from utils.inference import Detector
from utils.inference.preprocess import preprocess

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def scene(height: int = 150, width: int = 200) -> np.ndarray:
    """A BGR uint8 picture whose channels differ everywhere (a channel swap changes every pixel)."""
    rng = np.random.default_rng(5)
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = (40, 120, 220)
    cv2.rectangle(image, (20, 30), (90, 120), (250, 30, 10), -1)
    cv2.circle(image, (150, 60), 30, (10, 200, 60), -1)
    return np.clip(image.astype(np.int16) + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def detector():
    """A seeded D0 (90 classes) at 128 px, its class logits spread so that about 40 (anchor, class) scores of
    :func:`scene` pass the threshold: image content decides the detections."""
    torch.manual_seed(0)
    model = EfficientDet(num_classes=90, compound_coef=0).eval()
    calibrate_class_bias(model, preprocess(scene(), 128)[0], threshold=0.2, candidates=40)
    return Detector(model, load_project("coco"), input_size=128, device="cpu", threshold=0.2, iou_threshold=0.5)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x.boxes, y.boxes) and np.array_equal(x.scores, y.scores)
        assert np.array_equal(x.class_ids, y.class_ids)


class FakePILImage:
    """Stands in for ``PIL.Image.Image`` where Pillow is not installed: an RGB picture, ``mode`` and ``__array__``."""

    def __init__(self, rgb: np.ndarray, mode: str = "RGB"):
        self.rgb, self.mode = rgb, mode

    def convert(self, mode: str) -> "FakePILImage":
        assert mode == "RGB"
        return FakePILImage(self.rgb, "RGB")

    def __array__(self, dtype=None, copy=None):
        return self.rgb


def test_path_bgr_rgb_and_pil_inputs_give_identical_detections(detector, tmp_path, monkeypatch):
    bgr = scene()
    path = tmp_path / "scene.png"  # lossless: the file holds exactly these pixels
    assert cv2.imwrite(str(path), bgr)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    from_path = detector.detect(str(path))
    assert len(from_path[0]) > 5  # the comparison below means something
    assert_same(detector.detect(bgr), from_path)
    assert_same(detector.detect(rgb, color="rgb"), from_path)
    assert_same(detector.detect([rgb, bgr[:, :, 0]], color="RGB")[1:], detector.detect(bgr[:, :, 0]))
    fake = types.ModuleType("PIL.Image")
    fake.Image = FakePILImage
    monkeypatch.setitem(sys.modules, "PIL.Image", fake)
    assert_same(detector.detect(FakePILImage(rgb)), from_path)
    assert_same(detector.detect([FakePILImage(rgb, "P")], color="bgr"), from_path)  # PIL images are RGB anyway


def test_real_pil_image(detector, tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    bgr = scene()
    path = tmp_path / "scene.png"
    assert cv2.imwrite(str(path), bgr)
    with image_module.open(path) as pil:
        assert_same(detector.detect(pil), detector.detect(str(path)))
        assert_same(detector.detect(pil.convert("RGBA")), detector.detect(str(path)))


def test_rgb_array_pixels_equal_the_published_formula():
    """A uniform RGB array with color="rgb": every image pixel of the canvas is (rgb / 255 - mean) / std."""
    rgb = np.zeros((64, 96, 3), np.uint8)
    rgb[:] = (200, 100, 30)
    batch, metas, originals = preprocess(rgb, 128, color="rgb")
    expected = (np.array([200, 100, 30]) / 255.0 - MEAN) / STD
    image = batch[0, :, :metas[0].new_h, :metas[0].new_w].numpy()
    assert np.allclose(image, expected.reshape(3, 1, 1).astype(np.float32), atol=1e-6)
    assert originals[0][0, 0].tolist() == [30, 100, 200]  # kept as BGR for drawing
    swapped, _, _ = preprocess(rgb, 128)  # without color="rgb" the array is BGR, as documented
    assert np.allclose(swapped[0, :, 0, 0].numpy(), ((np.array([30, 100, 200]) / 255.0 - MEAN) / STD), atol=1e-6)


@pytest.mark.parametrize("image, color, message", [
    (np.zeros((32, 32, 3), np.float32), "bgr", "dtype float32"),
    (np.zeros((32, 32, 2), np.uint8), "bgr", r"shape \(32, 32, 2\)"),
    (np.zeros((2, 32, 32, 3), np.uint8), "rgb", r"shape \(2, 32, 32, 3\)"),
    (np.zeros((32, 32, 3), np.uint8), "hsv", "color must be 'bgr'.*'hsv'"),
    (7, "bgr", "expected a path, a numpy array or a PIL image, got int"),
])
def test_bad_inputs_are_one_clear_value_error(detector, image, color, message):
    with pytest.raises(ValueError, match=message) as info:
        detector.detect(image, color=color)
    assert "\n" not in str(info.value)


def python_api_blocks():
    """The ```python blocks of README.md's "## Python API" section, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Python API\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has no '## Python API' section"
    return re.findall(r"^```python\n(.*?)^```", match.group(1), flags=re.S | re.M)


def test_readme_snippets_run(server, tmp_path, monkeypatch):
    """Every python block of the section, as written, in a temporary folder: a synthetic ``img.jpg``, the published
    weights served from 127.0.0.1 into a temporary ``weights/``, ``path/to/clone`` a link to this repository, and
    a tiny ``shape`` project (``projects/shape.yml`` as shipped, 4 + 2 synthetic images of 256 px)."""
    from efficientdet.synthetic import make_shape_dataset
    from utils.weights import download

    (tmp_path / "projects").mkdir()
    shutil.copy(REPO / "projects" / "shape.yml", tmp_path / "projects" / "shape.yml")
    make_shape_dataset(tmp_path / "datasets" / "shape", num_train=4, num_val=2, size=256, seed=0)

    monkeypatch.setitem(download.WEIGHT_URLS, 0, server)
    monkeypatch.setattr(download, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.chdir(tmp_path)
    assert cv2.imwrite("img.jpg", scene())
    (tmp_path / "path" / "to").mkdir(parents=True)
    (tmp_path / "path" / "to" / "clone").symlink_to(REPO, target_is_directory=True)
    blocks = python_api_blocks()
    assert len(blocks) >= 2
    namespace = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md (Python API)", "exec"), namespace)  # noqa: S102 (the documented code)
    assert (tmp_path / "weights" / "efficientdet-d0.pth").is_file()
    assert namespace["summary"].steps == 1 and namespace["summary"].last_weights.is_file()
    assert set(namespace["metrics"]) >= {"AP", "AP50", "ARl", "per_class_ap"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """utils.training.train on the tiny project of tests/test_train.py: D0, 128 px, 4 images, batch 2, 1 epoch."""
    from tests.test_train import write_tiny_project
    from utils.training import train

    root = tmp_path_factory.mktemp("api")
    yaml_path = write_tiny_project(root, num_train=4)
    summary = train(yaml_path, 0, batch_size=2, input_size=128, num_epochs=1, num_workers=0, device="cpu",
                    lr=1e-3, data_path=str(root / "datasets"), saved_path=str(root / "ckpt"),
                    log_path=str(root / "logs"))
    return root, yaml_path, summary


def test_train_returns_what_the_run_logged_and_saved(trained):
    from utils.weights.checkpoints import pointer_path

    root, _, summary = trained
    records = [json.loads(line) for line in (root / "logs" / "tiny" / "train_log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    assert (summary.exit_status, summary.steps, summary.epochs) == (0, 2, 1)
    assert summary.cls_loss == pytest.approx(train_records[-1]["cls_loss"], rel=1e-12)
    assert summary.reg_loss == pytest.approx(train_records[-1]["reg_loss"], rel=1e-12)
    val = [r for r in records if r["kind"] == "val"]
    assert summary.best_metric_name == "loss" and summary.best_metric == pytest.approx(val[-1]["loss"], rel=1e-9)
    folder = root / "ckpt" / "tiny"
    assert summary.last_weights == folder / "efficientdet-d0_0_2.pth" and summary.last_weights.is_file()
    assert summary.last_state.is_file() and summary.last_state.name == "efficientdet-d0_0_2.state.pt"
    assert json.loads(pointer_path(folder, 0).read_text())["weights"] == summary.last_weights.name
    assert summary.best_weights == folder / "efficientdet-d0_best.pth" and summary.best_weights.is_file()


def test_train_unknown_setting_is_one_line_value_error(tmp_path):
    from utils.training import train

    with pytest.raises(ValueError, match=r"unknown setting 'batch_sise' \(did you mean batch_size\?\)") as info:
        train("projects/shape.yml", 0, batch_sise=4)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="optim='adam' is not one of adamw, sgd"):
        train("projects/shape.yml", 0, optim="adam")


def test_evaluate_returns_the_twelve_numbers_and_per_class_ap(trained, tmp_path, capsys):
    import coco_eval
    from utils.evaluation import STAT_NAMES, evaluate

    root, yaml_path, summary = trained
    common = dict(data_path=str(root / "datasets"), input_size=128, device="cpu", threshold=0.0, no_progress=True)
    metrics = evaluate(yaml_path, summary.last_weights, 0, output=str(tmp_path / "api"), **common)
    assert list(metrics) == [*STAT_NAMES, "per_class_ap"]
    assert set(metrics["per_class_ap"]) == {"rectangle", "circle"}
    assert all(isinstance(metrics[name], float) for name in STAT_NAMES)

    # the script on the same run: the same numbers in its --save_json, the same results file pycocotools scores
    argv = ["-c", "0", "-p", str(yaml_path), "-w", str(summary.last_weights), "--data_path", str(root / "datasets"),
            "--input_size", "128", "--device", "cpu", "--threshold", "0.0", "--no_progress",
            "--output", str(tmp_path / "script"), "--save_json", str(tmp_path / "metrics.json")]
    assert coco_eval.main(coco_eval.parse_args(argv)) == 0
    capsys.readouterr()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for name in STAT_NAMES:
        assert metrics[name] == pytest.approx(saved[name], abs=1e-12), name
    assert saved["per_class_ap"] == {"1": pytest.approx(metrics["per_class_ap"]["rectangle"], abs=1e-12),
                                     "2": pytest.approx(metrics["per_class_ap"]["circle"], abs=1e-12)}
    pycocotools = pytest.importorskip("pycocotools.cocoeval")
    from pycocotools.coco import COCO

    truth = COCO(str(root / "datasets" / "tiny" / "annotations" / "instances_val.json"))
    found = truth.loadRes(str(tmp_path / "api" / "val_bbox_results.json"))
    direct = pycocotools.COCOeval(truth, found, "bbox")
    direct.evaluate(), direct.accumulate(), direct.summarize()
    assert [metrics[name] for name in STAT_NAMES] == pytest.approx(list(direct.stats), abs=1e-12)
