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
    counters = state.get("run") or {}
    pointer = {"weights": name, "state": state_path(path).name, "epoch": counters.get("epoch"),
               "step": counters.get("step")}
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
        ValueError: one line naming the file that is damaged (state or weights) or the state that was
            written for other weights, and what to do instead.
    """
    weights = Path(weights)
    companion = state_path(weights)
    fine_tune = f"to fine-tune from its weights instead: -w {weights}"
    if companion.is_file():
        try:
            state = read_checkpoint(companion)
        except ValueError as exc:
            raise ValueError(f"{exc}: the training state of {weights.name} is damaged; {fine_tune}") from None
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if state.get("format") != STATE_FORMAT or state.get("weights_sha256") != digest:
            _readable_weights(weights, f"its training state {companion.name} is of no use without them")
            raise ValueError(f"{companion}: training state does not belong to {weights.name} "
                             f"(the weights file was replaced); {fine_tune}")
        return state
    checkpoint = _readable_weights(weights, f"and {companion.name} is missing: nothing to resume")
    if checkpoint.get("format") == LEGACY_FORMAT:
        return checkpoint
    return None


def _readable_weights(weights: Path, consequence: str) -> Dict[str, Any]:
    try:
        return read_checkpoint(weights)
    except ValueError as exc:
        raise ValueError(f"{exc}: the weights file is damaged, {consequence}; fine-tune from another "
                         f"checkpoint's weights with -w FILE.pth{_other_checkpoint(weights)}") from None


def _other_checkpoint(weights: Path) -> str:
    """`` (e.g. NAME)``: the newest other checkpoint beside ``weights``, if any."""
    match = _NAME.match(weights.name)
    others = [c for c in _candidates(weights.parent, int(match.group(1))) if c[2] != weights] if match else []
    return f" (e.g. {max(others)[2]})" if others else ""


def _candidates(folder: Path, compound_coef: int) -> List[Tuple[float, int, Path]]:
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _NAME.match(path.name)
            if match and int(match.group(1)) == compound_coef:
                found.append((path.stat().st_mtime, int(match.group(3)), path))
    return found


def find_resume_point(folder: PathLike, compound_coef: int) -> ResumePoint:
    """``-w last``: the pair the ``last`` pointer names; without a readable pointer, the most recently
    written ``efficientdet-d{c}_{epoch}_{step}.pth`` (newest file, then highest step). Always with its
    training state: an exact resume or an error.

    Raises:
        FileNotFoundError: no checkpoint of ``efficientdet-d{c}`` in ``folder``, or a file of the pair is
            missing (named, with the ``-w FILE.pth`` that fine-tunes instead).
        ValueError: a file of the pair is damaged or they do not belong together (see :func:`read_state`).
    """
    folder = Path(folder)
    pointer = pointer_path(folder, compound_coef)
    weights: Optional[Path] = None
    if pointer.is_file():
        try:
            weights = folder / str(json.loads(pointer.read_text(encoding="utf-8"))["weights"])
        except (ValueError, KeyError, TypeError):
            logger.warning("%s: unreadable, looking for the newest checkpoint instead", pointer)
    if weights is None:
        found = _candidates(folder, compound_coef)
        if not found:
            raise FileNotFoundError(f"no checkpoint efficientdet-d{compound_coef}_EPOCH_STEP.pth to resume in "
                                    f"{folder}")
        weights = max(found)[2]
    companion = state_path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the weights of the last save are missing"
                                f"{' (its ' + companion.name + ' is there)' if companion.is_file() else ''}: "
                                "nothing to resume; fine-tune from another checkpoint's weights with -w FILE.pth"
                                f"{_other_checkpoint(weights)}")
    state = read_state(weights)
    if state is None:
        raise FileNotFoundError(f"{companion}: missing, so {weights.name} cannot be resumed exactly "
                                f"(-w last needs its training state); to fine-tune from its weights instead: "
                                f"-w {weights}")
    return ResumePoint(weights, state)
