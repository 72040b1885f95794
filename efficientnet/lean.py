"""Memory-lean training form of BatchNorm followed by swish (:func:`batchnorm_swish`) and of the convolution
that reads its output (:func:`conv_of_batchnorm_swish`).

``swish(bn(x))`` keeps two full-size tensors for the backward: BN's input ``x`` and swish's input ``bn(x)``;
the convolution after it keeps its own input, ``swish(bn(x))`` (times squeeze-excitation's scale before the
project conv). :class:`BatchNormSwish` keeps only ``x`` (and BN's per-channel batch statistics) and recomputes
``bn(x)`` in the backward, one multiply-add per element; :class:`ConvOfBatchNormSwish` convolves
``swish(bn(x)) [* s]`` keeping ``s`` and what :class:`BatchNormSwish` keeps already, and recomputes its input in
the backward. An MBConv block with expansion keeps 2 full-size tensors at its expanded width (the expand and the
depthwise BN inputs) instead of 6. On the CPU the recomputed ``bn(x)`` has the bits of the forward's (the same
``x * (invstd * w) + (b - mean * invstd * w)``), so the gradients equal the plain modules' bit for bit there.
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


class ConvOfBatchNormSwish(torch.autograd.Function):
    """``conv2d(pad(y [* s]), weight)`` for ``y`` an output of :class:`BatchNormSwish` (``s``: Tensor[B, C, 1, 1],
    squeeze-excitation's scale, or None), saving ``weight``, ``s`` and what :class:`BatchNormSwish` keeps already
    instead of the convolution's input, which the backward recomputes. ``pad``: ``F.pad``'s (left, right, top,
    bottom) before the convolution (TensorFlow "SAME" of a strided conv), ``conv``: ``(stride, padding,
    dilation, groups)`` of the ``nn.Conv2d`` (no bias)."""

    @staticmethod
    def forward(ctx, y: Tensor, s: Optional[Tensor], weight: Tensor, pad: Tuple[int, int, int, int],
                conv: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], int], x: Tensor, bn_weight: Tensor,
                bn_bias: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
        inputs = y if s is None else y * s
        if any(pad):
            inputs = F.pad(inputs, pad)
        stride, padding, dilation, groups = conv
        ctx.save_for_backward(weight, s, x, bn_weight, bn_bias, mean, invstd)
        ctx.pad, ctx.conv = pad, conv
        return F.conv2d(inputs, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        weight, s, x, bn_weight, bn_bias, mean, invstd = ctx.saved_tensors
        y = F.silu(_batchnorm_again(x, bn_weight, bn_bias, mean, invstd))
        inputs = y if s is None else y * s
        if any(ctx.pad):
            inputs = F.pad(inputs, ctx.pad)
        stride, padding, dilation, groups = ctx.conv
        grad_inputs, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, inputs, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [True, ctx.needs_input_grad[2], False])
        if any(ctx.pad):  # a dense copy, as F.pad's own backward (a strided view takes other, scalar, kernels)
            grad_inputs = F.pad(grad_inputs, tuple(-p for p in ctx.pad))
        if s is None:
            return grad_inputs, None, grad_weight, None, None, None, None, None, None, None
        grad_s = (grad_inputs * y).sum(dim=(2, 3), keepdim=True) if ctx.needs_input_grad[1] else None
        return grad_inputs * s, grad_s, grad_weight, None, None, None, None, None, None, None


Saved = Optional[Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]


def batchnorm_swish(bn: nn.Module, x: Tensor) -> Tensor:
    """``silu(bn(x))`` (see :func:`batchnorm_swish_saved`)."""
    return batchnorm_swish_saved(bn, x)[0]


def batchnorm_swish_saved(bn: nn.Module, x: Tensor) -> Tuple[Tensor, Saved]:
    """``silu(bn(x))`` and what :func:`conv_of_batchnorm_swish` needs; through :class:`BatchNormSwish` where it applies
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


def conv_of_batchnorm_swish(wrapper: nn.Module, y: Tensor, saved: Saved, s: Optional[Tensor] = None) -> Tensor:
    """``wrapper(y * s)`` (``wrapper``: an ``efficientnet.utils.Conv2dStaticSamePadding`` without bias; ``s`` None:
    ``wrapper(y)``) for ``(y, saved)`` from :func:`batchnorm_swish_saved`, keeping neither ``y`` nor ``y * s`` for
    the backward where ``saved`` is not None (:class:`ConvOfBatchNormSwish`); else the plain modules."""
    conv = wrapper.conv
    if saved is None or conv.bias is not None or not isinstance(conv.padding, tuple):
        return wrapper(y if s is None else y * s)
    from efficientnet.utils import same_padding  # efficientnet.utils imports nothing of this module
    pad = (same_padding(tuple(y.shape[-2:]), wrapper.kernel_size, wrapper.stride, wrapper.dilation)
           if wrapper._needs_pad else (0, 0, 0, 0))
    return ConvOfBatchNormSwish.apply(y, s, conv.weight, pad, (conv.stride, conv.padding, conv.dilation, conv.groups),
                                      *saved)
