"""Weight loading, in one place for every script.

Accepted sources:

- a published checkpoint (``efficientdet-d0.pth``: a plain state_dict);
- one of our training checkpoints (a dict with a ``"model"`` state_dict, see ``train.py``);
- a state_dict (a mapping of names to tensors), e.g. from ``torch.load``.

A ``module.`` prefix (DataParallel / DistributedDataParallel) is stripped. When only the class count
differs, everything but the classification output layer is loaded (fine-tuning); a checkpoint of
another model fails with a one-line error naming both.
"""
from __future__ import annotations

import io
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from efficientdet.config import MODEL_CONFIGS
from efficientnet.config import scaled_blocks

logger = logging.getLogger(__name__)

StateDict = Dict[str, Tensor]
Source = Union[str, Path, Mapping[str, Any]]

CLASS_OUTPUT_PREFIX = "classifier.header."
_WIDTH_KEY = "bifpn.0.conv6_up.pointwise_conv.conv.weight"
_CLASS_KEY = "classifier.header.pointwise_conv.conv.weight"


@dataclass(frozen=True)
class LayoutInfo:
    """What a state_dict says about the model that made it."""

    fpn_channels: Optional[int]
    fpn_cells: int
    backbone_blocks: int
    has_p8: bool
    class_outputs: Optional[int]

    def model_name(self) -> str:
        """"D2", "D6/D7" (identical layouts), or "an unknown model"."""
        names = [cfg.name for cfg in MODEL_CONFIGS if self.matches(cfg.compound_coef)]
        return "/".join(names) if names else "an unknown model"

    def matches(self, compound_coef: int) -> bool:
        cfg = MODEL_CONFIGS[compound_coef]
        blocks = sum(stage.repeats for stage in scaled_blocks(cfg.backbone))
        return (self.fpn_channels == cfg.fpn_channels and self.fpn_cells == cfg.fpn_cells
                and self.backbone_blocks == blocks and self.has_p8 == (cfg.max_level == 8))


def describe_state_dict(state_dict: Mapping[str, Tensor]) -> LayoutInfo:
    """Read the model family facts off a detector state_dict."""
    width = state_dict.get(_WIDTH_KEY)
    cells = {k.split(".")[1] for k in state_dict if k.startswith("bifpn.")}
    blocks = {k.split(".")[3] for k in state_dict if k.startswith("backbone_net.model._blocks.")}
    classes = state_dict.get(_CLASS_KEY)
    return LayoutInfo(
        fpn_channels=int(width.shape[0]) if width is not None else None,
        fpn_cells=len(cells), backbone_blocks=len(blocks),
        has_p8=any(".conv8_down." in k for k in state_dict),
        class_outputs=int(classes.shape[0]) if classes is not None else None)


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> StateDict:
    """Remove ``prefix`` from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def read_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """``torch.load`` a checkpoint on the CPU with a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file; all mean the same here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({reason[:200]})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a state_dict or a training checkpoint, got {type(data).__name__}")
    return dict(data)


def extract_state_dict(checkpoint: Mapping[str, Any], origin: str = "checkpoint") -> StateDict:
    """The model state_dict of a plain state_dict or of a training checkpoint (its ``"model"`` entry)."""
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]
    state_dict = strip_prefix(checkpoint)
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(f"{origin}: not a model state_dict (entry {not_tensors[0]!r} is not a tensor)")
    return state_dict


def first_non_finite(obj: Any, prefix: str = "") -> Optional[str]:
    """The key path (``"optimizer.state.0.exp_avg"``) of the first floating tensor in ``obj`` (a tensor,
    or nested mappings, lists and tuples, in their order) holding a NaN or an infinity; None when every
    tensor is finite. Meta tensors (no data), integer tensors and plain numbers are not looked at (an
    infinite "best so far" is a legitimate start value)."""
    if isinstance(obj, Tensor):
        if obj.is_meta or not (obj.is_floating_point() or obj.is_complex()) or not obj.numel():
            return None
        return None if bool(torch.isfinite(obj).all()) else (prefix or "tensor")
    if isinstance(obj, Mapping):
        items: Any = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def load_weights(model: nn.Module, source: Source, strict_classes: bool = False) -> Tuple[str, ...]:
    """Load ``source`` into an :class:`EfficientDet` ``model``.

    Args:
        model: the detector to fill.
        source: a checkpoint path or a state_dict / training checkpoint mapping.
        strict_classes: fail instead of skipping the class output layer when the class count differs.

    Returns:
        The keys left at their initial values (the class output layer when classes differ).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a checkpoint, a tensor holds NaN or inf (the message names the
            first such key), or it belongs to another model or class count.
    """
    origin = str(source) if isinstance(source, (str, Path)) else "state_dict"
    checkpoint = read_checkpoint(source) if isinstance(source, (str, Path)) else dict(source)
    state_dict = extract_state_dict(checkpoint, origin)
    bad = first_non_finite(state_dict)
    if bad is not None:
        raise ValueError(f"{origin}: tensor {bad!r} holds non-finite values (NaN or inf): a diverged or damaged "
                         "checkpoint")
    own = model.state_dict()

    theirs, mine = describe_state_dict(state_dict), describe_state_dict(own)
    if (theirs.fpn_channels, theirs.fpn_cells, theirs.backbone_blocks, theirs.has_p8) != (
            mine.fpn_channels, mine.fpn_cells, mine.backbone_blocks, mine.has_p8):
        config = getattr(model, "config", None)
        model_name = config.name if config is not None else mine.model_name()
        raise ValueError(
            f"{origin}: checkpoint is {theirs.model_name()} (BiFPN width {theirs.fpn_channels}), "
            f"model is {model_name} ({mine.fpn_channels}): pass the matching -c")

    skipped: Tuple[str, ...] = ()
    if theirs.class_outputs != mine.class_outputs:
        num_anchors = getattr(model.classifier, "num_anchors", 1)
        ckpt_classes = (theirs.class_outputs or 0) // num_anchors
        model_classes = (mine.class_outputs or 0) // num_anchors
        if strict_classes:
            raise ValueError(f"{origin}: checkpoint has {ckpt_classes} classes, model has {model_classes}")
        skipped = tuple(k for k in own if k.startswith(CLASS_OUTPUT_PREFIX))
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(CLASS_OUTPUT_PREFIX)}
        logger.warning("%s: checkpoint has %d classes, model has %d: loaded everything except the "
                       "classification output layer (fine-tuning)", origin, ckpt_classes, model_classes)

    missing = [k for k in own if k not in state_dict and k not in skipped]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ValueError(f"{origin}: does not fit this model ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected keys; {detail})")
    wrong = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{origin}: shape of {k!r} is {tuple(state_dict[k].shape)}, model has "
                         f"{tuple(own[k].shape)} (anchor scales/ratios or model differ)")
    model.load_state_dict(state_dict, strict=not skipped)
    return skipped


TEMP_SUFFIX = ".tmp"


def _temp_name(path: Path) -> Path:
    """``.NAME.PID.RANDOM.tmp`` beside ``path``: hidden, and tells which process wrote it."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_files(folder: Union[str, Path]) -> List[Path]:
    """Delete the temporary files that a killed :func:`atomic_write` left in ``folder`` (those of
    processes that no longer run). Returns the removed paths."""
    folder = Path(folder)
    removed: List[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(f".*{TEMP_SUFFIX}"):
        parts = path.name[:-len(TEMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) == os.getpid() or _pid_alive(int(parts[1])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        logger.info("%s: removed %d temporary file(s) left by an interrupted save", folder, len(removed))
    return removed


def atomic_write(data: bytes, path: Union[str, Path]) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename: ``path`` is
    either its old content or the new one, never partial. File mode follows the umask (as ``open``).

    Raises:
        OSError: one line naming ``path`` and the reason (disk full, unwritable folder, ...); the
            temporary file is removed and an existing ``path`` is left intact.
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        _discard(tmp)
        raise
    return path


def _discard(path: Path) -> None:
    """Remove a temporary file if it exists (its folder may not)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def serialize(obj: Any) -> bytes:
    """``torch.save`` into memory (so that a full disk is an OSError of the file write, not a
    ``RuntimeError`` from inside torch's zip writer)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(serialize(obj), path)
