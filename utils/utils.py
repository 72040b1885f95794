"""The published ``utils.utils`` module API (zylo117 "Yet-Another-EfficientDet-Pytorch"), for scripts and
notebooks written against it. The published inference snippet runs unchanged::

    from backbone import EfficientDet
    from efficientdet.utils import BBoxTransform, ClipBoxes
    from utils.utils import preprocess, invert_affine, postprocess

    ori_imgs, framed_imgs, framed_metas = preprocess(img_path, max_size=512)
    x = torch.stack([torch.from_numpy(fi) for fi in framed_imgs], 0).to(torch.float32).permute(0, 3, 1, 2)
    features, regression, classification, anchors = model(x)
    out = postprocess(x, anchors, regression, classification, BBoxTransform(), ClipBoxes(), 0.2, 0.2)
    out = invert_affine(framed_metas, out)   # out[i]['rois'], out[i]['class_ids'], out[i]['scores']

Every function is a thin adapter over the project's one implementation, so the numbers are the same bits as
:class:`utils.inference.detector.Detector`'s: pre-processing is :mod:`utils.inference.preprocess`, post-processing
:func:`utils.inference.postprocess.postprocess`, the inverse mapping
:func:`utils.inference.preprocess.boxes_to_original` (without clipping to the image, as published and as the
Detector's default), drawing :mod:`utils.visual.draw`, ``boolean_string`` :func:`utils.config.cli.boolean_string`.
Pre-processing fits a square image by its height, as the published ``aspectaware_resize_padding`` (the
training ``Resizer`` fits it by its width, as published: :mod:`efficientdet.transforms`).

One layout note: the snippet's ``permute(0, 3, 1, 2)`` hands the network a channels-last tensor, and oneDNN's
channels-last convolutions round differently (about 1e-7) from the contiguous ones. With ``x = x.contiguous()``
the snippet gives bit for bit the detections of the default ``Detector`` (``mode="eager"``); as written, on one
image at a time (the published scripts' way), those of ``Detector(..., mode="channels_last")``, and otherwise
the same up to float round-off.

Deliberate differences from the published functions (each documented where it applies): missing or unreadable
images are errors naming the file (published: ``None`` and a crash later); empty results are arrays of shape
``[0, 4]`` / ``[0]`` (published: ``np.array(())``); ``aspectaware_resize_padding`` makes a ``height × width``
canvas (published: ``height × height``); ``standard_to_bgr`` converts every name it is given (published: all but
the last 36). New code should use :class:`utils.inference.detector.Detector`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from efficientdet.anchors import BBoxTransform, ClipBoxes
from utils.config.cli import boolean_string
from utils.visual.draw import color_for_class, draw_box, name_to_bgr
from utils.inference.postprocess import postprocess as _postprocess
from efficientdet.transforms import DEFAULT_MEAN, DEFAULT_STD, FIT_TIES_INFERENCE, letterbox
from utils.inference.preprocess import ImageMeta, boxes_to_original, canvas_size, load_images, normalize_and_fit

__all__ = ["STANDARD_COLORS", "aspectaware_resize_padding", "boolean_string", "color_list", "from_colorname_to_bgr",
           "get_index_label", "invert_affine", "plot_one_box", "postprocess", "preprocess", "preprocess_video",
           "standard_to_bgr"]

Meta = Tuple[int, int, int, int, int, int]
"""A published frame meta: ``(new_w, new_h, old_w, old_h, padding_w, padding_h)``."""


# --------------------------------------------------------------------------------------------------
# Pre-processing.


def aspectaware_resize_padding(image: np.ndarray, width: int, height: int, interpolation: Optional[int] = None,
                               means: Union[None, float, Sequence[float]] = None
                               ) -> Tuple[np.ndarray, int, int, int, int, int, int]:
    """Aspect-preserving resize onto the top-left of a float32 canvas (:func:`efficientdet.transforms.letterbox`).

    Args:
        image: ``[H, W, C]`` (or ``[H, W]``) array of any dtype ``cv2.resize`` takes, already normalised for
            the network when it is one of its inputs.
        width, height: canvas size; the image is scaled so that it fits (the longer side fills the canvas on a
            square one, the height for a square image; the other side is truncated with ``int()``, as
            published: ``if old_w > old_h: new_w = width, new_h = int(width / old_w * old_h)``, else
            ``new_w = int(height / old_h * old_w), new_h = height``).
        interpolation: a ``cv2.INTER_*`` flag; None is bilinear (cv2's default, as published).
        means: the canvas value outside the image (per channel), default 0.

    Returns:
        ``(canvas [height, width, C] float32, new_w, new_h, old_w, old_h, padding_w, padding_h)``. This is the
        published inference rule on square canvases, the only ones the published code uses (a square image is
        fitted by its height; the published training ``Resizer`` fits it by its width, and so does ours:
        :mod:`efficientdet.transforms`). On a non-square canvas the published function made a ``height ×
        height`` canvas and chose the side by ``old_w > old_h`` alone, overflowing the canvas where that side
        is not the limiting one; this one fits the limiting side (the height where the aspects are equal).
    """
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or 0 in image.shape[:2]:
        raise ValueError(f"aspectaware_resize_padding: expected an image array [H, W, C], got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    canvas_h, canvas_w = canvas_size((height, width))
    old_h, old_w = image.shape[:2]
    canvas, new_h, new_w = letterbox(image, canvas_h, canvas_w, cv2.INTER_LINEAR if interpolation is None
                                     else interpolation, fill=means, fit_ties_by=FIT_TIES_INFERENCE)
    return canvas, new_w, new_h, old_w, old_h, canvas_w - new_w, canvas_h - new_h


def _frame(images: Sequence[np.ndarray], max_size: Union[int, Tuple[int, int]], mean: Sequence[float],
           std: Sequence[float]) -> Tuple[List[np.ndarray], List[Meta]]:
    """BGR uint8 images -> (framed images [H, W, 3] float32 RGB normalised, published metas)."""
    canvas_h, canvas_w = canvas_size(max_size)
    framed, metas = [], []
    for image in images:
        canvas, new_h, new_w = normalize_and_fit(image, canvas_h, canvas_w, mean, std)
        framed.append(canvas)
        metas.append((new_w, new_h, image.shape[1], image.shape[0], canvas_w - new_w, canvas_h - new_h))
    return framed, metas


def preprocess(*image_path: str, max_size: Union[int, Tuple[int, int]] = 512,
               mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD
               ) -> Tuple[List[np.ndarray], List[np.ndarray], List[Meta]]:
    """Read and pre-process images for the network, as published (:mod:`utils.inference.preprocess`).

    Args:
        *image_path: image files (BGR uint8 arrays are accepted too).
        max_size: canvas side (the model's input size, e.g. 512 for D0); a ``(height, width)`` pair works too.
        mean, std: RGB normalisation in [0, 1] units, default ImageNet's ``(0.485, 0.456, 0.406)`` /
            ``(0.229, 0.224, 0.225)``, the published default (the project YAML's ``mean``/``std`` go here
            unchanged). An older published version wrote the default BGR-ordered, ``(0.406, 0.456, 0.485)`` /
            ``(0.225, 0.224, 0.229)``, and normalised before flipping to RGB: the same numbers; pass RGB order.

    Returns:
        ``(ori_imgs, framed_imgs, framed_metas)``: the images as read (BGR uint8 ``[h, w, 3]``); per image the
        canvas ``[max_size, max_size, 3]`` float32 (RGB, ``(x / 255 − mean) / std``, image at the top-left, 0
        elsewhere) that the caller stacks and permutes to NCHW; per image ``(new_w, new_h, old_w, old_h,
        padding_w, padding_h)`` for :func:`invert_affine`.

    Raises:
        FileNotFoundError / ValueError: a missing or unreadable image (named), bad size, mean or std.
    """
    originals, _ = load_images(list(image_path))
    framed, metas = _frame(originals, max_size, mean, std)
    return originals, framed, metas


def preprocess_video(*frame_from_video: np.ndarray, max_size: Union[int, Tuple[int, int]] = 512,
                     mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD
                     ) -> Tuple[Tuple[np.ndarray, ...], List[np.ndarray], List[Meta]]:
    """:func:`preprocess` for frames already in memory (BGR uint8 ``[h, w, 3]``, e.g. from ``cv2.VideoCapture``).

    Returns ``(ori_imgs, framed_imgs, framed_metas)``; ``ori_imgs`` is ``frame_from_video`` itself, as published.
    """
    frames, _ = load_images(list(frame_from_video))
    framed, metas = _frame(frames, max_size, mean, std)
    return frame_from_video, framed, metas


# --------------------------------------------------------------------------------------------------
# Post-processing.


def _check_coder(module: nn.Module, cls: type, name: str) -> None:
    # The project decodes and clips with efficientdet.anchors' classes only ("box coding only in anchors.py");
    # another module would be silently ignored, so it is refused.
    if not (isinstance(module, cls) and type(module).forward is cls.forward):
        raise ValueError(f"postprocess: {name} must be efficientdet.utils.{cls.__name__}() "
                         f"(= efficientdet.anchors.{cls.__name__}), got {type(module).__name__}")


def postprocess(x: Tensor, anchors: Tensor, regression: Tensor, classification: Tensor, regressBoxes: nn.Module,
                clipBoxes: nn.Module, threshold: float, iou_threshold: float) -> List[Dict[str, np.ndarray]]:
    """Network outputs -> detections per image, as published (:func:`utils.inference.postprocess.postprocess`).

    Args:
        x: the network input ``Tensor[B, 3, H, W]`` (only its size is used: boxes are clipped to it).
        anchors: ``Tensor[1, N, 4] (y1, x1, y2, x2)``, input pixels, as the model returns them.
        regression: ``Tensor[B, N, 4] (dy, dx, dh, dw)``.
        classification: ``Tensor[B, N, C]``, sigmoid probabilities.
        regressBoxes, clipBoxes: ``BBoxTransform()`` and ``ClipBoxes()`` from :mod:`efficientdet.utils` (the
            project's box coder; anything else is a ValueError).
        threshold: keep anchors whose best class probability is > this.
        iou_threshold: class-aware NMS suppresses IoU > this.

    Returns:
        One dict per image, by descending score: ``'rois'`` ``np.ndarray[K, 4]`` float32 ``(x1, y1, x2, y2)``,
        network-input pixels (:func:`invert_affine` maps them to the original image); ``'class_ids'``
        ``np.ndarray[K]`` int64 (index into ``obj_list``); ``'scores'`` ``np.ndarray[K]`` float32. Without
        detections the arrays have shape ``[0, 4]`` and ``[0]`` (published: ``np.array(())``).
    """
    _check_coder(regressBoxes, BBoxTransform, "regressBoxes")
    _check_coder(clipBoxes, ClipBoxes, "clipBoxes")
    with torch.no_grad():
        results = _postprocess((int(x.shape[-2]), int(x.shape[-1])), anchors, regression, classification,
                               threshold, iou_threshold)
    return [{"rois": dets.boxes, "class_ids": dets.class_ids, "scores": dets.scores} for dets in results]


def invert_affine(metas: Sequence[Sequence[int]], preds: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Map every ``preds[i]['rois']`` from the network input back to image ``i``'s pixels, in place, and return
    ``preds`` (:func:`utils.inference.preprocess.boxes_to_original`: x divided by ``new_w / old_w``, y by
    ``new_h / old_h``; no clipping, as published).

    Args:
        metas: ``framed_metas`` from :func:`preprocess`: per image ``(new_w, new_h, old_w, old_h, padding_w,
            padding_h)``.
        preds: :func:`postprocess`'s output (images without detections are left alone).
    """
    if isinstance(metas, (int, float)) or len(metas) < len(preds):
        raise ValueError(f"invert_affine: expected one (new_w, new_h, old_w, old_h, padding_w, padding_h) meta "
                         f"per prediction ({len(preds)}), got {metas!r}")
    for meta, pred in zip(metas, preds):
        rois = pred["rois"]
        if len(rois) == 0:
            continue
        if len(meta) != 6:
            raise ValueError(f"invert_affine: a meta is (new_w, new_h, old_w, old_h, padding_w, padding_h), "
                             f"got {meta!r}")
        new_w, new_h, old_w, old_h, padding_w, padding_h = (int(v) for v in meta)
        image_meta = ImageMeta(old_h=old_h, old_w=old_w, new_h=new_h, new_w=new_w,
                               canvas_h=new_h + padding_h, canvas_w=new_w + padding_w)
        rois[...] = boxes_to_original(rois, image_meta, clip=False)
    return preds


# --------------------------------------------------------------------------------------------------
# Drawing.

STANDARD_COLORS: List[str] = [
    "LawnGreen", "Chartreuse", "Aqua", "Beige", "Azure", "BlanchedAlmond", "Bisque",
    "Aquamarine", "BlueViolet", "BurlyWood", "CadetBlue", "AntiqueWhite",
    "Chocolate", "Coral", "CornflowerBlue", "Cornsilk", "Crimson", "Cyan",
    "DarkCyan", "DarkGoldenRod", "DarkGrey", "DarkKhaki", "DarkOrange",
    "DarkOrchid", "DarkSalmon", "DarkSeaGreen", "DarkTurquoise", "DarkViolet",
    "DeepPink", "DeepSkyBlue", "DodgerBlue", "FireBrick", "FloralWhite",
    "ForestGreen", "Fuchsia", "Gainsboro", "GhostWhite", "Gold", "GoldenRod",
    "Salmon", "Tan", "HoneyDew", "HotPink", "IndianRed", "Ivory", "Khaki",
    "Lavender", "LavenderBlush", "AliceBlue", "LemonChiffon", "LightBlue",
    "LightCoral", "LightCyan", "LightGoldenRodYellow", "LightGray", "LightGrey",
    "LightGreen", "LightPink", "LightSalmon", "LightSeaGreen", "LightSkyBlue",
    "LightSlateGray", "LightSlateGrey", "LightSteelBlue", "LightYellow", "Lime",
    "LimeGreen", "Linen", "Magenta", "MediumAquaMarine", "MediumOrchid",
    "MediumPurple", "MediumSeaGreen", "MediumSlateBlue", "MediumSpringGreen",
    "MediumTurquoise", "MediumVioletRed", "MintCream", "MistyRose", "Moccasin",
    "NavajoWhite", "OldLace", "Olive", "OliveDrab", "Orange", "OrangeRed",
    "Orchid", "PaleGoldenRod", "PaleGreen", "PaleTurquoise", "PaleVioletRed",
    "PapayaWhip", "PeachPuff", "Peru", "Pink", "Plum", "PowderBlue", "Purple",
    "Red", "RosyBrown", "RoyalBlue", "SaddleBrown", "Green", "SandyBrown",
    "SeaGreen", "SeaShell", "Sienna", "Silver", "SkyBlue", "SlateBlue",
    "SlateGray", "SlateGrey", "Snow", "SpringGreen", "SteelBlue", "GreenYellow",
    "Teal", "Thistle", "Tomato", "Turquoise", "Violet", "Wheat", "White",
    "WhiteSmoke", "Yellow", "YellowGreen",
]
"""The published colour names (CSS3), indexed by class id in the published scripts."""

Color = Tuple[int, int, int]


def from_colorname_to_bgr(color: str) -> Color:
    """A CSS3 colour name -> BGR triple (:func:`utils.visual.draw.name_to_bgr`); ValueError for an unknown name."""
    return name_to_bgr(color)


def standard_to_bgr(list_color_name: Sequence[str]) -> List[Color]:
    """Colour names -> BGR triples, one per name (the published function left out the last 36 names, to get
    90 colours from :data:`STANDARD_COLORS`; the first 90 here are the same)."""
    return [name_to_bgr(name) for name in list_color_name]


color_list: List[Color] = standard_to_bgr(STANDARD_COLORS)
"""BGR colours of :data:`STANDARD_COLORS` (published: ``color_list = standard_to_bgr(STANDARD_COLORS)``)."""


def get_index_label(label: str, obj_list: Sequence[str]) -> int:
    """The class id of ``label`` in ``obj_list`` (its first occurrence); ValueError naming it if absent."""
    try:
        return int(list(obj_list).index(label))
    except ValueError:
        raise ValueError(f"label {label!r} is not in obj_list ({len(obj_list)} names)") from None


def plot_one_box(img: np.ndarray, coord: Sequence[float], label: Optional[str] = None, score: Optional[float] = None,
                 color: Optional[Sequence[int]] = None, line_thickness: Optional[int] = None) -> None:
    """Draw one box ``coord = (x1, y1, x2, y2)`` (image pixels) on the BGR uint8 image ``img``, in place, with
    :func:`utils.visual.draw.draw_box`: the label reads ``"label: 87%"`` (``"label"`` when ``score`` is None).

    ``color`` is a BGR triple (default: the colour of class 0 in :mod:`utils.visual.draw`); ``line_thickness`` defaults
    to :func:`utils.visual.draw.line_thickness` (about 0.2 % of the longer side). Box corners are rounded to pixels
    (published: truncated) and the label is drawn in :mod:`utils.visual.draw`'s style.
    """
    if len(coord) != 4:
        raise ValueError(f"plot_one_box: coord must be (x1, y1, x2, y2), got {coord!r}")
    bgr = color_for_class(0) if color is None else tuple(int(c) for c in color)
    text = None
    if label:
        text = str(label) if score is None else f"{label}: {float(score):.0%}"
    draw_box(img, coord, bgr, label=text, thickness=line_thickness)
