"""Weight loading, in one place for every script.

Accepted sources:

- a published checkpoint (``efficientdet-d0.pth``: a plain state_dict);
- one of our training checkpoints (a dict with a ``"model"`` state_dict, see ``train.py``);
- a state_dict (a mapping of names to tensors), e.g. from ``torch.load``.

A ``module.`` prefix (DataParallel / DistributedDataParallel) is stripped. When the anchor or class
count differs (fine-tuning), every other tensor is loaded and the heads' output layers whose shape depends
on it (``regressor.header.pointwise_conv`` for anchors, ``classifier.header.pointwise_conv`` for anchors or
classes) are re-initialised
as the model initialises them; a checkpoint of another model fails with a one-line error naming both
models and the first tensor that differs. A file that would run code when unpickled is refused.
"""
from __future__ import annotations

import io
import logging
import os
import re
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

# The heads' output convs: their shapes depend on the anchor count (both) and the class count (classifier).
# The header's depthwise conv before them keeps its shape and is loaded, as every other matching tensor.
CLASS_OUTPUT_PREFIX = "classifier.header.pointwise_conv."
BOX_OUTPUT_PREFIX = "regressor.header.pointwise_conv."
_WIDTH_KEY = "bifpn.0.conv6_up.pointwise_conv.conv.weight"
_CLASS_KEY = "classifier.header.pointwise_conv.conv.weight"
_BOX_KEY = "regressor.header.pointwise_conv.conv.weight"
_REJECTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class HeadMismatchError(ValueError):
    """The file's anchor or class count differs from the model's (``load_weights(strict_classes=True)``)."""


@dataclass(frozen=True)
class HeadCounts:
    """Anchors per position and classes of a detector state_dict, read off its output layers' shapes."""

    anchors: int
    classes: int

    def __str__(self) -> str:
        return f"{_count(self.anchors, 'anchor')} x {_count(self.classes, 'class')}"

    def difference(self, model: "HeadCounts") -> str:
        """``"3 classes, model has 2"``: what differs, this (the file's) count first."""
        if self.anchors == model.anchors:
            return f"{_count(self.classes, 'class')}, model has {model.classes}"
        if self.classes == model.classes:
            return f"{_count(self.anchors, 'anchor')}, model has {model.anchors}"
        return f"{self}, model has {model}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "es" if noun.endswith("s") else "s")


def head_counts(state_dict: Mapping[str, Tensor], origin: str = "state_dict") -> Optional[HeadCounts]:
    """The anchors (box output channels / 4) and classes (class output channels / anchors) of a state_dict;
    None without both output layers. ValueError when the channel counts do not divide."""
    box, cls = state_dict.get(_BOX_KEY), state_dict.get(_CLASS_KEY)
    if box is None or cls is None:
        return None
    box_out, class_out = int(box.shape[0]), int(cls.shape[0])
    if box_out == 0 or box_out % 4 or class_out % (box_out // 4):
        raise ValueError(f"{origin}: {_CLASS_KEY!r} has {class_out} outputs and {_BOX_KEY!r} {box_out}: "
                         "not 4 per anchor and one per anchor and class")
    return HeadCounts(box_out // 4, class_out // (box_out // 4))


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
        raise ValueError(_unreadable_message(path, str(exc).strip() or type(exc).__name__)) from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a state_dict or a training checkpoint, got {type(data).__name__}")
    return dict(data)


def _unreadable_message(path: Path, text: str) -> str:
    """The one-line error for a file ``torch.load(weights_only=True)`` raised ``text`` on. A file holding
    pickled code or objects is named as refused, with the rejected global (torch's own text is advice to
    load it unchecked, which would run that code)."""
    if "weights only load failed" in text.lower() or "weights_only" in text:
        match = _REJECTED_GLOBAL.search(text)
        name = match.group(1) if match else "objects other than tensors"
        if match and "." not in name:
            name = f"builtins.{name}"
        return (f"{path}: refused: loading this file would run code (it holds {name}); a weights file "
                "holds only tensors, as torch.save(model.state_dict(), path) writes")
    return f"{path}: not a readable PyTorch checkpoint ({text.splitlines()[0][:200]})"


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

    When the file's anchor or class count (read off its own output layers) differs from the model's,
    every other tensor is loaded and the output layers that depend on the count are re-initialised with
    the model's own init (PyTorch's conv init, the class bias at the focal-loss prior, the box bias at 0):
    ``regressor.header.pointwise_conv`` and ``classifier.header.pointwise_conv`` for another anchor count,
    ``classifier.header.pointwise_conv`` for another class count (the header's depthwise conv keeps its shape
    and is loaded, as the published loader does). One warning names them and both counts.

    Args:
        model: the detector to fill.
        source: a checkpoint path or a state_dict / training checkpoint mapping.
        strict_classes: fail (:class:`HeadMismatchError`) instead of re-initialising when the anchor or
            class count differs (inference, export, exact resume).

    Returns:
        The re-initialised keys (empty when the counts match).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a checkpoint or holds pickled code, a tensor holds NaN or inf (the
            message names the first such key), it belongs to another model (the message names the first
            tensor that differs and both shapes), or (``strict_classes``) another anchor or class count.
    """
    origin = str(source) if isinstance(source, (str, Path)) else "state_dict"
    checkpoint = read_checkpoint(source) if isinstance(source, (str, Path)) else dict(source)
    state_dict = extract_state_dict(checkpoint, origin)
    bad = first_non_finite(state_dict)
    if bad is not None:
        raise ValueError(f"{origin}: tensor {bad!r} holds non-finite values (NaN or inf): a diverged or damaged "
                         "checkpoint")
    own = model.state_dict()
    _check_model_family(model, state_dict, own, origin)
    theirs, mine = head_counts(state_dict, origin), head_counts(own, "model")
    heads = _outputs_to_reset(theirs, mine, origin, strict_classes)
    skipped = tuple(k for k in own if k.startswith(heads))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
    difference = _first_difference(state_dict, {k: v for k, v in own.items() if k not in skipped})
    if difference:
        raise ValueError(f"{origin}: does not fit this model ({difference})")
    if heads:
        _reset_outputs(model, heads)
    model.load_state_dict(state_dict, strict=not heads)
    if heads:
        logger.warning("%s: re-initialised %s: the file has %s, the model %s", origin,
                       ", ".join(h.rstrip(".") for h in heads), theirs, mine)
    return skipped


def _check_model_family(model: nn.Module, state_dict: Mapping[str, Tensor], own: Mapping[str, Tensor],
                        origin: str) -> None:
    """ValueError naming both models (and the first tensor that differs) when the BiFPN width, cell count,
    backbone depth or top level differ."""
    theirs, mine = describe_state_dict(state_dict), describe_state_dict(own)
    if (theirs.fpn_channels, theirs.fpn_cells, theirs.backbone_blocks, theirs.has_p8) != (
            mine.fpn_channels, mine.fpn_cells, mine.backbone_blocks, mine.has_p8):
        config = getattr(model, "config", None)
        model_name = config.name if config is not None else mine.model_name()
        raise ValueError(
            f"{origin}: checkpoint is {theirs.model_name()} (BiFPN width {theirs.fpn_channels}), "
            f"model is {model_name} ({mine.fpn_channels}): pass the matching -c "
            f"({_first_difference(state_dict, own)})")


def _outputs_to_reset(theirs: Optional[HeadCounts], mine: Optional[HeadCounts], origin: str,
                      strict: bool) -> Tuple[str, ...]:
    """The key prefixes of the output layers to re-initialise for these counts (file, model)."""
    if theirs is None or mine is None or theirs == mine:
        return ()
    if strict:
        raise HeadMismatchError(f"{origin}: checkpoint has {theirs.difference(mine)}")
    if theirs.anchors != mine.anchors:
        return BOX_OUTPUT_PREFIX, CLASS_OUTPUT_PREFIX
    return (CLASS_OUTPUT_PREFIX,)


@torch.no_grad()
def _reset_outputs(model: nn.Module, prefixes: Tuple[str, ...]) -> None:
    """Re-initialise the output layers named by ``prefixes`` as the model builds them: each conv's own
    ``reset_parameters``, then the model's bias init (the kept layer's bias is loaded over it afterwards)."""
    for prefix in prefixes:
        for module in model.get_submodule(prefix.rstrip(".")).modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
    reset_biases = getattr(model, "reset_head_biases", None)
    if reset_biases is not None:
        reset_biases()


def _first_difference(theirs: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> Optional[str]:
    """``"1 of another shape, 0 missing, 0 unexpected; first: 'key' is (..) in the file, (..) in the model"``,
    or None when the keys and shapes match."""
    shaped = {k for k in own if k in theirs and tuple(theirs[k].shape) != tuple(own[k].shape)}
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    first = next((k for k in own if k in shaped or k not in theirs), unexpected[0] if unexpected else None)
    if first is None:
        return None
    if first not in theirs:
        detail = f"{first!r} {tuple(own[first].shape)} is not in the file"
    elif first not in own:
        detail = f"{first!r} {tuple(theirs[first].shape)} is not in the model"
    else:
        detail = f"{first!r} is {tuple(theirs[first].shape)} in the file, {tuple(own[first].shape)} in the model"
    return f"{len(shaped)} of another shape, {len(missing)} missing, {len(unexpected)} unexpected; first: {detail}"


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
