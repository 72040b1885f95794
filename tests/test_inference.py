"""Detector and the demo scripts end to end, with a D0 checkpoint whose heads are set by hand so that the
expected detections follow from the anchors alone."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import efficientdet_test
import efficientdet_test_videos
from backbone import EfficientDet
from utils.inference import nms as nms_module
from utils.inference.detector import Detector
from utils.inference.preprocess import read_image
from utils.config.project import load_project

from tests.test_nms import reference_nms
from tests.conftest import project_yaml

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
OBJ_LIST = ["person", "car", "dog"]
CAR = 1
CAR_LOGIT = 2.0
SIZE = 128  # D0's smallest input: 341 positions per anchor type

PROJECT_YAML = project_yaml("tiny", OBJ_LIST)


def crafted_model(num_classes: int = 3) -> EfficientDet:
    """Regression 0 everywhere (boxes = anchors); probability sigmoid(2) for "car" on anchor type 0
    (scale 1, ratio 1:1) of every position, sigmoid(-6) for everything else.

    All conv kernels are zero, so the outputs are exactly these constants whatever the image."""
    torch.manual_seed(0)
    model = EfficientDet(num_classes=num_classes, compound_coef=0).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 4:
                parameter.zero_()
        model.regressor.header.pointwise_conv.conv.bias.zero_()
        bias = model.classifier.header.pointwise_conv.conv.bias
        bias.fill_(-6.0)
        bias[0 * num_classes + CAR] = CAR_LOGIT  # channels are anchor-major: anchor * num_classes + class
    return model


def expected_detections(old_h: int, old_w: int, iou_threshold: float = 0.2, clip_to_image: bool = False):
    """Reference for the crafted model, the published steps written out: anchors of type 0 clipped to the
    network input (``ClipBoxes``), brute-force NMS (all scores tie: input order), then ``invert_affine`` with
    the published sides of ``aspectaware_resize_padding`` (a square image is fitted by its height), in
    float32; clipped to the image only with ``clip_to_image``."""
    anchors = crafted_model().anchors.generate(SIZE, SIZE).numpy().astype(np.float32)[0::9]  # type 0 only
    boxes = np.stack([np.maximum(anchors[:, 1], 0), np.maximum(anchors[:, 0], 0),
                      np.minimum(anchors[:, 3], SIZE - 1), np.minimum(anchors[:, 2], SIZE - 1)], axis=1)
    keep = reference_nms(boxes, np.full(len(boxes), 1.0, np.float32), iou_threshold)
    if old_w > old_h:
        new_w, new_h = SIZE, int(SIZE / old_w * old_h)
    else:
        new_w, new_h = int(SIZE / old_h * old_w), SIZE
    kept = boxes[keep]
    kept[:, [0, 2]] = kept[:, [0, 2]] / (new_w / old_w)
    kept[:, [1, 3]] = kept[:, [1, 3]] / (new_h / old_h)
    if clip_to_image:
        kept[:, [0, 2]] = np.clip(kept[:, [0, 2]], 0, old_w - 1)
        kept[:, [1, 3]] = np.clip(kept[:, [1, 3]], 0, old_h - 1)
    return kept


@pytest.fixture(autouse=True)
def pure_torch(monkeypatch):
    monkeypatch.setattr(nms_module, "torchvision_batched_nms", lambda: None)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    project = root / "tiny.yml"
    project.write_text(PROJECT_YAML)
    weights = root / "d0.pth"
    torch.save(crafted_model().state_dict(), weights)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "wide.png"), rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    cv2.imwrite(str(images / "tall.png"), rng.integers(0, 256, (160, 96), dtype=np.uint8))  # grayscale
    return {"root": root, "project": project, "weights": weights, "images": images}


SQUARES = [(98, 98), (196, 196), (100, 100)]  # 98 and 196 truncate at 128 (int(128 / 98 * 98) == 127)


def test_detector_finds_the_crafted_detections(assets):
    detector = Detector(crafted_model(), load_project(assets["project"]), input_size=SIZE, device="cpu")
    wide = read_image(assets["images"] / "wide.png")
    squares = [np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8) for side, _ in SQUARES]
    dets = detector.detect([assets["images"] / "tall.png", wide, *squares])
    for det, (old_h, old_w) in zip(dets, [(160, 96), (120, 200), *SQUARES]):
        expected = expected_detections(old_h, old_w)
        assert 5 < len(det) == len(expected)
        np.testing.assert_allclose(det.boxes, expected, atol=1e-3, rtol=0)
        assert det.boxes.dtype == np.float32 and det.class_ids.dtype == np.int64 and det.scores.dtype == np.float32
        assert set(det.class_ids.tolist()) == {CAR} and set(det.class_names) == {"car"}
        np.testing.assert_allclose(det.scores, 1 / (1 + math.exp(-CAR_LOGIT)), rtol=1e-5)
    # Thresholds per call: nothing scores above 0.9; a laxer IoU keeps more boxes.
    assert len(detector.detect(wide, threshold=0.9)[0]) == 0
    lax = detector.detect(wide, iou_threshold=0.9)[0]
    assert len(lax) == len(expected_detections(120, 200, iou_threshold=0.9)) > len(dets[1])
    # As published, boxes are clipped to the network input only: the square's x reaches 127 / (127 / 98) = 98
    # (width fit: 127 / (128 / 98) = 97.2), and boxes reaching into the padding end past the image.
    assert dets[2].boxes[:, 2].max() == pytest.approx(98.0, abs=1e-3)
    assert dets[1].boxes[:, 3].max() > 119


def test_clip_to_image_option(assets):
    detector = Detector(crafted_model(), load_project(assets["project"]), input_size=SIZE, device="cpu",
                        clip_to_image=True)
    for det, (old_h, old_w) in zip(detector.detect([assets["images"] / "wide.png", np.zeros((98, 98, 3), np.uint8)]),
                                   [(120, 200), (98, 98)]):
        expected = expected_detections(old_h, old_w, clip_to_image=True)
        assert len(det) == len(expected) > 5 and not np.array_equal(expected, expected_detections(old_h, old_w))
        np.testing.assert_allclose(det.boxes, expected, atol=1e-3, rtol=0)


def test_predict_batch_without_metas_stays_in_input_pixels(assets):
    detector = Detector(crafted_model(), load_project(assets["project"]), input_size=SIZE, device="cpu")
    batch, metas, _ = detector.preprocess(assets["images"] / "wide.png")
    in_input = detector.predict_batch(batch, None)[0]
    in_original = detector.predict_batch(batch, metas)[0]
    scale = metas[0].new_w / metas[0].old_w
    np.testing.assert_allclose(in_input.boxes[:, 2] / scale, in_original.boxes[:, 2], rtol=1e-6)
    assert in_input.boxes.max() <= SIZE - 1


def test_detector_rejects_bad_settings(assets, d0_weights):
    project = load_project(assets["project"])
    model = crafted_model()
    with pytest.raises(ValueError, match="multiples of 128"):
        Detector(model, project, input_size=200)
    with pytest.raises(ValueError, match="float16.*CUDA"):
        Detector(model, project, input_size=SIZE, device="cpu", float16=True)
    with pytest.raises(ValueError, match="90 classes"):
        Detector(EfficientDet(num_classes=90), project)
    with pytest.raises(ValueError, match="anchors"):
        Detector(EfficientDet(num_classes=3, scales=(1.0, 2.0)), project)
    with pytest.raises(ValueError, match="90 classes"):
        Detector.from_checkpoint(0, d0_weights, project)
    detector = Detector.from_checkpoint(0, assets["weights"], assets["project"], input_size=(128, 256), device="cpu")
    assert detector.input_hw == (128, 256) and not detector.model.training
    assert Detector(crafted_model(), project).input_hw == (512, 512)  # the model's default


def run_script(module, argv, capsys):
    code = module.main(module.parse_args([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return code, out, err


def test_script_writes_annotated_images_and_prints_detections(assets, capsys):
    out_dir = assets["root"] / "out"
    code, out, err = run_script(efficientdet_test, [
        "-w", assets["weights"], "-p", assets["project"], "--images", assets["images"], REPO / "test" / "img.jpg",
        "--output", out_dir, "--input_size", SIZE, "--device", "cpu", "--batch_size", 2], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["img_det.jpg", "tall_det.jpg", "wide_det.jpg"]
    for name, (old_h, old_w) in [("tall", (160, 96)), ("wide", (120, 200)), ("img", (428, 640))]:
        annotated = cv2.imread(str(out_dir / f"{name}_det.jpg"))
        assert annotated.shape == (old_h, old_w, 3)
        count = len(expected_detections(old_h, old_w))
        assert f"{name}.{'jpg' if name == 'img' else 'png'}: {count} detections" in out
    original = cv2.imread(str(REPO / "test" / "img.jpg"))
    annotated = cv2.imread(str(out_dir / "img_det.jpg"))
    assert np.abs(annotated.astype(int) - original.astype(int)).mean() > 2  # boxes were drawn
    assert out.count("  car 0.881 (") == sum(len(expected_detections(h, w)) for h, w in
                                            [(160, 96), (120, 200), (428, 640)])


def test_script_speed_test_prints_fps(assets, capsys):
    code, out, err = run_script(efficientdet_test, [
        "-w", assets["weights"], "-p", assets["project"], "--images", assets["images"] / "wide.png",
        "--output", assets["root"] / "speed", "--input_size", SIZE, "--device", "cpu", "--speed_test"], capsys)
    assert code == 0, err
    line = [ln for ln in out.splitlines() if ln.startswith("speed test:")]
    assert len(line) == 1 and float(line[0].split()[2]) > 0 and "FPS" in line[0]


@pytest.mark.parametrize("case", ["missing_image", "empty_folder", "broken_image", "missing_weights",
                                  "other_model", "other_classes", "bad_size", "missing_project",
                                  "non_finite_weights"])
def test_script_bad_input_is_one_line(assets, capsys, case, tmp_path):
    args = ["-w", assets["weights"], "-p", assets["project"], "--images", assets["images"] / "wide.png",
            "--output", tmp_path / "out", "--input_size", SIZE, "--device", "cpu"]
    if case == "missing_image":
        args[5] = tmp_path / "nope.jpg"
        needle = "nope.jpg"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args[5] = tmp_path / "empty"
        needle = "no images"
    elif case == "broken_image":
        (tmp_path / "broken.jpg").write_bytes(b"garbage")
        args[5] = tmp_path / "broken.jpg"
        needle = "broken.jpg"
    elif case == "missing_weights":
        args[1] = tmp_path / "absent.pth"
        needle = "absent.pth"
    elif case == "other_model":
        args += ["-c", "1"]  # a D0 checkpoint for D1
        needle = "D0"
    elif case == "other_classes":
        torch.save(EfficientDet(num_classes=5).state_dict(), tmp_path / "five.pth")
        args[1] = tmp_path / "five.pth"
        needle = "5 classes"
    elif case == "bad_size":
        args[9] = "100"
        needle = "multiples of 128"
    elif case == "non_finite_weights":  # a diverged training run: refused in the one weight-loading path
        state = crafted_model().state_dict()
        keys = [k for k, v in state.items() if v.is_floating_point()]
        state[keys[5]].view(-1)[0] = float("nan")
        state[keys[-1]].view(-1)[0] = float("-inf")
        torch.save(state, tmp_path / "diverged.pth")
        args[1] = tmp_path / "diverged.pth"
        needle = f"diverged.pth: tensor {keys[5]!r} holds non-finite values"
    else:
        args[3] = tmp_path / "nothing.yml"
        needle = "nothing.yml"
    code, out, err = run_script(efficientdet_test, args, capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


def test_video_script_writes_annotated_video(assets, capsys, tmp_path):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (256, 256))
    assert writer.isOpened()
    rng = np.random.default_rng(1)
    for k in range(4):
        frame = np.full((256, 256, 3), 40 * k, np.uint8)
        frame[64:192, 64:192] = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
        writer.write(frame)
    writer.release()
    output = tmp_path / "out" / "clip_det.mp4"
    code, out, err = run_script(efficientdet_test_videos, [
        "-w", assets["weights"], "-p", assets["project"], "--video", video, "--output", output,
        "--input_size", SIZE, "--device", "cpu"], capsys)
    assert code == 0, err
    per_frame = len(expected_detections(256, 256))
    assert f"4 frames, {4 * per_frame} detections" in out and "FPS" in out
    capture = cv2.VideoCapture(str(output))
    frames = []
    ok, frame = capture.read()
    while ok:
        frames.append(frame)
        ok, frame = capture.read()
    capture.release()
    assert len(frames) == 4 and frames[0].shape == (256, 256, 3)
    # Box borders on the plain background: far from the frame's uniform grey.
    assert np.abs(frames[0][:60, :60].astype(int) - 0).max() > 100

    code, _, err = run_script(efficientdet_test_videos, [
        "-w", assets["weights"], "-p", assets["project"], "--video", tmp_path / "none.mp4"], capsys)
    assert code == 1 and "none.mp4" in err and len(err.strip().splitlines()) == 1
