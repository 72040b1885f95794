"""Training forms for CPU autocast (``--amp``, bfloat16) of the convolutions oneDNN runs slowly or wastefully
there: a depthwise conv (:class:`DepthwiseForAmp`: each gradient in whichever precision oneDNN's kernel is
faster in) and an MBConv block's project conv after squeeze-excitation's scale (:class:`ScaledPointwiseForAmp`:
bfloat16 matrix products with the scale folded into the weight). ``efficientnet/lean.py`` holds the float32
forms and calls these."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _rows(x: Tensor) -> Tensor:
    """Tensor[B, C, H, W] -> Tensor[B, H * W, C]: a view of a channels-last ``x`` (else a copy)."""
    batch, channels, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)


class ScaledPointwiseForAmp(torch.autograd.Function):
    """``conv2d(y * s, weight)`` of a 1x1 convolution (stride 1, one group, no bias, ``weight``: Tensor[O, C, 1,
    1]) for a lower-precision channels-last ``y`` (Tensor[B, C, H, W], bfloat16 under CPU autocast) and ``s``
    (Tensor[B, C, 1, 1], squeeze-excitation's scale): one matrix product per image, ``y[b]`` (its channels-last
    memory read as H*W rows of C values) times ``(weight * s[b])^T``, in ``y``'s dtype (``weight`` cast to it,
    as autocast casts it). Keeps ``y``, ``s`` and ``weight``, not ``y * s``; the backward is two products per
    image, ``m[b] = grad[b]^T y[b]`` (O x C, summed in float32 to ``grad_weight = sum_b m[b] * s[b]`` and
    ``grad_s[b] = sum_o m[b] * weight``) and ``grad_y[b] = grad[b] (weight * s[b])``. oneDNN runs bfloat16
    batched products on its AMX matmul kernels, 3-5x faster than the convolution with the scale written out
    (D0 batch 8 at 512: forward 1.2 ms against 5.6 ms, backward 5.9 ms against 26 ms for 144 -> 24 channels
    at 128 x 128). Returns Tensor[B, O, H, W], channels-last."""

    @staticmethod
    def forward(ctx, y: Tensor, s: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(y, s, weight)
        batch, channels, height, width = y.shape
        with torch.autocast(y.device.type, enabled=False):
            scaled = weight.to(y.dtype).reshape(1, -1, channels) * s.reshape(batch, 1, channels)
            out = torch.bmm(_rows(y), scaled.transpose(1, 2))
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        y, s, weight = ctx.saved_tensors
        batch, channels, height, width = y.shape
        out_channels = weight.shape[0]
        grad_y = grad_s = grad_weight = None
        with torch.autocast(y.device.type, enabled=False):
            grad_rows = _rows(grad.to(y.dtype))
            if ctx.needs_input_grad[0]:
                scaled = weight.to(y.dtype).reshape(1, out_channels, channels) * s.reshape(batch, 1, channels)
                grad_y = torch.bmm(grad_rows, scaled).view(batch, height, width, channels).permute(0, 3, 1, 2)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                m = torch.bmm(grad_rows.transpose(1, 2), _rows(y)).float()
                if ctx.needs_input_grad[2]:
                    grad_weight = (m * s.reshape(batch, 1, channels).float()).sum(0).view(weight.shape)
                    grad_weight = grad_weight.to(weight.dtype)
                if ctx.needs_input_grad[1]:
                    grad_s = (m * weight.reshape(1, out_channels, channels).float()).sum(1).view(s.shape).to(s.dtype)
        return grad_y, grad_s, grad_weight


def scaled_pointwise_for_amp(wrapper: nn.Module, y: Tensor, s: Optional[Tensor]) -> bool:
    """Whether ``wrapper(y * s)`` goes through :class:`ScaledPointwiseForAmp`: training under CPU autocast
    (gradients on) with a bfloat16 channels-last ``y`` and a scale ``s`` of its dtype, and a 1x1
    convolution with stride 1, one group, no padding and no bias."""
    conv = wrapper.conv
    return (s is not None and y.device.type == "cpu" and y.dtype == torch.bfloat16
            and s.dtype == y.dtype and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last)
            and tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1) and conv.groups == 1
            and conv.bias is None and tuple(conv.padding) == (0, 0) and not wrapper._needs_pad)


def low_precision_backward(kernel_size: Tuple[int, int], stride: Tuple[int, int]) -> Tuple[bool, bool]:
    """Which gradients of a depthwise conv :class:`DepthwiseForAmp` computes in the low precision (bf16) on the
    CPU: ``(input gradient, weight gradient)``. oneDNN's bf16 depthwise forward is 1.0-10x faster than its
    float32 one with the conversions it needs, but its backward is 2-3x slower for the input gradient of a
    strided conv and for the weight gradient of a 5x5 one (channels-last, AMX CPU, batch 8: the weight gradient
    of a 5x5 stride-2 conv on 144x128x128, 472 ms in bf16 against 159 ms in float32 with the conversions; the
    input gradient of a 3x3 stride-1 one, 15 ms against 148 ms). Those two run in float32."""
    return tuple(stride) == (1, 1), max(kernel_size) <= 3


class DepthwiseForAmp(torch.autograd.Function):
    """``conv2d(x, weight)`` of a depthwise conv for a lower-precision ``x`` (Tensor[B, C, H, W], bfloat16 under
    CPU autocast): the forward in ``x``'s dtype (``weight`` cast to it, as autocast casts it), each gradient in
    ``x``'s dtype or in float32 as :func:`low_precision_backward` says (oneDNN's fastest kernel for it); the
    tensors kept for the backward (``x``) and passed on stay in ``x``'s dtype. ``conv`` = ``(stride, padding,
    dilation, groups)``, no bias."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, conv: Tuple[Any, Any, Any, int]) -> Tensor:
        stride, padding, dilation, groups = conv
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x, weight.to(x.dtype), None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], None]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        low = low_precision_backward(tuple(weight.shape[-2:]), stride)
        grads: List[Optional[Tensor]] = [None, None]
        for in_low in (True, False):  # one convolution_backward per precision that has work
            mask = [need and is_low == in_low for need, is_low in zip(ctx.needs_input_grad[:2], low)]
            if not any(mask):
                continue
            g, inputs, w = (grad, x, weight.to(x.dtype)) if in_low else (grad.float(), x.float(), weight.float())
            out = torch.ops.aten.convolution_backward(g, inputs, w, None, stride, padding, dilation, False, [0, 0],
                                                      groups, mask + [False])
            for i in (0, 1):
                if mask[i]:
                    grads[i] = out[i].to((x if i == 0 else weight).dtype)
        return grads[0], grads[1], None
