"""The single inference entry point: images -> detections in original image coordinates.

Used by ``efficientdet_test.py``, ``efficientdet_test_videos.py``, the evaluator and the benchmark::

    detector = Detector.from_checkpoint(0, "weights/efficientdet-d0.pth", "coco")
    for dets in detector.detect(["a.jpg", "b.jpg"]):
        print(dets.boxes, dets.class_names, dets.scores)

    detector = Detector.from_pretrained(0)              # the published COCO D0, downloaded when missing
    detector.detect(pil_image)                           # PIL images are RGB
    detector.detect(rgb_array, color="rgb")              # numpy arrays are BGR (OpenCV) unless told otherwise

Pre-processing is :func:`utils.inference.preprocess.preprocess` (project mean/std, aspect-preserving fit),
post-processing :func:`utils.inference.postprocess.postprocess` (always float32, also under ``float16``), then the
boxes are mapped back to each original image: the published pipeline (``preprocess`` -> model -> ``postprocess``
-> ``invert_affine``), whose boxes are clipped to the network input only, so a box reaching into the padding
may end past the image border (``clip_to_image=True`` clips them to the image).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from backbone import EfficientDet, build_model
from utils.config.device import select_device
from utils.inference.modes import InferenceModel
from utils.inference.postprocess import DEMO_THRESHOLDS, Detections, Thresholds, postprocess
from utils.inference.preprocess import ImageInput, ImageMeta, SizeSpec, boxes_to_original, canvas_size, preprocess
from utils.config.project import ProjectConfig, load_project
from utils.inference.soft_nms import official_postprocess
from utils.weights.loading import load_weights
from utils.weights.pretrained import pretrained_weights

logger = logging.getLogger(__name__)

__all__ = ["Detections", "Detector"]


def _same_numbers(a: Sequence[Any], b: Sequence[Any]) -> bool:
    flat_a = [float(v) for item in a for v in (item if isinstance(item, (tuple, list)) else (item,))]
    flat_b = [float(v) for item in b for v in (item if isinstance(item, (tuple, list)) else (item,))]
    return len(flat_a) == len(flat_b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(flat_a, flat_b))


class Detector:
    """An :class:`EfficientDet` in eval mode plus the project's pre- and post-processing.

    Args:
        model: the detector; moved to ``device`` and put in eval mode (and half precision with ``float16``).
        project: the project (class names, mean/std, anchors); its class count and anchors must match the model.
        input_size: canvas side (int) or (height, width); default ``model.config.input_size``; every side must be
            a multiple of ``model.config.max_stride`` (ValueError otherwise).
        device: anything :func:`utils.config.device.select_device` accepts (default: CUDA when available, else CPU).
        float16: run the network in half precision (the same as adding ``+fp16`` to ``mode``). CUDA only: on
            another device it is a ValueError. Post-processing always runs in float32.
        threshold: default score threshold (keep score > threshold).
        iou_threshold: default NMS IoU threshold (suppress IoU > iou_threshold).
        clip_to_image: clip boxes to ``[0, W − 1] × [0, H − 1]`` of the original image after mapping them back
            (default False: as published, clipped to the network input only).
        nms: "hard" (default: score > threshold, batched NMS, as the published implementation) or
            "soft" (the official evaluation: top-5000 class-anchor scores, per-class gaussian soft-NMS,
            at most 100 boxes; ``threshold``/``iou_threshold`` do not apply; see :mod:`utils.inference.soft_nms`).
        mode: inference mode of :class:`utils.inference.modes.InferenceModel`: "eager" (default, plain float32),
            "fused", "channels_last", "trace", "bf16", "fp16" joined with "+" (e.g. "fused+channels_last+trace"),
            or "fastest". Every float32 mode gives the same detections as "eager" (up to float round-off).

    Attributes:
        model: the detector as given, on ``device`` (converted in place unless the mode folds a copy).
        runner: the :class:`utils.inference.modes.InferenceModel` that runs the forward pass.
    """

    def __init__(self, model: EfficientDet, project: ProjectConfig, input_size: Optional[SizeSpec] = None,
                 device: Optional[Union[str, torch.device]] = None, float16: bool = False,
                 threshold: float = DEMO_THRESHOLDS.score, iou_threshold: float = DEMO_THRESHOLDS.iou,
                 clip_to_image: bool = False,
                 nms: str = "hard", mode: str = "eager") -> None:
        if nms not in ("hard", "soft"):
            raise ValueError(f"nms must be 'hard' or 'soft', got {nms!r}")
        if model.num_classes != project.num_classes:
            raise ValueError(f"model has {model.num_classes} classes, project {project.path or project.project_name} "
                             f"lists {project.num_classes} in obj_list")
        if not (_same_numbers(model.anchors.scales, project.anchors_scales)
                and _same_numbers(model.anchors.ratios, project.anchors_ratios)):
            raise ValueError(f"model anchors (scales {model.anchors.scales}, ratios {model.anchors.ratios}) "
                             f"differ from project {project.path or project.project_name} "
                             f"({project.anchors_scales}, {project.anchors_ratios})")
        self.device = select_device(device)
        if float16 and self.device.type != "cuda":
            raise ValueError(f"float16 inference needs a CUDA device, got {self.device}")
        size = input_size if input_size is not None else model.config.input_size
        self.input_hw: Tuple[int, int] = canvas_size(size)
        model.check_input_size(*self.input_hw)
        self.runner = InferenceModel(model.to(device=self.device).eval(), f"{mode}+fp16" if float16 else mode,
                                     device=self.device)
        self.mode = self.runner.name
        self.float16 = self.runner.dtype == torch.float16
        self.dtype = self.runner.dtype
        self.model = model
        self.project = project
        thresholds = Thresholds(float(threshold), float(iou_threshold))  # ValueError when out of range
        self.threshold, self.iou_threshold = thresholds.score, thresholds.iou
        self.clip_to_image = clip_to_image
        self.nms = nms

    @classmethod
    def from_checkpoint(cls, compound_coef: int, weights: Union[str, Path, Mapping[str, Any]],
                        project: Union[ProjectConfig, str, Path], **kwargs: Any) -> "Detector":
        """Build ``-c compound_coef`` for the project (classes, anchors, pool padding: see
        :func:`backbone.build_model`), load ``weights`` (path or state_dict; the class count must
        match), and wrap it. ``kwargs`` go to :class:`Detector`.

        Raises FileNotFoundError / ValueError (missing file, checkpoint of another model or class count).
        """
        if not isinstance(project, ProjectConfig):
            project = load_project(project)
        model = build_model(compound_coef, project)
        load_weights(model, weights, strict_classes=True)
        return cls(model, project, **kwargs)

    @classmethod
    def from_pretrained(cls, compound_coef: int = 0, weights: Optional[Union[str, Path]] = None,
                        project: Union[ProjectConfig, str, Path] = "coco", weights_dir: Optional[Union[str, Path]] = None,
                        url: Optional[str] = None, progress: bool = True, **kwargs: Any) -> "Detector":
        """D{compound_coef} with the published COCO weights (``weights/efficientdet-d{c}.pth``, downloaded with a
        progress bar and size check when missing; ``weights_dir`` / ``url`` change where from and to) or with
        ``weights`` (a local checkpoint of the project's class count). ``kwargs`` go to :class:`Detector`.

        Raises FileNotFoundError (``weights`` missing), DownloadError (a ConnectionError naming the URL and
        where to put the file by hand), ValueError (a checkpoint of another model or class count).
        """
        path = pretrained_weights(compound_coef, weights, weights_dir, url, progress)
        return cls.from_checkpoint(compound_coef, path, project, **kwargs)

    @property
    def obj_list(self) -> Tuple[str, ...]:
        return self.project.obj_list

    def preprocess(self, images: ImageInput, color: str = "bgr") -> Tuple[Tensor, List[ImageMeta], list]:
        """:func:`utils.inference.preprocess.preprocess` with this detector's input size and the project's mean/std."""
        return preprocess(images, self.input_hw, mean=self.project.mean, std=self.project.std, color=color)

    def detect(self, images: ImageInput, threshold: Optional[float] = None,
               iou_threshold: Optional[float] = None, color: str = "bgr") -> List[Detections]:
        """Detect objects in one or more images, in one batched forward.

        Args:
            images: a path, a uint8 numpy array ``[H, W, 3]`` (also ``[H, W]``, ``[H, W, 1]``, ``[H, W, 4]``), a
                PIL image, or a list of them.
            threshold, iou_threshold: override the detector's defaults.
            color: channel order of the numpy arrays: "bgr" (OpenCV's ``cv2.imread`` / video frames, the
                default) or "rgb" (PIL, matplotlib, imageio). A 3-channel array is taken as BGR unless told
                "rgb"; files and PIL images are read in their own order whatever it says.

        Returns one :class:`Detections` per image, boxes ``(x1, y1, x2, y2)`` in that image's pixels.
        Raises ValueError naming the image for an array of another shape or dtype than uint8.
        """
        batch, metas, _ = self.preprocess(images, color)
        return self.predict_batch(batch, metas, threshold, iou_threshold)

    @torch.inference_mode()
    def predict_batch(self, batch: Tensor, metas: Optional[Sequence[ImageMeta]] = None,
                      threshold: Optional[float] = None, iou_threshold: Optional[float] = None) -> List[Detections]:
        """Forward + post-processing of an already pre-processed batch.

        Args:
            batch: Tensor[B, 3, H, W], normalised RGB (any device / float dtype; moved to the model's).
            metas: one :class:`ImageMeta` per image to map boxes back to the originals, or None to keep
                network-input pixels.
            threshold, iou_threshold: override the detector's defaults.

        Returns:
            One :class:`Detections` per image, by descending score.
        """
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a batch Tensor[B, 3, H, W], got shape {tuple(batch.shape)}")
        if metas is not None and len(metas) != batch.shape[0]:
            raise ValueError(f"{len(metas)} metas for a batch of {batch.shape[0]} images")
        threshold = self.threshold if threshold is None else float(threshold)
        iou_threshold = self.iou_threshold if iou_threshold is None else float(iou_threshold)
        # Anchors come back in float32 whatever the network's dtype (half-precision anchors lose whole
        # pixels above 1024).
        regression, classification, anchors = self.runner(batch)
        input_hw = (int(batch.shape[2]), int(batch.shape[3]))
        if self.nms == "soft":
            results = [_to_detections(r, self.project.obj_list) for r in official_postprocess(
                regression.float(), classification.float(), anchors, input_hw)]
        else:
            results = postprocess(input_hw, anchors, regression, classification, threshold, iou_threshold,
                                  obj_list=self.project.obj_list)
        if metas is not None:
            for dets, meta in zip(results, metas):
                dets.boxes = boxes_to_original(dets.boxes, meta, clip=self.clip_to_image)
        return results


def _to_detections(result: Dict[str, Tensor], obj_list: Sequence[str]) -> Detections:
    """A :func:`utils.inference.soft_nms.official_postprocess` result as :class:`Detections`."""
    class_ids = result["class_ids"].cpu().numpy().astype(np.int64)
    return Detections(result["rois"].float().cpu().numpy(), class_ids, result["scores"].float().cpu().numpy(),
                      [obj_list[c] if 0 <= c < len(obj_list) else "" for c in class_ids.tolist()])
