"""What only a CUDA device can show: the same detections as the CPU (fp32, eager and ``fastest``), fp16 inference
agreeing on the confident detections, and mixed-precision training steps (float16 + GradScaler) staying finite.
Skipped without CUDA; ``python -m pytest -m cuda`` and ``benchmark/gpu_report.py`` run them."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from backbone import EfficientDet
from benchmark.speed import calibrate_class_bias
from efficientdet.loss import DetectionLoss
from tests.test_api import scene
from utils.config.project import load_project
from utils.inference import Detector
from utils.inference.preprocess import preprocess
from utils.training.guard import FiniteGuard
from utils.training.parts import ModelWithLoss
from utils.training.step import optimizer_step

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZE = 256


@pytest.fixture
def exact_float32():
    """cuDNN and matmuls in true float32 (TF32 off), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def model():
    """Seeded D0 (90 classes), class logits spread so that about 30 scores of :func:`scene` pass 0.2 (CPU)."""
    torch.manual_seed(0)
    net = EfficientDet(num_classes=90, compound_coef=0).eval()
    calibrate_class_bias(net, preprocess(scene(), SIZE)[0], threshold=0.2, candidates=30)
    return net


def detect(model, device, mode="eager", float16=False):
    detector = Detector(copy.deepcopy(model), load_project("coco"), input_size=SIZE, device=device,
                        threshold=0.2, iou_threshold=0.5, mode=mode, float16=float16)
    return detector.detect(scene())[0]


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("mode", ["eager", "fastest"])
def test_cuda_float32_gives_the_cpu_detections(model, exact_float32, mode):
    cpu = detect(model, "cpu")
    cuda = detect(model, "cuda", mode)
    assert len(cpu) > 5 and len(cuda) == len(cpu)
    assert np.array_equal(cuda.class_ids, cpu.class_ids)
    assert np.allclose(cuda.boxes, cpu.boxes, atol=1e-2) and np.allclose(cuda.scores, cpu.scores, atol=1e-4)


@pytest.mark.parametrize("mode", ["eager", "fastest"])
def test_cuda_float16_agrees_on_the_confident_detections(model, mode):
    reference = detect(model, "cpu")
    half = detect(model, "cuda", mode, float16=True)
    assert len(half) > 0 and np.isfinite(half.boxes).all() and np.isfinite(half.scores).all()
    for k in range(min(3, len(reference))):  # the three most confident: same class, same place
        best = max(range(len(half)), key=lambda j: iou(half.boxes[j], reference.boxes[k])
                   if half.class_ids[j] == reference.class_ids[k] else -1.0)
        assert half.class_ids[best] == reference.class_ids[k]
        assert iou(half.boxes[best], reference.boxes[k]) > 0.9
        assert abs(float(half.scores[best]) - float(reference.scores[k])) < 0.02


def test_float16_training_steps_with_grad_scaler_stay_finite():
    torch.manual_seed(0)
    device = torch.device("cuda")
    net = EfficientDet(num_classes=3, compound_coef=0).train().to(device)
    wrapped = ModelWithLoss(net, DetectionLoss("yaep", from_logits=True))
    optimizer = torch.optim.AdamW(net.parameters(), 1e-4)
    guard, scaler = FiniteGuard(net, optimizer), torch.amp.GradScaler("cuda")
    images = torch.randn(2, 3, SIZE, SIZE, device=device)
    annotations = torch.tensor([[[20.0, 30.0, 120.0, 140.0, 1.0], [150.0, 40.0, 230.0, 200.0, 2.0]]],
                               device=device).repeat(2, 1, 1)
    losses, verdicts = [], []
    for _ in range(12):
        verdict, cls_loss, reg_loss, _ = optimizer_step(wrapped, optimizer, guard, images, annotations,
                                                        torch.float16, scaler)
        losses.append(float(cls_loss + reg_loss))
        verdicts.append(verdict)
    assert all(math.isfinite(v) for v in losses) and "restored" not in verdicts
    assert verdicts.count("ok") >= 8  # the scaler may skip a few overflowing first steps, not more
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
