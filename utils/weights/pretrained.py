"""A detector with pretrained weights in one call: the torch.hub entries (``hubconf.py``) and
:meth:`utils.inference.Detector.from_pretrained` build on it.

The weights are the published COCO checkpoints ``efficientdet-d{c}.pth`` (90 classes), downloaded into
``weights/`` when missing (:func:`utils.weights.download.ensure_weights`: progress bar, size and checksum
checks, atomic write; offline, a one-line :class:`~utils.weights.download.DownloadError` naming the URL and
where to put the file by hand), or a local checkpoint. With another class count or other anchors the COCO
weights are loaded and the heads' output layers re-initialised (:func:`utils.weights.loading.load_weights`
logs which).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

from backbone import EfficientDet
from efficientdet.anchors import DEFAULT_RATIOS, DEFAULT_SCALES
from utils.weights import download
from utils.weights.loading import load_weights

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
COCO_CLASSES = 90


def pretrained_weights(compound_coef: int, weights: Optional[PathLike] = None,
                       weights_dir: Optional[PathLike] = None, url: Optional[str] = None,
                       progress: bool = True) -> Path:
    """The checkpoint to load: ``weights`` when given (it must exist), else ``weights_dir`` (default the
    repository's ``weights/``) ``/efficientdet-d{c}.pth``, downloaded from ``url`` (default the published
    release) when missing. Raises FileNotFoundError, DownloadError (a ConnectionError) or ValueError."""
    folder = weights_dir if weights_dir is not None else download.WEIGHTS_DIR
    return download.ensure_weights(compound_coef, weights, weights_dir=folder, url=url, progress=progress)


def build_pretrained(compound_coef: int, pretrained: bool = False, num_classes: int = COCO_CLASSES,
                     ratios: Sequence[Tuple[float, float]] = DEFAULT_RATIOS,
                     scales: Sequence[float] = DEFAULT_SCALES, pool_padding: str = "published",
                     weights: Optional[PathLike] = None, weights_dir: Optional[PathLike] = None,
                     url: Optional[str] = None, progress: bool = True) -> EfficientDet:
    """``EfficientDet`` D{compound_coef} (``8`` is D7x) in eval mode (``.train()`` to fine-tune).

    Args:
        compound_coef: 0 … 8.
        pretrained: load COCO weights (``weights``, or the published checkpoint, downloaded when missing).
            With ``num_classes`` other than 90 or other anchors every other tensor is loaded and the heads'
            output layers are re-initialised (logged).
        num_classes, ratios, scales, pool_padding: the model (:class:`backbone.EfficientDet`).
        weights: a local checkpoint to load instead of the published one (needs ``pretrained=True``).
        weights_dir, url, progress: where the published checkpoint is kept, a mirror, the progress bar.

    Raises:
        ValueError: bad model arguments, ``weights`` without ``pretrained``, a checkpoint of another model.
        FileNotFoundError: ``weights`` does not exist. DownloadError: the download failed (offline).
    """
    if weights is not None and not pretrained:
        raise ValueError(f"weights={str(weights)!r} is loaded only with pretrained=True")
    model = EfficientDet(num_classes=num_classes, compound_coef=compound_coef, ratios=ratios, scales=scales,
                         pool_padding=pool_padding)
    if pretrained:
        path = pretrained_weights(compound_coef, weights, weights_dir, url, progress)
        load_weights(model, path)
        logger.info("loaded %s into %s (%d classes)", path, model.config.name, num_classes)
    return model.eval()
