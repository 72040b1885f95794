"""Memory-lean training form of BatchNorm followed by swish (:func:`batchnorm_swish`).

``swish(bn(x))`` keeps two full-size tensors for the backward: BN's input ``x`` and swish's input ``bn(x)``.
:class:`BatchNormSwish` keeps only ``x`` (and BN's per-channel batch statistics) and recomputes ``bn(x)`` in the
backward, one multiply-add per element; :class:`ScaleSwishOutput` applies squeeze-excitation's scale to that
output and recomputes it for the backward instead of keeping it. An MBConv block with expansion keeps 4 full-size
tensors for its backward instead of 7.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _batchnorm_again(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """``batch_norm(x)`` from saved batch statistics: ``x * (invstd * w) + (b - mean * invstd * w)``."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = invstd * weight
    return torch.addcmul((bias - mean * scale).reshape(shape), x, scale.reshape(shape))


class BatchNormSwish(torch.autograd.Function):
    """``silu(batch_norm(x))`` in training mode (batch statistics, running statistics updated in place),
    saving ``x``, the weights and the batch mean / inverse std only. Returns ``(output, mean, invstd)``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                momentum: float, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        z, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        return F.silu(z), mean, invstd

    @staticmethod
    def backward(ctx, grad: Tensor, *_unused: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, weight, bias, mean, invstd = ctx.saved_tensors
        grad_z = torch.ops.aten.silu_backward(grad, _batchnorm_again(x, weight, bias, mean, invstd))
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_z, x, weight, None, None, mean, invstd, True, ctx.eps, [True, True, True])
        return grad_x, grad_w, grad_b, None, None, None, None


class ScaleSwishOutput(torch.autograd.Function):
    """``y * s`` for ``y`` an output of :class:`BatchNormSwish` (``s`` broadcast over H, W: squeeze-excitation),
    saving ``s`` and what :class:`BatchNormSwish` keeps already instead of ``y``, which the backward recomputes."""

    @staticmethod
    def forward(ctx, y: Tensor, s: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                invstd: Tensor) -> Tensor:
        ctx.save_for_backward(s, x, weight, bias, mean, invstd)
        return y * s

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        s, x, weight, bias, mean, invstd = ctx.saved_tensors
        y = F.silu(_batchnorm_again(x, weight, bias, mean, invstd))
        return grad * s, (grad * y).sum(dim=(2, 3), keepdim=True), None, None, None, None, None


Saved = Optional[Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]


def batchnorm_swish(bn: nn.Module, x: Tensor) -> Tensor:
    """``silu(bn(x))`` (see :func:`batchnorm_swish_saved`)."""
    return batchnorm_swish_saved(bn, x)[0]


def batchnorm_swish_saved(bn: nn.Module, x: Tensor) -> Tuple[Tensor, Saved]:
    """``silu(bn(x))`` and what :func:`scale_swish_output` needs; through :class:`BatchNormSwish` where it applies
    (a float32 ``nn.BatchNorm2d`` with affine weights and running statistics, training with gradients, no
    autocast), else the plain modules (evaluation, folded BN = ``nn.Identity``, SyncBatchNorm, mixed precision;
    the second value is then None). Same values and running statistics either way."""
    if not (type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.track_running_stats
            and torch.is_grad_enabled() and x.dtype == bn.weight.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)):
        return F.silu(bn(x)), None
    momentum = bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            momentum = 1.0 / float(bn.num_batches_tracked)
    y, mean, invstd = BatchNormSwish.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps)
    return y, (x, bn.weight, bn.bias, mean, invstd)


def scale_swish_output(y: Tensor, s: Tensor, saved: Saved) -> Tensor:
    """``y * s`` for ``(y, saved)`` from :func:`batchnorm_swish_saved`, keeping ``y`` for the backward only where
    ``saved`` is None."""
    return y * s if saved is None else ScaleSwishOutput.apply(y, s, *saved)
