"""ONNX export: the graph round-trips through ONNX Runtime (plain, dynamic batch, with box decoding)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import export
from backbone import EfficientDet
from efficientdet.anchors import BBoxTransform, ClipBoxes
from utils.inference.onnx_export import export_onnx

HW = (128, 128)  # D0's smallest input, for speed
ATOL = 1e-4


@pytest.fixture(scope="module")
def onnxruntime():
    """onnxruntime (and onnx); skipped where absent, except under CI=true (requirements-dev.txt has them)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"onnx/onnxruntime not importable under CI: {exc}")
        pytest.skip(f"onnx/onnxruntime not importable: {exc}")
    return ort


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EfficientDet(num_classes=90, compound_coef=0).eval()


def _run(ort, path, images: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})


def test_export_matches_pytorch_with_dynamic_batch(onnxruntime, model, tmp_path):
    path = tmp_path / "d0.onnx"
    assert export_onnx(model, str(path), HW, dynamic_batch=True) == ("regression", "classification")
    images = torch.randn((2, 3) + HW, generator=torch.Generator().manual_seed(1))  # exported with batch 1
    regression, classification = _run(onnxruntime, path, images)
    with torch.no_grad():
        _, ref_regression, ref_classification, _ = model(images)
    assert regression.shape == (2, ref_regression.shape[1], 4)
    np.testing.assert_allclose(regression, ref_regression.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(classification, ref_classification.numpy(), atol=ATOL, rtol=0)


def test_static_batch_rejects_another_batch(onnxruntime, model, tmp_path):
    path = tmp_path / "d0_static.onnx"
    export_onnx(model, str(path), HW, dynamic_batch=False)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _run(onnxruntime, path, torch.zeros((2, 3) + HW))


def test_with_decode_outputs_clipped_boxes(onnxruntime, model, tmp_path):
    path = tmp_path / "d0_decode.onnx"
    assert export_onnx(model, str(path), HW, with_decode=True) == ("boxes", "scores")
    images = torch.randn((1, 3) + HW, generator=torch.Generator().manual_seed(2))
    boxes, scores = _run(onnxruntime, path, images)
    with torch.no_grad():
        _, regression, classification, anchors = model(images)
    expected = ClipBoxes()(BBoxTransform()(anchors, regression), images)
    np.testing.assert_allclose(boxes, expected.numpy(), atol=ATOL * max(HW), rtol=0)
    np.testing.assert_allclose(scores, classification.numpy(), atol=ATOL, rtol=0)
    assert boxes.min() >= 0 and boxes[..., 2].max() <= HW[1] - 1 and boxes[..., 3].max() <= HW[0] - 1


def test_export_script_checks_with_onnxruntime(onnxruntime, tmp_path, capsys):
    out = tmp_path / "d0.onnx"
    rc = export.main(export.parse_args(["-c", "0", "--input_size", "256", "384", "--dynamic_batch", "-o", str(out)]))
    printed = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "max abs diff" in printed and "regression" in printed


def test_export_script_bad_size_is_one_line_error(tmp_path, capsys):
    rc = export.main(export.parse_args(["-c", "0", "--input_size", "100", "-o", str(tmp_path / "x.onnx")]))
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error:") and "100x100" in err and len(err.strip().splitlines()) == 1
