"""A :class:`utils.inference.detector.Detector` over a COCO-style image set: detections, and their COCO metrics."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

from utils.evaluation.cocoeval import evaluate_coco
from utils.evaluation.records import detections_to_coco, load_coco_annotations

if TYPE_CHECKING:  # utils.inference.detector imports torch and the model; only its types are needed here
    from utils.inference.detector import Detections, Detector

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]



def _selected_images(ann_file: PathLike, max_images: Optional[int] = None,
                     shard: Optional[Tuple[int, int]] = None) -> List[Dict[str, Any]]:
    """The ``images`` entries of ``ann_file`` in the file's order: the first ``max_images``, of them the share
    ``images[rank::world]`` of ``shard = (rank, world)``."""
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                   or max_images < 1):
        raise ValueError(f"max_images must be an integer >= 1 or None, got {max_images!r}")
    images = load_coco_annotations(ann_file)["images"]
    if max_images is not None:
        images = images[:max_images]
    if shard is not None:
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard rank {rank} outside 0 … {world - 1} (world {world})")
        images = images[rank::world]
    return images


def run_detector_on_set(detector: "Detector", image_dir: PathLike, ann_file: PathLike, batch_size: int = 1,
                        max_images: Optional[int] = None, progress: bool = True,
                        shard: Optional[Tuple[int, int]] = None) -> Tuple[List[int], List["Detections"]]:
    """Detect on the images of ``ann_file`` (in the file's order) found in ``image_dir``.

    Args:
        detector: anything with ``detect(list of paths) -> list of Detections``
            (:class:`utils.inference.detector.Detector`).
        image_dir: folder of the images (``file_name`` of each ``images`` entry).
        ann_file: COCO instances JSON.
        batch_size: paths per ``detector.detect`` call.
        max_images: only the first ``max_images`` images (``None``: all).
        progress: show a tqdm bar.
        shard: ``(rank, world)``: only this process's share of those images, every ``world``-th from
            position ``rank`` (the shares of ranks ``0 … world - 1`` cover each image once; score them
            together with :func:`score_gathered`). ``None``: all of them.

    Returns:
        ``(image_ids, detections)``, one entry per image.

    Raises:
        FileNotFoundError: the annotation file, the image folder or an image is missing (checked
            before any detection runs).
        ValueError: ``batch_size`` or ``max_images`` below 1, a ``shard`` rank outside ``0 … world - 1``,
            or the detector returns the wrong count.
    """
    from tqdm import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    images = _selected_images(ann_file, max_images, shard)
    folder = Path(image_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = [folder / str(image["file_name"]) for image in images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image not found: {missing[0]}"
                                + (f" (and {len(missing) - 1} more listed in {ann_file})" if len(missing) > 1 else ""))

    image_ids = [int(image["id"]) for image in images]
    detections: List["Detections"] = []
    with tqdm(total=len(paths), desc="detecting", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch = [str(p) for p in paths[start:start + batch_size]]
            found = detector.detect(batch)
            if len(found) != len(batch):
                raise ValueError(f"detector returned {len(found)} results for {len(batch)} images")
            detections.extend(found)
            bar.update(len(batch))
    return image_ids, detections


def evaluate_detector(detector: "Detector", image_dir: PathLike, ann_file: PathLike, obj_list: Sequence[str],
                      batch_size: int = 1, max_images: Optional[int] = None,
                      progress: bool = False) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Detect, convert and score in one call (for ``train.py``): ``(metrics, result records)``.

    ``metrics["AP"]`` is the COCO mAP@[.50:.95]; see :func:`evaluate_coco` for the rest.
    """
    image_ids, detections = run_detector_on_set(detector, image_dir, ann_file, batch_size, max_images, progress)
    results = detections_to_coco(image_ids, detections, obj_list)
    return evaluate_coco(ann_file, results, image_ids, obj_list), results


def score_gathered(ann_file: PathLike, shards: Sequence[Sequence[Dict[str, Any]]], obj_list: Sequence[str],
                   max_images: Optional[int] = None) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Score the COCO result records of all the shards of a set (``run_detector_on_set(..., shard=(r, world))``
    then :func:`detections_to_coco` on each rank ``r``) as one evaluation: ``(metrics, result records)``.

    The records are put back image by image in the file's order (each image's own order kept), the order a
    single process produces, and scored over every image (the first ``max_images``), so the metrics equal
    those of :func:`evaluate_detector` on the whole set.

    Raises:
        ValueError: a record's ``image_id`` is not one of those images.
    """
    image_ids = [int(image["id"]) for image in _selected_images(ann_file, max_images)]
    position = {image_id: index for index, image_id in enumerate(image_ids)}
    records = [record for shard in shards for record in shard]
    stray = [record["image_id"] for record in records if record["image_id"] not in position]
    if stray:
        raise ValueError(f"{ann_file}: gathered results name image id {stray[0]}, not among the evaluated images")
    records.sort(key=lambda record: position[record["image_id"]])  # stable: each image keeps its order
    return evaluate_coco(ann_file, records, image_ids, obj_list), records
