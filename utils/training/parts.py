"""Training helpers: resumable sampling, EMA, the last-finite-state guard, learning-rate schedules, freezing.

Everything here is independent of the command line; :class:`utils.training.trainer.Trainer` wires it together.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

# Importable from here too: benchmark/train_speed.py imports it from this module in this tree and in the
# starting commit it compares with.
from utils.training.guard import FiniteGuard  # noqa: F401
from utils.weights.loading import read_checkpoint

logger = logging.getLogger(__name__)


class ModelWithLoss(nn.Module):
    """The detector and its loss in one module, so DDP wraps a single forward.

    ``forward(images Tensor[B, 3, S, S], annotations Tensor[B, M, 5] (x1, y1, x2, y2, class), input
    pixels, padded with -1)`` returns ``(cls_loss, reg_loss, outputs)`` with ``outputs`` =
    ``(regression, class logits, anchors)`` for ``--debug`` drawing.

    ``channels_last`` (default: on CPU) hands the network its images in channels-last layout, so that every
    activation is channels-last: oneDNN's training convolutions are 2-4x faster in that layout (depthwise ones
    most) and a D0 step about 0.7x as long (benchmark/README.md); the weights keep their layout, the numbers
    differ by float round-off only.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, channels_last: Optional[bool] = None) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.channels_last = channels_last

    def forward(self, images: Tensor, annotations: Tensor):
        if self.channels_last if self.channels_last is not None else images.device.type == "cpu":
            images = images.contiguous(memory_format=torch.channels_last)
        _, regression, logits, anchors = self.model(images, logits=True)
        cls_loss, reg_loss = self.criterion(logits, regression, anchors, annotations)
        return cls_loss, reg_loss, (regression, logits, anchors)


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


def head_only_warmup(net: nn.Module, model: nn.Module, steps_done: int, steps_per_epoch: int, epochs: float,
                     log: Callable[[str], None] = logger.info) -> nn.Module:
    """``--head_only_epochs``: the backbone and the BiFPN frozen as by :func:`freeze_backbone_and_bifpn` while
    ``steps_done`` (optimizer steps of the run's schedule) is below ``round(epochs * steps_per_epoch)``, trainable
    from then on; call before each step (a resumed run refreezes or not by its step). The optimizer holds every
    parameter from the start: a frozen one gets no gradient, so no update, no weight decay and no optimizer state
    until it thaws. Each change is logged in one line. ``epochs`` 0: nothing is touched (``--head_only`` freezes
    for good). Returns ``net``; a :class:`~torch.nn.parallel.DistributedDataParallel` ``net`` (which fixes the
    parameters it reduces when built) is built anew around its module when the trainable set changed."""
    warmup = int(round(epochs * steps_per_epoch))
    if warmup <= 0:
        return net
    frozen = steps_done < warmup
    params = [p for name, p in model.named_parameters() if name.startswith(("backbone_net.", "bifpn."))]
    if all(p.requires_grad != frozen for p in params):
        return net
    for param in params:
        param.requires_grad_(not frozen)
    if frozen:
        log(f"--head_only_epochs {epochs:g}: backbone and BiFPN ({len(params)} tensors) frozen for steps 1-{warmup} of "
            f"the schedule")
    else:
        log(f"--head_only_epochs {epochs:g}: backbone and BiFPN trainable from step {warmup + 1} of the schedule")
    if isinstance(net, nn.parallel.DistributedDataParallel):
        net = nn.parallel.DistributedDataParallel(net.module, device_ids=net.device_ids)
    return net


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


def distributed_context() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


class Interrupted(Exception):
    """A stop signal reached a point where the run can stop (see :class:`StopRequest`)."""


class StopRequest:
    """SIGINT (Ctrl+C) and SIGTERM for a training run.

    While ``deferred`` is False (setting up: reading data, building the model) a signal raises
    :class:`Interrupted` at once, as there is nothing to save yet. Once training runs, the signal is
    remembered and the loop stops at its next safe point (between steps, between validation batches,
    after a save), saves, and exits with :attr:`exit_code` (128 + signal number: 130 and 143).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.deferred = False
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame) -> None:
        self.signum = signum
        if not self.deferred:
            raise Interrupted(self.name)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum) if self.signum is not None else 0


@contextmanager
def stop_signals_blocked():
    """SIGINT and SIGTERM held back (delivered at the end of the block, not lost) in this thread: processes
    forked in the block, e.g. DataLoader workers, start with them blocked until they ignore them."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopRequest.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class SignalSafeLoader:
    """A DataLoader whose iterators start their worker processes with SIGINT and SIGTERM held back (see
    :func:`stop_signals_blocked`), so that a signal to the process group cannot reach a worker before its
    ``worker_init_fn`` leaves stops to the main process. Everything else is the loader's."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        with stop_signals_blocked():
            return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


SIGNAL_AT_ENV = "EFFDET_SIGNAL_AT"


class SignalHook:
    """For tests: ``EFFDET_SIGNAL_AT=PHASE:N:SIGNAL[:group]`` (e.g. ``val:1:SIGINT:group``) makes the N-th
    ``hook(PHASE)`` of the process send SIGNAL to the process itself, or with ``group`` to its whole process
    group (DataLoader workers included), from another process as a shell, ``timeout`` or a scheduler would. The trainer's phases: ``epoch`` (before an epoch), ``train`` (before
    a training step), ``val`` (before a validation batch), ``save`` (before a checkpoint is written). Unset,
    it does nothing."""

    def __init__(self, spec: Optional[str] = None) -> None:
        spec = os.environ.get(SIGNAL_AT_ENV, "") if spec is None else spec
        self.target: Optional[Tuple[str, int, int, bool]] = None
        self.counts: Dict[str, int] = {}
        if spec:
            parts = spec.split(":")
            try:
                self.target = (parts[0], int(parts[1]), int(getattr(signal, parts[2])), parts[3:] == ["group"])
            except (IndexError, ValueError, AttributeError):
                raise ValueError(f"{SIGNAL_AT_ENV}={spec!r}: expected PHASE:N:SIGNAL[:group]") from None

    def __call__(self, phase: str) -> None:
        if self.target is None or phase != self.target[0]:
            return
        self.counts[phase] = self.counts.get(phase, 0) + 1
        if self.counts[phase] == self.target[1]:
            if self.target[3]:
                subprocess.run([sys.executable, "-c", f"import os; os.killpg({os.getpgrp()}, {self.target[2]})"],
                               start_new_session=True, check=True)
            else:
                os.kill(os.getpid(), self.target[2])
