"""Memory-lean training form of BatchNorm followed by swish (:func:`batchnorm_swish`) and of the convolution
that reads its output (:func:`conv_of_batchnorm_swish`).

``swish(bn(x))`` keeps two full-size tensors for the backward: BN's input ``x`` and swish's input ``z = bn(x)``;
the convolution after it keeps its own input, ``swish(z)`` (times squeeze-excitation's scale before the project
conv). :class:`BatchNormSwish` keeps one of ``x`` and ``z`` (and BN's per-channel batch statistics);
:class:`ConvOfBatchNormSwish` convolves ``swish(z) [* s]`` keeping ``s`` and what :class:`BatchNormSwish` keeps
already, and recomputes its input in the backward. An MBConv block with expansion keeps 2 full-size tensors at
its expanded width (at the expand and the depthwise BN) instead of 6; on channels-last float32, 3 (the project
conv keeps its input, trading ~370 MiB at D0 batch 8, 512 px, for two passes fewer: see
:class:`ConvOfBatchNormSwish`).

Which of the two is kept (:func:`_form`):

- ``x`` (plain layout): the backward recomputes ``z`` (``x * (invstd * w) + (b - mean * invstd * w)``, one
  multiply-add per element), which equals the forward's up to the rounding of that formula: bit for bit on the
  CPU at BatchNorm's initial weights (w = 1, b = 0), within float32 round-off (relative ~1e-7 in the gradients)
  once they have moved.
- ``z`` (channels-last, and bfloat16 under CPU autocast): nothing to recompute for swish, and BN's backward is
  computed from ``z``: ``native_batch_norm_backward`` given ``z``, ``b`` as the mean, ``1 / w`` as the inverse
  std and ``w**2 * invstd`` as the weight returns the same three gradients as from ``x``
  (``grad_x = w * invstd * (g - mean(g) - x_hat * mean(g * x_hat))``, ``grad_w = sum(g * x_hat)``,
  ``grad_b = sum(g)`` with ``x_hat = (z - b) / w``). ``x_hat`` read back from a rounded ``z`` loses about
  ``|b / w|`` times ``z``'s rounding, so this form is taken only where every channel has
  ``|b| <= KEEP_OUTPUT_RATIO * |w|`` and ``w != 0`` (else ``x`` is kept; under autocast the plain modules run).
  Under autocast only :class:`BatchNormSwish` runs (the convolutions after it keep their inputs, as plainly).

Under CPU autocast the project conv of an MBConv block (1x1, after squeeze-excitation's scale ``s``) runs as one
bfloat16 matrix product per image with ``weight * s[b]`` (``lean_amp.ScaledPointwiseForAmp``, oneDNN's AMX matmul),
keeping ``y`` but not ``y * s``. Float32 keeps the convolution: PyTorch's float32 matrix products run on MKL,
whose results in the training process were not the same bits from run to run (so an interrupted run would not
resume exactly), while oneDNN's are.

Squeeze-excitation's mean (:func:`spatial_mean`) passes its gradient on as a broadcast view, added to the project
conv's gradient in one pass instead of written out first.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lean_amp import ScaledPointwiseForAmp, scaled_pointwise_for_amp


#: ``(stride, padding, dilation, groups)`` of an ``nn.Conv2d``.
ConvArgs = Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], int]

#: The largest ``|b / w|`` of a BatchNorm channel for which BN's output is kept instead of its input (the ``x_hat``
#: read back is then within ``16`` roundings of ``z`` of BN's unit scale: ``2**-5`` in bfloat16, ``1e-6`` in float32).
KEEP_OUTPUT_RATIO = 16.0

#: What :class:`BatchNormSwish` keeps for the convolution after it: ``(kept, weight, bias, mean, invstd,
#: is_output)`` (``kept``: BN's input ``x``, or its output ``z`` where ``is_output``).
Saved = Optional[Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, bool]]


def _batchnorm_again(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """``batch_norm(x)`` from saved batch statistics: ``x * (invstd * w) + (b - mean * invstd * w)``."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = invstd * weight
    return torch.addcmul((bias - mean * scale).reshape(shape), x, scale.reshape(shape))


def _bn_output(kept: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor, is_output: bool) -> Tensor:
    """BN's output ``z`` from what was kept: ``kept`` itself, or recomputed from BN's input."""
    return kept if is_output else _batchnorm_again(kept, weight, bias, mean, invstd)


def _bn_backward(grad_z: Tensor, kept: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor,
                 eps: float, is_output: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """BN's ``(grad_x, grad_w, grad_b)`` in training mode from its input, or from its output (module docstring)."""
    if is_output:
        return torch.ops.aten.native_batch_norm_backward(grad_z, kept, weight * weight * invstd, None, None, bias,
                                                         weight.reciprocal(), True, eps, [True, True, True])
    return torch.ops.aten.native_batch_norm_backward(grad_z, kept, weight, None, None, mean, invstd, True, eps,
                                                     [True, True, True])


class BatchNormSwish(torch.autograd.Function):
    """``silu(batch_norm(x))`` in training mode (batch statistics, running statistics updated in place), saving
    ``x`` (or BN's output where ``keep_output``), the weights and the batch mean / inverse std only. Returns
    ``(output, mean, invstd, z)``: ``z`` BN's output where ``keep_output`` (the kept tensor), else empty."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                momentum: float, eps: float, keep_output: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        z, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(z if keep_output else x, weight, bias, mean, invstd)
        ctx.eps, ctx.keep_output = eps, keep_output
        if not keep_output:
            y, z = F.silu(z, inplace=True), x.new_empty(0)  # z is not kept
        else:
            y = F.silu(z)
        ctx.mark_non_differentiable(mean, invstd, z)
        return y, mean, invstd, z

    @staticmethod
    def backward(ctx, grad: Tensor, *_unused: Tensor) -> Tuple[Optional[Tensor], ...]:
        kept, weight, bias, mean, invstd = ctx.saved_tensors
        z = _bn_output(kept, weight, bias, mean, invstd, ctx.keep_output)
        grad_x, grad_w, grad_b = _bn_backward(torch.ops.aten.silu_backward(grad, z), kept, weight, bias, mean,
                                              invstd, ctx.eps, ctx.keep_output)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _silu_padded(z: Tensor, pad: Tuple[int, int, int, int]) -> Tensor:
    """``F.pad(F.silu(z), pad)`` (``pad``: (left, right, top, bottom), >= 0). For a channels-last ``z`` in one pass:
    swish written into the inside of the padded tensor, zeros on its border only (``F.pad`` zero-fills the whole
    tensor, then copies); each row of the inside is one contiguous run of width x channels values, which swish's
    vectorised kernel takes as it takes the dense tensor. The values are ``F.silu``'s within one unit in the last
    place (its scalar kernel takes a row's last values where width x channels is not a multiple of the vector
    width)."""
    if not any(pad):
        return F.silu(z)
    if not (z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last)):
        return F.pad(F.silu(z), pad)
    left, right, top, bottom = pad
    height, width = z.shape[-2:]
    out = torch.empty(z.shape[:-2] + (height + top + bottom, width + left + right), dtype=z.dtype, device=z.device,
                      memory_format=torch.channels_last)
    for border in (out[..., :top, :], out[..., top + height:, :], out[..., top:top + height, :left],
                   out[..., top:top + height, left + width:]):
        border.zero_()
    torch.ops.aten.silu.out(z, out=out[..., top:top + height, left:left + width])
    return out


def _conv(inputs: Tensor, weight: Tensor, pad: Tuple[int, int, int, int], conv: ConvArgs) -> Tensor:
    """``conv2d(F.pad(inputs, pad), weight)`` with ``conv`` = ``(stride, padding, dilation, groups)``, no bias."""
    if any(pad):
        inputs = F.pad(inputs, pad)
    return _conv_padded(inputs, weight, conv)


def _conv_padded(padded: Tensor, weight: Tensor, conv: ConvArgs) -> Tensor:
    """``conv2d(padded, weight)`` with ``conv`` = ``(stride, padding, dilation, groups)``, no bias."""
    stride, padding, dilation, groups = conv
    return F.conv2d(padded, weight, None, stride, padding, dilation, groups)


def _conv_backward(grad: Tensor, inputs: Tensor, weight: Tensor, pad: Tuple[int, int, int, int], conv: ConvArgs,
                   weight_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """The gradients of :func:`_conv` for its unpadded ``inputs`` and (``weight_grad``) its ``weight``."""
    return _conv_padded_backward(grad, F.pad(inputs, pad) if any(pad) else inputs, weight, pad, conv, weight_grad)


def _conv_padded_backward(grad: Tensor, padded: Tensor, weight: Tensor, pad: Tuple[int, int, int, int],
                          conv: ConvArgs, weight_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`_conv_backward` given the convolution's input already padded by ``pad``; a channels-last input
    gradient is then a view of the padded one (its rows are runs of width x channels values, which element-wise
    kernels read as they read a dense tensor's: the same values, no copy)."""
    stride, padding, dilation, groups = conv
    grad_inputs, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, padded, weight, None, stride, padding, dilation, False, [0, 0], groups, [True, weight_grad, False])
    if any(pad) and grad_inputs.is_contiguous(memory_format=torch.channels_last):
        left, right, top, bottom = pad
        height, width = grad_inputs.shape[-2:]
        grad_inputs = grad_inputs[..., top:height - bottom, left:width - right]
    elif any(pad):  # a dense copy, as F.pad's own backward: a view's short rows would reach the scalar kernels
        grad_inputs = F.pad(grad_inputs, tuple(-p for p in pad))
    return grad_inputs, grad_weight


class BatchNormSwishConv(torch.autograd.Function):
    """``conv2d(pad(silu(batch_norm(x))), weight)`` in training mode (batch statistics, running statistics updated
    in place): :class:`BatchNormSwish` and the convolution reading its output (the depthwise conv after an
    MBConv block's expansion) in one, saving ``x`` (or BN's output where ``keep_output``), the weights and the
    batch statistics only; the backward recomputes the convolution's input. ``pad`` / ``conv`` as
    :class:`ConvOfBatchNormSwish`."""

    @staticmethod
    def forward(ctx, x: Tensor, bn_weight: Tensor, bn_bias: Tensor, running_mean: Tensor, running_var: Tensor,
                momentum: float, eps: float, keep_output: bool, weight: Tensor, pad: Tuple[int, int, int, int],
                conv: ConvArgs) -> Tensor:
        z, mean, invstd = torch.native_batch_norm(x, bn_weight, bn_bias, running_mean, running_var, True, momentum,
                                                  eps)
        ctx.save_for_backward(z if keep_output else x, bn_weight, bn_bias, mean, invstd, weight)
        ctx.eps, ctx.keep_output, ctx.pad, ctx.conv = eps, keep_output, pad, conv
        return _conv_padded(_silu_padded(z, pad), weight, conv)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        kept, bn_weight, bn_bias, mean, invstd, weight = ctx.saved_tensors
        z = _bn_output(kept, bn_weight, bn_bias, mean, invstd, ctx.keep_output)
        grad_y, grad_weight = _conv_padded_backward(grad, _silu_padded(z, ctx.pad), weight, ctx.pad, ctx.conv,
                                                    ctx.needs_input_grad[8])
        grad_x, grad_bn_weight, grad_bn_bias = _bn_backward(torch.ops.aten.silu_backward(grad_y, z), kept, bn_weight,
                                                            bn_bias, mean, invstd, ctx.eps, ctx.keep_output)
        return grad_x, grad_bn_weight, grad_bn_bias, None, None, None, None, None, grad_weight, None, None


#: The smallest ``|s|`` for which :class:`ConvOfBatchNormSwish` keeps ``y * s`` (its gradient for ``s`` is then
#: ``sum(grad * y * s) / s``; below it, ``y * s`` may underflow and the quotient is not ``sum(grad * y)``).
MIN_SCALE = 1e-20


def _keeps_scaled(s: Optional[Tensor], pad: Tuple[int, int, int, int], is_output: bool) -> bool:
    """Whether :class:`ConvOfBatchNormSwish` keeps its input ``y * s`` (the BN-output form, no padding, every
    ``|s| >= MIN_SCALE``) rather than recomputing it."""
    return s is not None and is_output and not any(pad) and bool((s.detach().abs() >= MIN_SCALE).all())


class ConvOfBatchNormSwish(torch.autograd.Function):
    """``conv2d(pad(y [* s]), weight)`` for ``y`` an output of :class:`BatchNormSwish` (``s``: Tensor[B, C, 1, 1],
    squeeze-excitation's scale, or None), saving ``weight``, ``s`` and what :class:`BatchNormSwish` keeps already
    instead of the convolution's input, which the backward recomputes. ``pad``: ``F.pad``'s (left, right, top,
    bottom) before the convolution (TensorFlow "SAME" of a strided conv), ``conv``: ``(stride, padding,
    dilation, groups)`` of the ``nn.Conv2d`` (no bias).

    In the BN-output form (channels-last) with a scale (the MBConv project conv) it keeps ``u = y * s`` instead
    (:func:`_keeps_scaled`): the backward then needs neither ``y`` nor ``u`` recomputed (two passes over the
    block's widest tensor), ``grad_s = sum(grad_u * u) / s`` equalling ``sum(grad_u * y)`` to float32 round-off;
    one more kept tensor per block (D0 batch 8 at 512: ~370 MiB), the step ~2 % faster."""

    @staticmethod
    def forward(ctx, y: Tensor, s: Optional[Tensor], weight: Tensor, pad: Tuple[int, int, int, int],
                conv: ConvArgs, kept: Tensor, bn_weight: Tensor, bn_bias: Tensor, mean: Tensor,
                invstd: Tensor, is_output: bool) -> Tensor:
        scaled = y if s is None else y * s
        ctx.pad, ctx.conv, ctx.is_output = pad, conv, is_output
        ctx.keep_scaled = _keeps_scaled(s, pad, is_output)
        if ctx.keep_scaled:
            ctx.save_for_backward(weight, s, scaled)
        else:
            ctx.save_for_backward(weight, s, kept, bn_weight, bn_bias, mean, invstd)
        return _conv(scaled, weight, pad, conv)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        if ctx.keep_scaled:
            weight, s, scaled = ctx.saved_tensors
            grad_inputs, grad_weight = _conv_backward(grad, scaled, weight, ctx.pad, ctx.conv, ctx.needs_input_grad[2])
            grad_s = ((grad_inputs * scaled).sum(dim=(2, 3), keepdim=True) / s) if ctx.needs_input_grad[1] else None
            return grad_inputs * s, grad_s, grad_weight, None, None, None, None, None, None, None, None
        weight, s, kept, bn_weight, bn_bias, mean, invstd = ctx.saved_tensors
        z = _bn_output(kept, bn_weight, bn_bias, mean, invstd, ctx.is_output)
        y = F.silu(z, inplace=not ctx.is_output)
        grad_inputs, grad_weight = _conv_backward(grad, y if s is None else y * s, weight, ctx.pad, ctx.conv,
                                                  ctx.needs_input_grad[2])
        if s is None:
            return grad_inputs, None, grad_weight, None, None, None, None, None, None, None, None
        grad_s = (grad_inputs * y).sum(dim=(2, 3), keepdim=True) if ctx.needs_input_grad[1] else None
        return grad_inputs * s, grad_s, grad_weight, None, None, None, None, None, None, None, None


def batchnorm_swish(bn: nn.Module, x: Tensor) -> Tensor:
    """``silu(bn(x))`` (see :func:`batchnorm_swish_saved`)."""
    return batchnorm_swish_saved(bn, x)[0]


def _form(bn: nn.Module, x: Tensor) -> Optional[bool]:
    """Which training form of ``silu(bn(x))`` applies: None for the plain modules (evaluation, folded BN =
    ``nn.Identity``, SyncBatchNorm, no affine weights or running statistics, no gradients, other dtypes and
    devices, and bfloat16 where BN's output may not be kept); else whether BN's output is kept (a channels-last
    float32 ``x``, or a bfloat16 one under CPU autocast, where every ``|b| <= KEEP_OUTPUT_RATIO * |w|`` and
    ``w != 0``) rather than its input (other float32 ``x``)."""
    if not (type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.track_running_stats
            and torch.is_grad_enabled() and bn.weight.dtype == torch.float32):
        return None
    low_precision = x.dtype == torch.bfloat16 and x.device.type == "cpu"
    if not low_precision and (x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type)):
        return None
    if low_precision or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        weight = bn.weight.detach().abs()
        if bool(((weight > 0) & (bn.bias.detach().abs() <= KEEP_OUTPUT_RATIO * weight)).all()):
            return True
    return None if low_precision else False


def _momentum(bn: nn.Module) -> Optional[float]:
    """The momentum of this training step, with ``num_batches_tracked`` counted as ``nn.BatchNorm2d`` counts it."""
    momentum = bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            momentum = 1.0 / float(bn.num_batches_tracked)
    return momentum


def _conv_args(wrapper: nn.Module, x: Tensor) -> Optional[Tuple[Tuple[int, int, int, int], ConvArgs]]:
    """``(pad, conv)`` of an ``efficientnet.utils.Conv2dStaticSamePadding`` for input ``x``; None where the lean
    forms do not take it (a bias, string padding)."""
    conv = wrapper.conv
    if conv.bias is not None or not isinstance(conv.padding, tuple):
        return None
    from efficientnet.utils import same_padding  # efficientnet.utils imports this module
    pad = (same_padding(tuple(x.shape[-2:]), wrapper.kernel_size, wrapper.stride, wrapper.dilation)
           if wrapper._needs_pad else (0, 0, 0, 0))
    return pad, (conv.stride, conv.padding, conv.dilation, conv.groups)


def batchnorm_swish_saved(bn: nn.Module, x: Tensor) -> Tuple[Tensor, Saved]:
    """``silu(bn(x))`` and what :func:`conv_of_batchnorm_swish` needs; through :class:`BatchNormSwish` where it
    applies (an ``nn.BatchNorm2d`` with float32 affine weights and running statistics, training with gradients, a
    float32 ``x`` without autocast or a bfloat16 one under CPU autocast: :func:`_form`), else the plain modules
    (evaluation, folded BN = ``nn.Identity``, SyncBatchNorm). The second value is None unless a float32 ``x`` went
    through :class:`BatchNormSwish`. Same values and running statistics either way."""
    keep_output = _form(bn, x)
    if keep_output is None:
        return F.silu(bn(x)), None
    y, mean, invstd, z = BatchNormSwish.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                              _momentum(bn), bn.eps, keep_output)
    if x.dtype != torch.float32:
        return y, None
    return y, (z if keep_output else x, bn.weight, bn.bias, mean, invstd, keep_output)


def batchnorm_swish_conv(bn: nn.Module, x: Tensor, wrapper: nn.Module) -> Tensor:
    """``wrapper(silu(bn(x)))`` (``wrapper``: an ``efficientnet.utils.Conv2dStaticSamePadding`` without bias)
    through :class:`BatchNormSwishConv` where the lean forms apply (see :func:`batchnorm_swish_saved`), else
    ``wrapper(batchnorm_swish(bn, x))``. Same values, gradients and running statistics either way."""
    args = _conv_args(wrapper, x)
    keep_output = _form(bn, x) if args is not None and x.dtype == torch.float32 else None
    if keep_output is None:
        return wrapper(batchnorm_swish(bn, x))
    return BatchNormSwishConv.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, _momentum(bn), bn.eps,
                                    keep_output, wrapper.conv.weight, *args)


class SpatialMean(torch.autograd.Function):
    """``x.mean(dim=(2, 3), keepdim=True)`` (Tensor[B, C, H, W] -> Tensor[B, C, 1, 1], squeeze-excitation's squeeze)
    whose backward returns ``grad / (H * W)`` broadcast as a view. Autograd's own backward of ``mean`` writes that
    out as a full-size tensor, then adds it to the other gradient of ``x`` (the project conv's); the view is added
    in that one pass instead. The same values bit for bit (each element is ``grad / (H * W)`` either way)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return x.mean(dim=(2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return (grad / (ctx.shape[2] * ctx.shape[3])).expand(ctx.shape)


def spatial_mean(x: Tensor) -> Tensor:
    """``x.mean(dim=(2, 3), keepdim=True)`` for x: Tensor[B, C, H, W]; through :class:`SpatialMean` where a
    gradient is to be computed, plainly otherwise (inference, tracing for export)."""
    if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
        return SpatialMean.apply(x)
    return x.mean(dim=(2, 3), keepdim=True)


def conv_of_batchnorm_swish(wrapper: nn.Module, y: Tensor, saved: Saved, s: Optional[Tensor] = None) -> Tensor:
    """``wrapper(y * s)`` (``wrapper``: an ``efficientnet.utils.Conv2dStaticSamePadding`` without bias; ``s`` None:
    ``wrapper(y)``) for ``(y, saved)`` from :func:`batchnorm_swish_saved`, keeping neither ``y`` nor ``y * s`` for
    the backward where ``saved`` is not None (:class:`ConvOfBatchNormSwish`); else the plain modules."""
    args = _conv_args(wrapper, y) if saved is not None else None
    if args is None:
        if saved is None and scaled_pointwise_for_amp(wrapper, y, s):
            return ScaledPointwiseForAmp.apply(y, s, wrapper.conv.weight)
        return wrapper(y if s is None else y * s)
    return ConvOfBatchNormSwish.apply(y, s, wrapper.conv.weight, *args, *saved)
