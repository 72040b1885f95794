"""Image pre-processing and the inverse box mapping, as the published implementation does it.

Order (published ``preprocess`` / ``aspectaware_resize_padding``): BGR → RGB, ``/ 255``,
``(x − mean) / std``, THEN an aspect-preserving ``cv2.resize`` (bilinear) of the normalised image so that
it fits the canvas (the longer side equals the input size; the shorter one is ``int(size / longer ·
shorter)``; a square image fills the height: ``new_h = size``, ``new_w = int(size / side · side)``, as the
published ``if old_w > old_h: fit the width, else the height``), pasted at the top-left of a zero float32
canvas. Padding is therefore 0 in normalised units (the mean colour), not black. The pixel arithmetic and
the geometry are the training pipeline's, from :mod:`efficientdet.transforms` (one pixel arithmetic; one
geometry with the published tie rule of each side: the training ``Resizer`` fits a square image by its
width, as published); this module adds reading, batching and the inverse box mapping.

Boxes found on the canvas map back to the original image by dividing x by ``new_w / old_w`` and y by
``new_h / old_h`` (:func:`boxes_to_original`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch import Tensor

from efficientdet.image_files import read_image as _read_checked_image
from efficientdet.transforms import (DEFAULT_MEAN, DEFAULT_STD, FIT_TIES_INFERENCE, check_mean_std, letterbox,
                                     normalize, to_unit_rgb)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: A path, a numpy array (BGR unless ``color="rgb"``) or a PIL image (RGB; PIL is optional and never imported here).
ImageSource = Union[str, Path, np.ndarray, Any]
ImageInput = Union[ImageSource, Sequence[ImageSource]]
COLOR_ORDERS = ("bgr", "rgb")
SizeSpec = Union[int, Tuple[int, int]]


@dataclass(frozen=True)
class ImageMeta:
    """Where one image went on the canvas.

    Attributes:
        old_h, old_w: original image size in pixels.
        new_h, new_w: size of the resized image on the canvas (top-left corner).
        canvas_h, canvas_w: network input size.
        source: file path, or "<array N>" for an in-memory image.
    """

    old_h: int
    old_w: int
    new_h: int
    new_w: int
    canvas_h: int
    canvas_w: int
    source: str = ""

    @property
    def scale_x(self) -> float:
        """``new_w / old_w``: canvas x = original x · scale_x."""
        return self.new_w / self.old_w

    @property
    def scale_y(self) -> float:
        """``new_h / old_h``: canvas y = original y · scale_y."""
        return self.new_h / self.old_h


def canvas_size(size: SizeSpec) -> Tuple[int, int]:
    """``512`` -> (512, 512); ``(h, w)`` -> (h, w). ValueError for non-positive or malformed sizes."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        height = width = int(size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size):
        height, width = int(size[0]), int(size[1])
    else:
        raise ValueError(f"input size must be an int or a (height, width) pair of ints, got {size!r}")
    if height <= 0 or width <= 0:
        raise ValueError(f"input size must be positive, got {size!r}")
    return height, width


def read_image(path: Union[str, Path]) -> np.ndarray:
    """Read an image file as BGR uint8 ``[H, W, 3]`` (grayscale and alpha are converted): the training
    loader's :func:`efficientdet.image_files.read_image`, so a truncated or corrupt file is an error naming
    it here too, never an image completed in grey by the decoder.

    Raises FileNotFoundError (missing file) or ValueError (not a readable image), naming the file.
    """
    return _read_checked_image(path)


def check_color(color: str) -> str:
    """``"bgr"`` or ``"rgb"`` (any case) -> lower case; ValueError naming the value otherwise."""
    if not isinstance(color, str) or color.lower() not in COLOR_ORDERS:
        raise ValueError(f"color must be 'bgr' (OpenCV arrays, the default) or 'rgb' (PIL, matplotlib, "
                         f"imageio arrays), got {color!r}")
    return color.lower()


def to_bgr(image: np.ndarray, source: str = "image", color: str = "bgr") -> np.ndarray:
    """A uint8 image ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` -> BGR ``[H, W, 3]``.

    ``color`` is the channel order of a colour array: ``"bgr"`` (BGR / BGRA, OpenCV's; the default) or ``"rgb"``
    (RGB / RGBA, as PIL, matplotlib and imageio give them). A grey image is the same either way.
    """
    color = check_color(color)
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{source}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{source}: expected a uint8 image, got dtype {image.dtype} (shape {image.shape})")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        raise ValueError(f"{source}: expected an image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                         f"got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{source}: empty image of shape {image.shape}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2BGR if color == "rgb" else cv2.COLOR_BGRA2BGR)
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if color == "rgb" else image


def _is_pil_image(item: Any) -> bool:
    """Whether ``item`` is a PIL image. PIL is optional: only a program that imported it can hold one, so it is
    looked up among the loaded modules, never imported."""
    module = sys.modules.get("PIL.Image")
    image_class = getattr(module, "Image", None) if module is not None else None
    return isinstance(image_class, type) and isinstance(item, image_class)


def pil_to_bgr(image: Any, source: str = "image") -> np.ndarray:
    """A PIL image (RGB, RGBA, grey "L"; any other mode is converted to RGB by PIL) -> BGR uint8 ``[H, W, 3]``."""
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    return to_bgr(np.asarray(image), f"{source} (PIL {image.mode})", color="rgb")


def load_images(images: ImageInput, color: str = "bgr") -> Tuple[List[np.ndarray], List[str]]:
    """Paths, numpy arrays (channel order ``color``, see :func:`to_bgr`) and/or PIL images, one or a sequence
    -> (BGR uint8 ``[H, W, 3]`` images, source names). Files are read as BGR and PIL images are RGB whatever
    ``color`` says."""
    color = check_color(color)
    if isinstance(images, (str, Path, np.ndarray)) or _is_pil_image(images) or not hasattr(images, "__iter__"):
        images = [images]
    loaded, sources = [], []
    for index, item in enumerate(images):
        if isinstance(item, (str, Path)):
            loaded.append(read_image(item))
            sources.append(str(item))
        elif isinstance(item, np.ndarray):
            name = f"<array {index}>"
            loaded.append(to_bgr(item, name, color))
            sources.append(name)
        elif _is_pil_image(item):
            name = f"<PIL image {index}>"
            loaded.append(pil_to_bgr(item, name))
            sources.append(name)
        else:
            raise ValueError(f"image {index}: expected a path, a numpy array or a PIL image, "
                             f"got {type(item).__name__}")
    if not loaded:
        raise ValueError("no images given")
    return loaded, sources


def normalize_and_fit(image: np.ndarray, canvas_h: int, canvas_w: int, mean: Sequence[float],
                      std: Sequence[float]) -> Tuple[np.ndarray, int, int]:
    """One BGR uint8 image ``[H, W, 3]`` -> (canvas float32 ``[canvas_h, canvas_w, 3]`` RGB normalised, new_h, new_w):
    the training pipeline's steps (:mod:`efficientdet.transforms`): to RGB in [0, 1], normalise, then letterbox
    (bilinear resize only when the size changes) with the published inference tie rule (a square image is
    fitted by its height, :data:`efficientdet.transforms.FIT_TIES_INFERENCE`), as published."""
    return letterbox(normalize(to_unit_rgb(image), mean, std), canvas_h, canvas_w, fit_ties_by=FIT_TIES_INFERENCE)


def preprocess(images: ImageInput, input_size: SizeSpec, mean: Sequence[float] = DEFAULT_MEAN,
               std: Sequence[float] = DEFAULT_STD,
               color: str = "bgr") -> Tuple[Tensor, List[ImageMeta], List[np.ndarray]]:
    """Images -> the network's input batch.

    Args:
        images: a path, a uint8 array (e.g. an OpenCV video frame; grayscale ``[H, W]``/``[H, W, 1]`` and
            BGRA ``[H, W, 4]`` work), a PIL image, or a sequence of them.
        input_size: canvas side (int) or (height, width); the caller checks it against the model's stride.
        mean, std: RGB normalisation of the project (``ProjectConfig.mean`` / ``.std``), in [0, 1] units.
        color: channel order of the numpy arrays: "bgr" (OpenCV, the default) or "rgb" (PIL, matplotlib,
            imageio). Files and PIL images are decoded with their own order whatever it says.

    Returns:
        (batch, metas, originals): batch ``Tensor[B, 3, H, W]`` float32 on the CPU (normalised RGB, image at
        the top-left, zeros elsewhere); one :class:`ImageMeta` per image; the original BGR uint8 images
        ``[h, w, 3]`` (for drawing).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: unreadable image, bad array, bad size, or no images; the message names the image.
    """
    canvas_h, canvas_w = canvas_size(input_size)
    check_mean_std(mean, std)  # before any file is read
    originals, sources = load_images(images, color)
    canvases, metas = [], []
    for image, source in zip(originals, sources):
        canvas, new_h, new_w = normalize_and_fit(image, canvas_h, canvas_w, mean, std)
        canvases.append(canvas)
        metas.append(ImageMeta(old_h=image.shape[0], old_w=image.shape[1], new_h=new_h, new_w=new_w,
                               canvas_h=canvas_h, canvas_w=canvas_w, source=source))
    batch = torch.from_numpy(np.stack(canvases)).permute(0, 3, 1, 2).contiguous()
    return batch, metas, originals


def boxes_to_original(boxes: Union[np.ndarray, Tensor], meta: ImageMeta,
                      clip: bool = True) -> Union[np.ndarray, Tensor]:
    """Map boxes from the canvas back to the original image.

    Args:
        boxes: ``[K, 4] (x1, y1, x2, y2)``, canvas (network input) pixels; numpy array or tensor.
        meta: the image's :class:`ImageMeta`.
        clip: clip x to ``[0, old_w − 1]`` and y to ``[0, old_h − 1]`` (the network-side clipping convention)
            so that boxes reaching into the padding end at the image border.

    Returns:
        A new array/tensor of the same type, ``[K, 4] (x1, y1, x2, y2)``, original image pixels.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [K, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    out = boxes.clone() if isinstance(boxes, Tensor) else np.array(boxes, copy=True)
    out[:, [0, 2]] = out[:, [0, 2]] / meta.scale_x
    out[:, [1, 3]] = out[:, [1, 3]] / meta.scale_y
    if clip:
        if isinstance(out, Tensor):
            out[:, [0, 2]] = out[:, [0, 2]].clamp(0, meta.old_w - 1)
            out[:, [1, 3]] = out[:, [1, 3]].clamp(0, meta.old_h - 1)
        else:
            out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, meta.old_w - 1)
            out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, meta.old_h - 1)
    return out


def list_images(paths: Sequence[Union[str, Path]]) -> List[Path]:
    """Files and folders -> image files (a folder contributes its images with a known extension, sorted).

    Raises FileNotFoundError for a missing path and ValueError for a folder without images.
    """
    found: List[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"image not found: {path}")
    if not found:
        raise ValueError("no images given")
    return found
