"""Training helpers: atomic checkpoints, resumable sampling, EMA, learning-rate schedules, freezing.

Everything here is independent of the command line; ``train.py`` wires it together.
"""
from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import torch
from torch import nn
from torch.utils.data import Sampler

from utils.weights import read_checkpoint

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "efficientdet-pytorch/1"
_CKPT_NAME = re.compile(r"^efficientdet-d(\d)_(\d+)_(\d+)\.pth$")


def checkpoint_name(compound_coef: int, epoch: int, step: int) -> str:
    """The published naming: ``efficientdet-d{c}_{epoch}_{step}.pth``."""
    return f"efficientdet-d{compound_coef}_{epoch}_{step}.pth"


def find_last_checkpoint(folder: Union[str, Path], compound_coef: Optional[int] = None) -> Path:
    """The checkpoint with the highest step in ``folder`` (names as :func:`checkpoint_name`).

    Raises FileNotFoundError naming the folder when there is none.
    """
    folder = Path(folder)
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _CKPT_NAME.match(path.name)
            if match and (compound_coef is None or int(match.group(1)) == compound_coef):
                found.append((int(match.group(3)), path.stat().st_mtime, path))
    if not found:
        raise FileNotFoundError(f"no checkpoint efficientdet-d*_EPOCH_STEP.pth to resume in {folder}")
    return max(found)[2]


def is_training_checkpoint(checkpoint: Dict[str, Any]) -> bool:
    """A full training checkpoint (model, optimizer, step …) rather than a plain state_dict."""
    return checkpoint.get("format") == CHECKPOINT_FORMAT


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one epoch, split across ranks, that can start mid-epoch.

    The permutation depends only on ``(seed, epoch)``, so an interrupted run that resumes at
    ``start`` sees exactly the samples the uninterrupted run would have seen.

    Args:
        length: dataset size.
        shuffle: shuffle each epoch.
        seed: base seed of the permutation.
        rank, world_size: this process's share (every ``world_size``-th index from ``rank``; the
            permutation is padded by repetition so every rank gets the same count).
    """

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if length <= 0:
            raise ValueError(f"cannot sample from an empty dataset (length {length})")
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(length / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start`` samples of this rank."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.length))[:total]
        mine = order[self.rank::self.world_size]
        return iter(mine[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


class ModelEMA:
    """Exponential moving average of a model's weights (official recipe: decay 0.9998).

    ``ema = decay * ema + (1 - decay) * weights`` after each optimizer step; buffers (BN statistics)
    are copied. The warm-up ``min(decay, (1 + n) / (10 + n))`` keeps early averages meaningful.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        own = self.module.state_dict()
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                own[key].mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                own[key].copy_(value)

    def state_dict(self) -> Dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])


def warmup_cosine_lambda(total_steps: int, warmup_steps: int, warmup_start: float = 0.1,
                         final: float = 0.0):
    """Multiplier of the base lr at a step: linear warm-up from ``warmup_start`` to 1 over
    ``warmup_steps``, then cosine decay to ``final`` at ``total_steps`` (official recipe)."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return warmup_start + (1.0 - warmup_start) * step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def freeze_backbone_and_bifpn(model: nn.Module) -> List[str]:
    """``--head_only``: stop gradients in the backbone and the BiFPN (the published behaviour:
    ``requires_grad=False``; BN statistics of those parts still update in train mode).

    Returns the names of the frozen parameters.
    """
    frozen = []
    for name, param in model.named_parameters():
        if name.startswith(("backbone_net.", "bifpn.")):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def load_backbone_weights(model: nn.Module, path: Union[str, Path]) -> int:
    """Load an ImageNet EfficientNet state_dict into ``model.backbone_net.model``.

    Accepts lukemelas/EfficientNet-PyTorch names (``_conv_stem.weight``), our own names
    (``_conv_stem.conv.weight``) and the same with a ``backbone_net.model.`` / ``model.`` / ``module.``
    prefix. The classification top (``_conv_head``, ``_bn1``, ``_fc``) is ignored.

    Returns the number of tensors loaded. Raises ValueError naming the first key that does not fit.
    """
    state = read_checkpoint(path)
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    target = model.backbone_net.model
    own = target.state_dict()
    loaded = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone_net.model.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(("_conv_head", "_bn1.", "_fc", "_avg_pooling", "_dropout")):
            continue
        if key not in own:
            # lukemelas convs are nn.Conv2d subclasses: "_conv_stem.weight" -> "_conv_stem.conv.weight"
            parts = key.rsplit(".", 1)
            alt = f"{parts[0]}.conv.{parts[1]}" if len(parts) == 2 else key
            if alt not in own:
                raise ValueError(f"{path}: backbone weight {key!r} has no place in EfficientNet-B{target.variant}")
            key = alt
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"{path}: backbone weight {key!r} has shape {tuple(value.shape)}, "
                             f"EfficientNet-B{target.variant} expects {tuple(own[key].shape)}")
        loaded[key] = value
    missing = [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: not an EfficientNet-B{target.variant} state_dict (missing {missing[0]!r})")
    target.load_state_dict(loaded, strict=False)
    return len(loaded)
