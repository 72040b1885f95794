"""Layers shared by the backbone and the detector: TensorFlow "same" padding, swish, drop connect, and
each layer's inference form beside it (``fold_bn_`` / ``fuse()``: :class:`InferenceConv2d`,
:class:`InferenceMaxPool2d`, :class:`InplaceSwish`).

TensorFlow pads a convolution or pool with ``padding="SAME"`` asymmetrically: the total padding
along one axis of size ``n`` is ``max((ceil(n / s) - 1) * s + k - n, 0)`` and the smaller half goes
on top/left. PyTorch's ``padding=k // 2`` is symmetric and shifts every feature by half a pixel for
stride-2 layers, which is why the padding is computed here for each input size (and cached).
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lean_amp import DepthwiseForAmp

IntPair = Union[int, Tuple[int, int]]

# BatchNorm settings of the official graph: TensorFlow momentum 0.99 is PyTorch momentum 0.01.
BN_MOMENTUM = 0.01
BN_EPS = 1e-3


def _pair(value: IntPair) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@functools.lru_cache(maxsize=None)
def same_padding(size: Tuple[int, int], kernel: Tuple[int, int], stride: Tuple[int, int],
                 dilation: Tuple[int, int] = (1, 1)) -> Tuple[int, int, int, int]:
    """TensorFlow "SAME" padding for an input of ``size`` = (H, W).

    Returns:
        ``(left, right, top, bottom)`` as ``F.pad`` takes it; the smaller half is on top/left.
    """
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


class Conv2dStaticSamePadding(nn.Module):
    """``nn.Conv2d`` with TensorFlow "SAME" padding.

    The convolution lives in ``self.conv`` so that state_dict keys read ``<name>.conv.weight``, the
    layout of the published checkpoints.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 bias: bool = True, groups: int = 1, dilation: IntPair = 1) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        # With stride 1 and an odd kernel, "SAME" padding is symmetric for every input size: let the
        # convolution pad (same numbers, no extra copy of the input).
        symmetric = self.stride == (1, 1) and all(k % 2 == 1 for k in self.kernel_size)
        padding = tuple((k - 1) * d // 2 for k, d in zip(self.kernel_size, self.dilation)) if symmetric else 0
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                              groups=groups, dilation=dilation)
        self._needs_pad = not symmetric

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[B, C_in, H, W] -> Tensor[B, C_out, ceil(H / s), ceil(W / s)].

        Training under CPU autocast (``--amp``: bf16, gradients on) a depthwise conv goes through
        :class:`DepthwiseForAmp`: forward in bf16, each gradient in bf16 or float32, whichever oneDNN's kernel
        for it is faster in (its bf16 input gradient of a strided conv and weight gradient of a 5×5 one are 2-3x
        slower than float32's); tensors stay bf16. Its 1×1 convolutions are faster in bf16 and stay so.
        """
        if self._needs_pad:
            pad = same_padding(tuple(x.shape[-2:]), self.kernel_size, self.stride, self.dilation)
            if any(pad):
                x = F.pad(x, pad)
        if (self.conv.groups > 1 and x.device.type == "cpu" and torch.is_grad_enabled()
                and torch.is_autocast_enabled("cpu")):
            conv = self.conv
            if conv.bias is None and isinstance(conv.padding, tuple) and x.dtype != torch.float32:
                return DepthwiseForAmp.apply(x, conv.weight, (conv.stride, conv.padding, conv.dilation,
                                                              conv.groups))
            with torch.autocast("cpu", enabled=False):
                return conv(x.float())
        return self.conv(x)

    @torch.no_grad()
    def fold_bn_(self, bn: nn.BatchNorm2d) -> None:
        """Fold ``bn`` (in eval mode, following this conv) into the convolution, in place."""
        self.conv = fold_conv_bn(self.conv, bn)

    def fuse(self, activation: Optional[str] = None, **kwargs) -> "InferenceConv2d":
        """The inference form (BN already folded): see :class:`InferenceConv2d`."""
        return InferenceConv2d(self, activation, **kwargs)


class MaxPool2dStaticSamePadding(nn.Module):
    """``nn.MaxPool2d`` with TensorFlow "SAME" padding geometry.

    ``pad_value`` decides what the padded border holds:

    - ``0.0`` (default): zeros, as the published PyTorch checkpoints were trained and evaluated.
    - ``float("-inf")``: the padded cells never win, as TensorFlow's max-pool (the official
      checkpoints, see ``EfficientDet(pool_padding="official")``).
    """

    def __init__(self, kernel_size: IntPair, stride: IntPair, pad_value: float = 0.0) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.pad_value = float(pad_value)
        self.pool = nn.MaxPool2d(self.kernel_size, self.stride)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[B, C, H, W] -> Tensor[B, C, ceil(H / s), ceil(W / s)]."""
        pad = same_padding(tuple(x.shape[-2:]), self.kernel_size, self.stride)
        if any(pad):
            x = F.pad(x, pad, value=self.pad_value)
        return self.pool(x)

    def fuse(self) -> "InferenceMaxPool2d":
        """The inference form: the same windows without the padded copy (:class:`InferenceMaxPool2d`)."""
        return InferenceMaxPool2d(self)


class Swish(nn.Module):
    """``x * sigmoid(x)`` (SiLU); PyTorch's fused kernel, exportable to ONNX.

    Memory-efficient in training already: ``F.silu``'s backward keeps only its input, as the published
    ``MemoryEfficientSwish`` (a custom autograd Function) does by hand, and is faster (a D0 training step).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x)

    def fuse(self) -> "InplaceSwish":
        """The inference form: swish in place (:class:`InplaceSwish`)."""
        return InplaceSwish()


#: The published names: both were ``x * sigmoid(x)``, one with a hand-written backward.
MemoryEfficientSwish = Swish


class SwishFunction(torch.autograd.Function):
    """The published ``SwishImplementation``: swish whose backward keeps only its input,
    ``d/dx x·σ(x) = σ(x)·(1 + x·(1 − σ(x)))``. Kept for published code; :class:`Swish` is the faster form."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        sig = torch.sigmoid(x)
        return grad * (sig * (1 + x * (1 - sig)))


SwishImplementation = SwishFunction


def drop_connect(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability ``rate``.

    x: Tensor[B, C, H, W]; kept samples are scaled by ``1 / (1 - rate)``: the published ``x / keep * mask``, in
    float32 / float64 as one pass ``x / (keep / mask)`` (``x / inf = x * 0`` where dropped: the same bits both ways).
    """
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.floor(keep + torch.rand((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device))
    if x.dtype in (torch.float32, torch.float64):
        return x / torch.full_like(mask, keep).div_(mask)
    return x / keep * mask  # bfloat16 / float16: ``keep`` as a scalar is not rounded to their precision


# ---------------------------------------------------------------------------------------------------------
# Inference forms (``fuse()``): BatchNorm folded, no padding copies, activations fused by oneDNN or in place.
# For inference only: not trainable, not a checkpoint layout.
# ---------------------------------------------------------------------------------------------------------
# Input shapes whose oneDNN-packed weights an InferenceConv2d keeps by default (also the frozen graphs an
# InferenceModel keeps, utils/inference/modes.py).
TRACE_CACHE_SIZE = 4


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv whose output equals ``bn(conv(x))`` in eval mode (a new module; inputs untouched)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
    fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 convolutions have native support here (CUDA with bf16, or a CPU with oneDNN bf16:
    AVX512-BF16 / AMX). Elsewhere bf16 still runs, through slow emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and checker is not None and checker())


# mkldnn::_convolution_pointwise takes a ``Scalar?[]`` that torch.jit.trace cannot record; a TorchScript
# function (compiled once, on first use) hides the argument from the tracer.
_CONV_POINTWISE_SOURCE = """
def conv_pointwise(x: Tensor, weight: Tensor, bias: Tensor, padding: List[int], stride: List[int], groups: int,
                   attr: str) -> Tensor:
    scalars: List[Optional[number]] = []
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, [1, 1], groups, attr, scalars, "")
"""


@functools.lru_cache(maxsize=None)
def _conv_pointwise():
    """``conv_pointwise(x, weight, bias, padding, stride, groups, attr)``: oneDNN convolution with the unary
    post-op ``attr`` ("swish", "sigmoid" or "none")."""
    return torch.jit.CompilationUnit(_CONV_POINTWISE_SOURCE).conv_pointwise


def _onednn_swish_available(device: torch.device) -> bool:
    """Whether oneDNN can apply swish inside the convolution (``mkldnn::_convolution_pointwise``, the op
    that torch.compile's CPU backend uses): CPU builds with oneDNN."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


# In-place activations of InferenceConv2d without oneDNN (the names are oneDNN's post-op attributes).
_ACTIVATIONS = {None: lambda y: y, "swish": lambda y: F.silu(y, inplace=True), "sigmoid": torch.sigmoid_}


class InferenceConv2d(nn.Module):
    """A folded convolution (bias included) with TensorFlow "SAME" padding, optionally followed by swish or
    sigmoid, for inference.

    - No padding copy: where "SAME" padding of an input side is symmetric the convolution pads itself;
      where it puts one more zero at the end than at the start (stride 2, odd kernel ``k >= 3``, even
      side), the same sums come from a kernel of ``k + 1`` whose first row (column) is zero and symmetric
      padding. The weight variant for each (row, column) parity is precomputed; the zero taps add exact
      zeros, so outputs equal :class:`Conv2dStaticSamePadding` up to summation order.
    - ``activation``: ``"swish"`` or ``"sigmoid"`` follows. On CPU oneDNN applies it inside the
      convolution (no second pass over the output; in bfloat16 it is computed in float32 registers);
      elsewhere it runs in place.
    - On the oneDNN path with channels-last inputs the weight is reordered into oneDNN's layout once per
      input shape and dtype (on first use) instead of on every call.

    Args:
        wrapper: the (BN-folded) convolution; odd kernels, stride 1 or 2, no dilation.
        activation: None, ``"swish"`` or ``"sigmoid"``.
        fuse_onednn: use oneDNN's fused convolution (default: where available, see
            :func:`_onednn_swish_available`); False forces ``F.conv2d`` (+ in-place swish).
        max_packed: input shapes whose packed weights are kept (one per network input shape, times the
            pyramid levels for a conv shared by the levels).
    """

    def __init__(self, wrapper: Conv2dStaticSamePadding, activation: Optional[str] = None,
                 fuse_onednn: Optional[bool] = None, max_packed: int = TRACE_CACHE_SIZE) -> None:
        super().__init__()
        conv = wrapper.conv
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS, key=str)}, got {activation!r}")
        if conv.dilation != (1, 1) or any(k % 2 == 0 for k in conv.kernel_size) or not set(conv.stride) <= {1, 2}:
            raise ValueError(f"InferenceConv2d takes odd kernels, strides 1 or 2 and no dilation, got kernel "
                             f"{conv.kernel_size} stride {conv.stride} dilation {conv.dilation}")
        self.stride = tuple(conv.stride)
        self.groups = conv.groups
        self.activation = activation
        self._fuse_request = fuse_onednn
        self.max_packed = max_packed
        weight = conv.weight.detach().clone()
        bias = conv.bias.detach().clone() if conv.bias is not None else weight.new_zeros(conv.out_channels)
        self.register_buffer("bias", bias)
        # Per (row, column) parity of the input (1 = even): the weight buffer ("weight_{row shift}{column shift}",
        # each distinct variant stored once) and the symmetric conv padding.
        self.variants: Dict[Tuple[int, int], Tuple[str, Tuple[int, int]]] = {}
        for row_even in (0, 1):
            for col_even in (0, 1):
                shifts, padding = [], []
                for k, s, even in zip(conv.kernel_size, self.stride, (row_even, col_even)):
                    size = 2 * k + 2 if even else 2 * k + 1  # "SAME" padding depends on the side's parity only
                    before, after = same_padding((size, size), (k, k), (s, s))[2:]
                    if after - before not in (0, 1):
                        raise ValueError(f"unexpected SAME padding ({before}, {after}) for kernel {k} stride {s}")
                    shifts.append(after - before)
                    padding.append(after)
                name = f"weight_{shifts[0]}{shifts[1]}"
                if not hasattr(self, name):
                    self.register_buffer(name, F.pad(weight, (shifts[1], 0, shifts[0], 0)))
                self.variants[(row_even, col_even)] = (name, (padding[0], padding[1]))
        self.fuse_onednn = self._decide_fusion()
        # (variant, dtype, input shape) -> name of the buffer holding that weight in oneDNN's layout for that
        # input (see _packed_weight), oldest first.
        self._packed: "OrderedDict[Tuple[str, torch.dtype, Tuple[int, ...]], str]" = OrderedDict()
        self._packed_count = 0

    def _decide_fusion(self) -> bool:
        # oneDNN's bf16 kernels need AVX512-BF16/AMX (or AVX-NE-CONVERT): elsewhere F.conv2d emulates bf16.
        available = _onednn_swish_available(self.bias.device) and (
            self.bias.dtype != torch.bfloat16 or bf16_supported(self.bias.device))
        return available if self._fuse_request is None else bool(self._fuse_request) and available

    def _apply(self, fn, recurse=True):
        # A device or dtype change drops the packed weights (repacked on use) and re-decides the oneDNN path.
        for buffer in self._packed.values():
            del self._buffers[buffer]
        self._packed.clear()
        module = super()._apply(fn, recurse)
        self.fuse_onednn = self._decide_fusion()
        return module

    def _packed_weight(self, name: str, padding: Tuple[int, int], x: Tensor) -> Tensor:
        """The weight variant ``name`` in oneDNN's own layout for the channels-last input ``x``: reordered on
        first use and kept as a non-persistent buffer, for the last :attr:`max_packed` input shapes.

        Unpacked, oneDNN reorders the weight on every call (~10 µs per conv here, over 180 convs in D0). The layout
        oneDNN picks depends on the input's shape and dtype, and a weight packed for another shape gives the same
        values but can be 15x slower (D0's 1152->192 1x1 conv at 16x16 packed for 4x4 inputs): one per shape.
        """
        key = (name, x.dtype, tuple(int(size) for size in x.shape))  # traced sizes are tensors
        buffer = self._packed.get(key)
        if buffer is None:
            buffer = f"{name}_packed_{self._packed_count}"
            self._packed_count += 1
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                getattr(self, name).to(x.dtype), list(padding), list(self.stride), [1, 1], self.groups,
                list(x.shape))
            self.register_buffer(buffer, packed, persistent=False)
            self._packed[key] = buffer
            while len(self._packed) > self.max_packed:  # frozen graphs keep their own reference
                del self._buffers[self._packed.popitem(last=False)[1]]
        else:
            self._packed.move_to_end(key)
        return getattr(self, buffer)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[B, C_in, H, W] -> Tensor[B, C_out, ceil(H / s), ceil(W / s)]."""
        name, padding = self.variants[(int(x.shape[-2] % 2 == 0), int(x.shape[-1] % 2 == 0))]
        weight = getattr(self, name)
        if self.fuse_onednn and x.is_contiguous(memory_format=torch.channels_last):
            weight = self._packed_weight(name, padding, x)
        if self.fuse_onednn:
            return _conv_pointwise()(x, weight, self.bias, list(padding), list(self.stride), self.groups,
                                     self.activation or "none")
        y = F.conv2d(x, weight, self.bias, self.stride, padding, 1, self.groups)
        return _ACTIVATIONS[self.activation](y)


class InferenceMaxPool2d(nn.Module):
    """:class:`MaxPool2dStaticSamePadding` without the padded copy of its input.

    max_pool2d's own padding and ``ceil_mode`` reproduce "SAME" windows with the padded cells ignored (the
    ``-inf`` padding of the official checkpoints). With zero padding (the published ones) the outputs whose
    window reaches into the padding are then raised to at least 0, in place: max(window, 0) is the maximum
    over the window with its padded zeros. Same outputs, bit for bit.
    """

    def __init__(self, pool: MaxPool2dStaticSamePadding) -> None:
        super().__init__()
        self.kernel_size = pool.kernel_size
        self.stride = pool.stride
        self.pad_value = pool.pad_value
        if self.pad_value not in (0.0, float("-inf")):
            raise ValueError(f"InferenceMaxPool2d takes pad_value 0 or -inf, got {self.pad_value}")

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[B, C, H, W] -> Tensor[B, C, ceil(H / s), ceil(W / s)]."""
        left, right, top, bottom = same_padding((int(x.shape[-2]), int(x.shape[-1])), self.kernel_size, self.stride)
        sides = ((top, bottom), (left, right))
        if any(after - before not in (0, 1) or before > k // 2 or (after > before and s < 2)
               for (before, after), k, s in zip(sides, self.kernel_size, self.stride)):
            return F.max_pool2d(F.pad(x, (left, right, top, bottom), value=self.pad_value), self.kernel_size,
                                self.stride)
        out = F.max_pool2d(x, self.kernel_size, self.stride, padding=(top, left), ceil_mode=True)
        if self.pad_value == 0.0:
            for dim, (before, after), k, s in zip((2, 3), sides, self.kernel_size, self.stride):
                size, count = int(x.shape[dim]), int(out.shape[dim])
                # Outputs whose window starts before the input or ends after it.
                border = sorted({i for i in range(count) if i * s - before < 0 or i * s - before + k > size})
                for i in border:
                    out.select(dim, i).clamp_(min=0.0)
        return out


class InplaceSwish(nn.Module):
    """Swish that overwrites its input: for inference graphs where the input is a fresh temporary."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x, inplace=True)
