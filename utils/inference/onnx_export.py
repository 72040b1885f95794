"""ONNX export of a detector (``export.py``, ``benchmark/benchmark.py --onnx``): the network's outputs, or
with ``with_decode`` the decoded, clipped boxes; checked against PyTorch with onnxruntime where present."""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Tuple

import torch
from torch import Tensor, nn

from efficientdet.anchors import BBoxTransform, ClipBoxes

logger = logging.getLogger(__name__)


class ExportModule(nn.Module):
    """The detector as an ONNX-exportable graph: images -> (regression, classification), or with
    ``with_decode`` -> (boxes, scores) through :class:`efficientdet.anchors.BBoxTransform` and
    :class:`efficientdet.anchors.ClipBoxes` against the anchors of ``input_hw`` (a constant of the graph).

    Outputs: regression Tensor[B, N, 4] (dy, dx, dh, dw), classification Tensor[B, N, C] sigmoid
    probabilities; or boxes Tensor[B, N, 4] (x1, y1, x2, y2) input pixels clipped to the input, and
    scores Tensor[B, N, C] (the classification).
    """

    def __init__(self, model: nn.Module, input_hw: Tuple[int, int], with_decode: bool = False) -> None:
        super().__init__()
        self.model = model
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.with_decode = with_decode
        self.regress = BBoxTransform()
        self.clip = ClipBoxes()
        reference = torch.empty((0, 3) + self.input_hw, dtype=torch.float32,
                                device=next(model.parameters()).device)
        self.register_buffer("anchors", model.anchors(reference).clone(), persistent=False)

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        _, regression, classification, _ = self.model(images)
        if not self.with_decode:
            return regression, classification
        reference = images.new_empty((0, 0) + self.input_hw)
        return self.clip(self.regress(self.anchors, regression), reference), classification


@torch.no_grad()
def export_onnx(model: nn.Module, path: str, input_hw: Tuple[int, int], batch_size: int = 1,
                dynamic_batch: bool = False, with_decode: bool = False, opset: int = 17,
                fuse: bool = True) -> Tuple[str, str]:
    """Export an :class:`EfficientDet` (eval mode, float32, on its device) to ONNX at ``path``.

    The graph takes ``images`` float32[B, 3, H, W] (B symbolic with ``dynamic_batch``) and returns
    ``(regression, classification)`` or, with ``with_decode``, ``(boxes, scores)`` (see
    :class:`ExportModule`). ``fuse`` folds BatchNorm first (the same function, fewer nodes).
    Returns the output names.
    """
    height, width = int(input_hw[0]), int(input_hw[1])
    model.check_input_size(height, width)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    network = model.fold_batchnorm() if fuse else copy.deepcopy(model).eval()
    module = ExportModule(network, (height, width), with_decode=with_decode).eval()
    device = next(network.parameters()).device
    example = torch.zeros((batch_size, 3, height, width), dtype=torch.float32, device=device)
    outputs = ("boxes", "scores") if with_decode else ("regression", "classification")
    dynamic_axes = {name: {0: "batch"} for name in ("images",) + outputs} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=list(outputs),
                          dynamic_axes=dynamic_axes, opset_version=int(opset), dynamo=False)
    logger.info("exported %s (%dx%d, opset %d) to %s", type(model).__name__, height, width, opset, path)
    return outputs
