"""Training checkpoints: the weights in the published format, the training state beside them.

A run folder (``{saved_path}/{project_name}/``) holds:

- ``efficientdet-d{c}_{epoch}_{step}.pth``: a plain state_dict, as the published ``train.py`` wrote
  (the EMA weights when EMA is on): ``EfficientDet(...).load_state_dict(torch.load(path))``
  takes it with ``strict=True``.
- ``efficientdet-d{c}_{epoch}_{step}.state.pt``: the training state of that step (optimizer,
  scheduler, gradient scaler, EMA, RNG, counters, settings; the raw weights when the ``.pth`` holds
  the EMA). It names its weights file and their SHA-256, so a pair that does not belong together is
  never resumed.
- ``efficientdet-d{c}_best.pth``: a plain state_dict of the best validation so far.
- ``efficientdet-d{c}_last.json``: the pair written last. It is replaced after both files, so a run
  killed while saving resumes from the previous complete pair.

Every file is written atomically (:func:`utils.weights.loading.atomic_write`) and none with a non-finite
tensor. Checkpoints of the previous format (one dict with ``"format": "efficientdet-pytorch/1"``)
still load and resume.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from torch import Tensor

from utils.weights.loading import atomic_save, atomic_write, first_non_finite, read_checkpoint, serialize

logger = logging.getLogger(__name__)

STATE_FORMAT = "efficientdet-pytorch/state-2"
LEGACY_FORMAT = "efficientdet-pytorch/1"  # one dict with "model", "optimizer", ... (before the split)
STATE_SUFFIX = ".state.pt"
_NAME = re.compile(r"^efficientdet-d(\d)_(\d+)_(\d+)\.pth$")

PathLike = Union[str, Path]


def checkpoint_name(compound_coef: int, epoch: int, step: int) -> str:
    """The published naming: ``efficientdet-d{c}_{epoch}_{step}.pth``."""
    return f"efficientdet-d{compound_coef}_{epoch}_{step}.pth"


def best_name(compound_coef: int) -> str:
    return f"efficientdet-d{compound_coef}_best.pth"


def state_path(weights: PathLike) -> Path:
    """The training state beside a weights file: ``X.pth`` -> ``X.state.pt``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + STATE_SUFFIX)


def pointer_path(folder: PathLike, compound_coef: int) -> Path:
    return Path(folder) / f"efficientdet-d{compound_coef}_last.json"


def step_from_name(path: PathLike) -> Optional[int]:
    """The step of a published-style name (``..._{step}.pth``), as the published ``train.py`` reads it;
    None when the name does not end in a number (``efficientdet-d0.pth``)."""
    tail = Path(path).name.split("_")[-1].split(".")[0]
    return int(tail) if tail.isdigit() and "_" in Path(path).name else None


def _refuse_non_finite(obj: Any, path: Path) -> None:
    bad = first_non_finite(obj)
    if bad is not None:
        raise ValueError(f"refusing to write {path}: {bad!r} holds NaN or infinite values")


def save_weights(weights: Mapping[str, Tensor], path: PathLike) -> Path:
    """A plain state_dict to ``path``, atomically; ValueError (nothing written) if any tensor is not finite."""
    path = Path(path)
    _refuse_non_finite(weights, path)
    return atomic_write(serialize(dict(weights)), path)


def save_checkpoint(folder: PathLike, name: str, weights: Mapping[str, Tensor], state: Dict[str, Any],
                    compound_coef: int) -> Path:
    """Write ``folder/name`` (plain state_dict), its training state and the ``last`` pointer.

    Order: state, weights, pointer; each atomic. Raises ValueError (nothing written) when a tensor
    is not finite, OSError (one line) when the disk refuses; the previous pair stays intact.
    """
    path = Path(folder) / name
    _refuse_non_finite(weights, path)
    _refuse_non_finite(state, state_path(path))
    data = serialize(dict(weights))
    record = dict(state, format=STATE_FORMAT, weights_file=name, weights_sha256=hashlib.sha256(data).hexdigest())
    atomic_save(record, state_path(path))
    atomic_write(data, path)
    pointer = {"weights": name, "state": state_path(path).name, "epoch": state.get("epoch"),
               "step": state.get("step")}
    atomic_write(json.dumps(pointer).encode("utf-8"), pointer_path(folder, compound_coef))
    return path


@dataclass
class ResumePoint:
    """Where a run continues: a weights file and, for an exact resume, its training state."""

    weights: Path
    state: Optional[Dict[str, Any]]  # None: weights only (a published-style file)


def read_state(weights: PathLike) -> Optional[Dict[str, Any]]:
    """The training state belonging to ``weights``: its ``.state.pt`` when present and matching, the
    checkpoint itself in the previous single-file format, else None.

    Raises:
        ValueError: the state file is unreadable, or it was written for other weights.
    """
    weights = Path(weights)
    companion = state_path(weights)
    if companion.is_file():
        state = read_checkpoint(companion)
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if state.get("format") != STATE_FORMAT or state.get("weights_sha256") != digest:
            raise ValueError(f"{companion}: training state does not belong to {weights.name} "
                             "(the weights file was replaced); resume from another checkpoint or pass the "
                             ".pth alone with -w to fine-tune from it")
        return state
    checkpoint = read_checkpoint(weights)
    if checkpoint.get("format") == LEGACY_FORMAT:
        return checkpoint
    return None


def _candidates(folder: Path, compound_coef: int) -> List[Tuple[float, int, Path]]:
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _NAME.match(path.name)
            if match and int(match.group(1)) == compound_coef:
                found.append((path.stat().st_mtime, int(match.group(3)), path))
    return found


def find_resume_point(folder: PathLike, compound_coef: int) -> ResumePoint:
    """``-w last``: the pair the ``last`` pointer names; without a usable pointer, the most recently
    written ``efficientdet-d{c}_{epoch}_{step}.pth`` (newest file, then highest step).

    Raises:
        FileNotFoundError: no checkpoint of ``efficientdet-d{c}`` in ``folder``.
    """
    folder = Path(folder)
    pointer = pointer_path(folder, compound_coef)
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text(encoding="utf-8"))["weights"]
        except (ValueError, KeyError, TypeError):
            logger.warning("%s: unreadable, looking for the newest checkpoint instead", pointer)
        else:
            weights = folder / str(name)
            if weights.is_file() and state_path(weights).is_file():
                return ResumePoint(weights, read_state(weights))
            logger.warning("%s names %s, which is missing; looking for the newest checkpoint instead", pointer, name)
    found = _candidates(folder, compound_coef)
    if not found:
        raise FileNotFoundError(f"no checkpoint efficientdet-d{compound_coef}_EPOCH_STEP.pth to resume in {folder}")
    weights = max(found)[2]
    return ResumePoint(weights, read_state(weights))
