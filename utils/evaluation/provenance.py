"""Results files and their provenance record (``{results}.meta.json``): hashes of the weights, annotations
and results and every setting that shapes the detections, so that a results file is re-scored only when it
provably came from the same weights and settings."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from efficientdet.coco import read_json

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

PROVENANCE_SUFFIX = ".meta.json"
#: 2: the published evaluation (square images fitted by their height, boxes not clipped to the image unless
#: ``clip_boxes``, float32 values unrounded); records of format 1 came from another pipeline and are not reused.
PROVENANCE_FORMAT = 2
_HASH_CHUNK = 1 << 20


def provenance_path(results_file: PathLike) -> Path:
    """The provenance record of ``results_file``: ``{results_file}.meta.json`` beside it."""
    path = Path(results_file)
    return path.with_name(path.name + PROVENANCE_SUFFIX)


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks). FileNotFoundError naming a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(data: bytes, path: Path) -> None:
    """``data`` to ``path`` through a temporary file beside it and ``os.replace``: ``path`` holds its old
    content or the new one, never a part. OSError naming ``path`` (the temporary file is removed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing with a stored record."""
    return json.loads(json.dumps(value, allow_nan=False))


def save_results(results_file: PathLike, records: Sequence[Mapping[str, Any]],
                 provenance: Mapping[str, Any]) -> Path:
    """Write COCO result records to ``results_file`` and their provenance record beside it.

    Args:
        results_file: the JSON list to write (its folder is created).
        records: COCO result records (:func:`detections_to_coco`).
        provenance: JSON-ready facts that determine ``records`` (weights hash, settings, ...); the record
            adds ``results_sha256`` (the hash of the bytes written) and ``format``.

    Both files are written atomically, the old record removed first: a results file is never paired
    with a record of other results (and the results hash in the record catches a half-finished pair).
    Returns the path of the provenance record.
    """
    results_file = Path(results_file)
    meta_file = provenance_path(results_file)
    data = json.dumps(list(records), allow_nan=False).encode("utf-8")
    record = dict(_plain(dict(provenance)), format=PROVENANCE_FORMAT,
                  results_sha256=hashlib.sha256(data).hexdigest())
    results_file.parent.mkdir(parents=True, exist_ok=True)
    meta_file.unlink(missing_ok=True)
    _write_atomically(data, results_file)
    _write_atomically(json.dumps(record, indent=2, sort_keys=True).encode("utf-8"), meta_file)
    return meta_file


def evaluation_provenance(weights: PathLike, ann_file: PathLike, project: Any, compound_coef: int, input_size: int,
                          *, clip_boxes: bool, **settings: Any) -> Dict[str, Any]:
    """What determines the results of an evaluation run: the fields of its provenance record (JSON-ready).

    Args:
        weights, ann_file: the checkpoint and the annotation file (recorded by sha256).
        project: the :class:`utils.config.project.ProjectConfig` (name, classes, anchors, mean/std recorded).
        compound_coef, input_size: the model and its input side.
        clip_boxes: whether boxes were clipped to the original image (``coco_eval.py --clip_boxes``; the
            published evaluation does not clip them), so that results of one setting are never re-scored
            for the other.
        settings: every other option that shapes the detections (``coco_eval.py``: threshold,
            nms_threshold, nms, max_images, mode, float16), recorded as given.
    """
    return {
        "weights_sha256": file_sha256(weights),
        "compound_coef": compound_coef,
        "project_name": project.project_name,
        "obj_list": list(project.obj_list),
        "anchors_scales": list(project.anchors_scales),
        "anchors_ratios": [list(r) for r in project.anchors_ratios],
        "mean": list(project.mean),
        "std": list(project.std),
        "annotations_sha256": file_sha256(ann_file),
        "input_size": input_size,
        "clip_boxes": bool(clip_boxes),
        **settings,
    }


def _shown(value: Any) -> str:
    text = repr(value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"  # a sha256
    return text if len(text) <= 60 else text[:60] + "…"


def provenance_mismatch(results_file: PathLike, provenance: Mapping[str, Any]) -> Optional[str]:
    """Why ``results_file`` may NOT be re-scored for ``provenance``, or None when it may.

    It may when the file and its record (:func:`provenance_path`) exist, the record holds every field of
    ``provenance`` with the same value, and the file's sha256 is the record's ``results_sha256``. The
    reason (one line) names the first field that differs, with both values.
    """
    results_file = Path(results_file)
    meta_file = provenance_path(results_file)
    if not results_file.is_file():
        return f"no results file {results_file}"
    if not meta_file.is_file():
        return f"no provenance record {meta_file} beside {results_file}"
    try:
        record = read_json(meta_file, "provenance record")
    except ValueError as exc:
        return f"unreadable provenance record ({exc})"
    if not isinstance(record, dict):
        return f"{meta_file}: not a provenance record"
    if record.get("format") != PROVENANCE_FORMAT:
        return f"{meta_file}: provenance format {record.get('format')!r}, expected {PROVENANCE_FORMAT}"
    for key, value in _plain(dict(provenance)).items():
        if key not in record:
            return f"{key} is not in the provenance record {meta_file}"
        if record[key] != value:
            return (f"{key} differs from the provenance record of {results_file} "
                    f"(recorded {_shown(record[key])}, now {_shown(value)})")
    if record.get("results_sha256") != file_sha256(results_file):
        return f"{results_file} changed after its provenance record was written (results_sha256 differs)"
    return None
