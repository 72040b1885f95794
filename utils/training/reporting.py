"""What a training run shows: scalars to TensorBoard and ``train_log.jsonl``, the loss-curve PNG, and the
``--debug`` images of the current predictions."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch import Tensor

from utils.visual.draw import draw_detections
from utils.visual.plot import plot_training_log
from utils.inference.postprocess import DEBUG_THRESHOLDS, postprocess

DEBUG_DIR = Path("test")  # --debug images, as published


class RunLog:
    """Scalars of one run under ``log_dir``: TensorBoard (``tensorboard/``, opened on first use), one JSON
    line per record in ``train_log.jsonl`` and the curves in ``loss_curves.png``. Rank 0 only: other
    ranks pass ``enabled=False``."""

    def __init__(self, log_dir: Path, title: str, enabled: bool = True) -> None:
        self.log_dir, self.title, self.enabled = Path(log_dir), title, enabled
        self.writer: Optional[Any] = None

    @property
    def path(self) -> Path:
        return self.log_dir / "train_log.jsonl"

    def scalars(self, values: Dict[str, float], step: int, epoch: int, prefix: str) -> None:
        """Record ``values`` under ``prefix`` (``train`` / ``val``) at ``step``."""
        if not self.enabled:
            return
        if self.writer is None:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(self.log_dir / "tensorboard"))
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        record = {"kind": prefix, "step": step, "epoch": epoch, **values}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        """The curves so far to ``loss_curves.png``."""
        if self.enabled and self.path.exists():
            records = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
            plot_training_log(records, self.log_dir / "loss_curves.png", title=self.title)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def save_debug_image(path: Path, images: Tensor, outputs: Tuple[Tensor, Tensor, Tensor], mean: Sequence[float],
                     std: Sequence[float], obj_list: Sequence[str]) -> None:
    """The batch's first image with the boxes the model predicts now (:data:`DEBUG_THRESHOLDS`), as a JPEG.

    Args:
        images: Tensor[B, 3, H, W], normalised RGB (the network input).
        outputs: the network's ``(regression, class logits, anchors)`` for ``images``.
    """
    regression, logits, anchors = (t.detach().float() for t in outputs)
    dets = postprocess((int(images.shape[2]), int(images.shape[3])), anchors, regression[:1],
                       logits[:1].sigmoid(), threshold=DEBUG_THRESHOLDS.score, iou_threshold=DEBUG_THRESHOLDS.iou,
                       obj_list=obj_list)[0]
    rgb = (images[0].detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1))
    bgr = np.ascontiguousarray(rgb.clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()[..., ::-1])
    canvas = draw_detections(bgr, dets.boxes, dets.class_ids, dets.scores, dets.class_names)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas)
