"""COCO-format JSON: the annotation file of a split and the readers that name the file and the entry in
every error."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Container, Dict, Protocol, Sequence, Tuple, Union

logger = logging.getLogger(__name__)


class ProjectLike(Protocol):
    """What this module reads of a ``utils.config.project.ProjectConfig`` (``efficientdet/`` does not import ``utils/``)."""

    project_name: str
    train_set: str
    val_set: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    obj_list: Tuple[str, ...]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def annotation_path(dataset_root: Union[str, Path], set_name: str) -> Path:
    """The COCO annotation file of one split: ``{dataset_root}/annotations/instances_{set_name}.json``
    (the published layout; the one place that spells it)."""
    return Path(dataset_root) / "annotations" / f"instances_{set_name}.json"


def read_json(path: Union[str, Path], kind: str = "JSON file") -> Any:
    """The parsed content of a JSON file; ``kind`` names the file in the not-found message.

    Raises:
        FileNotFoundError: the file does not exist ("{kind} not found: {path}").
        ValueError: not UTF-8 or malformed JSON, naming the file and the position.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_coco_json(path: Union[str, Path], keys: Sequence[str] = ("images", "annotations")) -> Dict[str, Any]:
    """Read a COCO instances JSON whose ``keys`` must be lists.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not UTF-8, malformed JSON, not an object, or a key missing / not a list (named).
    """
    path = Path(path)
    data = read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with {', '.join(repr(k) for k in keys)}, "
                         f"got {type(data).__name__}")
    for key in keys:
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: key {key!r}: expected a list, got {type(data[key]).__name__}")
    return data


def _check_entry(path: Path, section: str, position: int, entry: Any, keys: Sequence[str]) -> None:
    """``entry`` (``data[section][position]`` of a COCO JSON) is an object holding ``keys``; else a ValueError
    naming the file, the entry (its id where it has one) and the key."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {section}[{position}]: expected an object, got {type(entry).__name__}")
    label = {"images": "image", "annotations": "annotation"}.get(section, section)
    for key in keys:
        if key not in entry:
            raise ValueError(f"{path}: {label} id {entry.get('id', '?')} ({section}[{position}]): missing key {key!r}")


def check_annotation(path: Path, position: int, ann: Any, image_ids: Container[int],
                     obj_list: Sequence[str]) -> Sequence[float]:
    """The ``bbox`` ``[x, y, w, h]`` of ``ann`` (``annotations[position]`` of the COCO JSON ``path``) once checked:
    the keys ``id``, ``image_id`` (one of ``image_ids``), ``category_id`` (an integer naming a non-empty class
    ``obj_list[category_id - 1]``) and ``bbox`` (4 finite numbers); else a ValueError naming the file, the
    annotation id and the key."""
    _check_entry(path, "annotations", position, ann, ("id", "image_id", "category_id", "bbox"))
    ann_id, category_id, bbox = ann["id"], ann["category_id"], ann["bbox"]
    if ann["image_id"] not in image_ids:
        raise ValueError(f"{path}: annotation id {ann_id}: image_id {ann['image_id']!r} is not in 'images'")
    if isinstance(category_id, bool) or not isinstance(category_id, int):
        raise ValueError(f"{path}: annotation id {ann_id}: key 'category_id': expected an integer, "
                         f"got {category_id!r}")
    if not 1 <= category_id <= len(obj_list) or obj_list[category_id - 1] == "":
        raise ValueError(f"{path}: annotation id {ann_id}: category_id {category_id} has no class in the "
                         f"project's obj_list ({len(obj_list)} entries, obj_list[category_id - 1] "
                         "must be a non-empty name)")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise ValueError(f"{path}: annotation id {ann_id}: key 'bbox': expected [x, y, width, height] "
                         f"numbers, got {bbox!r}")
    return bbox


def obj_list_from_categories(categories: Any, path: Union[str, Path]) -> Tuple[str, ...]:
    """Class names from a COCO json's ``categories``: ``obj_list[category_id - 1] = name``, ``''`` for unused ids.

    Raises:
        ValueError: ``categories`` missing, empty or malformed (an entry without an integer id ≥ 1 and a
            non-empty name, or a duplicate id), naming the file (``path``) and the entry.
    """
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{path}: no obj_list given and no 'categories' list to take the class names from")
    names: Dict[int, str] = {}
    for position, category in enumerate(categories):
        category_id = category.get("id") if isinstance(category, dict) else None
        name = category.get("name") if isinstance(category, dict) else None
        if isinstance(category_id, bool) or not isinstance(category_id, int) or category_id < 1:
            raise ValueError(f"{path}: categories[{position}]: expected an integer 'id' >= 1, got {category!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{path}: category id {category_id}: expected a non-empty 'name', got {name!r}")
        if category_id in names:
            raise ValueError(f"{path}: category id {category_id}: duplicate id")
        names[category_id] = name
    return tuple(names.get(i, "") for i in range(1, max(names) + 1))


def check_category_names(categories: Any, obj_list: Sequence[str], path: Union[str, Path]) -> None:
    """Warn (once) where the json's category names differ from ``obj_list`` at ``id - 1``."""
    if not isinstance(categories, list):
        return
    differing = []
    # the 'categories' list is informative only (labels come from category_id): malformed entries are ignored
    usable = [c for c in categories if isinstance(c, dict) and isinstance(c.get("id"), int)]
    for category in usable:
        index = category["id"] - 1
        name = obj_list[index] if 0 <= index < len(obj_list) else None
        if name and name != category.get("name"):
            differing.append(f"id {category['id']}: {category.get('name')!r} vs {name!r}")
    if differing:
        logger.warning("%s: %d category names differ from obj_list[id - 1] (labels follow category_id): %s",
                       path, len(differing), "; ".join(differing[:5]))
