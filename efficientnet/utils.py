"""Layers shared by the backbone and the detector: TensorFlow "same" padding, swish, drop connect.

TensorFlow pads a convolution or pool with ``padding="SAME"`` asymmetrically: the total padding
along one axis of size ``n`` is ``max((ceil(n / s) - 1) * s + k - n, 0)`` and the smaller half goes
on top/left. PyTorch's ``padding=k // 2`` is symmetric and shifts every feature by half a pixel for
stride-2 layers, which is why the padding is computed here for each input size (and cached).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IntPair = Union[int, Tuple[int, int]]

# BatchNorm settings of the official graph: TensorFlow momentum 0.99 is PyTorch momentum 0.01.
BN_MOMENTUM = 0.01
BN_EPS = 1e-3


def _pair(value: IntPair) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@lru_cache(maxsize=None)
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
        """x: Tensor[B, C_in, H, W] -> Tensor[B, C_out, ceil(H / s), ceil(W / s)]."""
        if self._needs_pad:
            pad = same_padding(tuple(x.shape[-2:]), self.kernel_size, self.stride, self.dilation)
            if any(pad):
                x = F.pad(x, pad)
        return self.conv(x)


class MaxPool2dStaticSamePadding(nn.Module):
    """``nn.MaxPool2d`` with TensorFlow "SAME" padding geometry.

    ``pad_value`` decides what the padded border holds:

    - ``0.0`` (default): zeros, as the published PyTorch checkpoints were trained and evaluated.
    - ``float("-inf")``: the padded cells never win, as TensorFlow's max-pool (the official
      checkpoints, see ``EfficientDetBackbone(pool_padding="official")``).
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


class Swish(nn.Module):
    """``x * sigmoid(x)`` (SiLU); PyTorch's fused kernel, exportable to ONNX."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x)


def drop_connect(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability ``rate``.

    x: Tensor[B, C, H, W]; kept samples are scaled by ``1 / (1 - rate)``.
    """
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.floor(keep + torch.rand((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device))
    return x / keep * mask
