"""Activation checkpointing for training (``EfficientDet.set_grad_checkpointing``): a part of the network keeps
only its inputs in the forward and runs again in the backward, trading compute for memory."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Sequence, Union

import torch
import torch.utils.checkpoint
from torch import Tensor, nn


Modules = Union[nn.Module, Sequence[nn.Module]]


def _module_list(modules: Modules) -> List[nn.Module]:
    return [modules] if isinstance(modules, nn.Module) else list(modules)


@contextmanager
def batchnorm_stats_frozen(modules: Modules) -> Iterator[None]:
    """Within the block the BatchNorms of ``modules`` normalise by batch statistics (in train mode) as before,
    saving the same tensors for backward, but leave their running statistics and batch counts as they were
    (momentum 0: ``(1 - 0) * running + 0 * batch`` is the running value exactly)."""
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for module in _module_list(modules) for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm, _, _ in saved:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum, count in saved:
            norm.momentum = momentum
            if count is not None:
                norm.num_batches_tracked.copy_(count)


def needs_checkpoint(modules: Modules) -> bool:
    """Whether activation checkpointing of ``modules`` saves anything now: gradients are on and some parameter
    of them trains (a frozen part keeps no activations for backward anyway)."""
    return torch.is_grad_enabled() and any(p.requires_grad for module in _module_list(modules)
                                           for p in module.parameters())


def checkpointed(function: Callable[..., Any], modules: Modules, *inputs: Tensor) -> Any:
    """``function(*inputs)``, the forward of ``modules``, under activation checkpointing
    (``torch.utils.checkpoint``, non-reentrant): only the inputs are kept; the backward runs ``function``
    again with the random state of the first run (drop connect draws the same masks) and with the BatchNorm
    statistics of ``modules`` frozen (train-mode BatchNorm would otherwise update its running statistics twice
    per step). Same outputs, gradients and BatchNorm statistics as a plain call."""
    first = [True]

    def run(*args: Tensor) -> Any:
        if first[0]:
            first[0] = False
            return function(*args)
        with batchnorm_stats_frozen(modules):
            return function(*args)

    return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False, preserve_rng_state=True)
