"""One optimizer step of training (:func:`optimizer_step`) and the choice of its mixed precision (:func:`amp_dtype`).

The trainer runs each step through :func:`optimizer_step`; ``benchmark/train_speed.py`` times the same function.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from efficientnet.utils import bf16_supported
from utils.training.guard import FiniteGuard

logger = logging.getLogger(__name__)

EMULATED_BF16 = ("--amp: this CPU has no native bfloat16 (AVX512-BF16 / AMX), so bfloat16 is emulated and "
                 "slower than float32; train without --amp here")


def amp_dtype(device: torch.device, log: Callable[[str], None] = logger.warning) -> torch.dtype:
    """The autocast dtype of ``--amp``: float16 on CUDA (with a GradScaler), bfloat16 elsewhere; on a CPU
    without native bfloat16 one line (``log``) says it is emulated and slower."""
    if device.type == "cuda":
        return torch.float16
    if not bf16_supported(device):
        log(EMULATED_BF16)
    return torch.bfloat16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``device``'s type; None: float32 (autocast off)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def all_agree(value: bool) -> bool:
    """The verdict of a single process (see ``agree`` in :func:`optimizer_step`)."""
    return value


def optimizer_step(net: nn.Module, optimizer: torch.optim.Optimizer, guard: FiniteGuard, images: Tensor,
                   annotations: Tensor, dtype: Optional[torch.dtype] = None,
                   scaler: Optional[torch.amp.GradScaler] = None, clip_grad: float = 0.0,
                   agree: Callable[[bool], bool] = all_agree) -> Tuple[str, Tensor, Tensor, tuple]:
    """Forward (autocast to ``dtype``), backward, and the optimizer step unless something is not finite.

    Args:
        net: a :class:`utils.training.parts.ModelWithLoss` (or its DDP wrapper).
        guard: the model's :class:`FiniteGuard`.
        scaler: the GradScaler of a float16 run (unscaled before the checks); None or disabled otherwise.
        clip_grad: clip the gradients' global norm to this (0: no clipping).
        agree: ands a verdict over the processes of a DDP group (all ranks must take the same branch).

    Returns:
        ``(verdict, cls_loss, reg_loss, outputs)``: verdict ``"ok"``; ``"skipped"`` (loss or gradients not
        finite: no optimizer step, BatchNorm statistics put back); ``"restored"`` (finite gradients made a weight
        non-finite: the guard's restore point is back). Losses are detached 0-d tensors.
    """
    guard.begin()
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, dtype):
        cls_loss, reg_loss, outputs = net(images, annotations)
    loss = cls_loss + reg_loss
    scaler = scaler if scaler is not None and scaler.is_enabled() else None
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    outputs = tuple(t.detach() for t in outputs)
    if not agree(guard.step_is_finite(loss)):
        if scaler is not None:
            scaler.update()  # an overflow of float16 gradients lowers the scale
        guard.skip()
        return "skipped", cls_loss.detach(), reg_loss.detach(), outputs
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if not agree(guard.is_finite()):
        guard.restore()
        return "restored", cls_loss.detach(), reg_loss.detach(), outputs
    guard.accept()
    return "ok", cls_loss.detach(), reg_loss.detach(), outputs
