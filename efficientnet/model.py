"""EfficientNet as the EfficientDet backbone: stem and MBConv blocks, no classification top.

Attribute names (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` …) follow the layout of the
published checkpoints, so their state_dicts load unchanged.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

from .config import DROP_CONNECT_RATE, STEM_CHANNELS, get_scaling, round_filters, scaled_blocks
from .utils import BN_EPS, BN_MOMENTUM, Conv2dStaticSamePadding, Swish, drop_connect


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with the official graph's momentum and epsilon (SPEC trap 2)."""
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: [expand 1×1] → depthwise k×k → squeeze-excitation → project 1×1.

    The residual connection (with drop connect while training) applies when the block keeps its
    resolution and width.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int,
                 se_ratio: float) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.stride = stride
        self.has_residual = stride == 1 and in_channels == out_channels
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = Conv2dStaticSamePadding(in_channels, hidden, 1, bias=False)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = Conv2dStaticSamePadding(hidden, hidden, kernel, stride=stride, groups=hidden,
                                                       bias=False)
        self._bn1 = batch_norm(hidden)
        squeezed = max(1, int(in_channels * se_ratio))
        self._se_reduce = Conv2dStaticSamePadding(hidden, squeezed, 1)
        self._se_expand = Conv2dStaticSamePadding(squeezed, hidden, 1)
        self._project_conv = Conv2dStaticSamePadding(hidden, out_channels, 1, bias=False)
        self._bn2 = batch_norm(out_channels)
        self._swish = Swish()

    def forward(self, inputs: Tensor, drop_connect_rate: float = 0.0) -> Tensor:
        """inputs: Tensor[B, C_in, H, W] -> Tensor[B, C_out, H / stride, W / stride]."""
        x = inputs
        if self.has_expansion:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        squeezed = x.mean(dim=(2, 3), keepdim=True)
        squeezed = self._se_expand(self._swish(self._se_reduce(squeezed)))
        x = torch.sigmoid(squeezed) * x
        x = self._bn2(self._project_conv(x))
        if self.has_residual:
            x = drop_connect(x, drop_connect_rate, self.training) + inputs
        return x


class EfficientNet(nn.Module):
    """EfficientNet-B``variant`` feature extractor (stem + MBConv blocks).

    ``forward`` returns the feature maps that feed a feature pyramid: the output of the last block
    before each stride-2 block, and the output of the final block (SPEC trap 6). For every variant
    these are at strides 2, 4, 8, 16, 32.
    """

    def __init__(self, variant: int, drop_connect_rate: float = DROP_CONNECT_RATE) -> None:
        super().__init__()
        scaling = get_scaling(variant)
        self.variant = variant
        self.drop_connect_rate = drop_connect_rate
        stem = round_filters(STEM_CHANNELS, scaling.width)
        self._conv_stem = Conv2dStaticSamePadding(3, stem, 3, stride=2, bias=False)
        self._bn0 = batch_norm(stem)
        self._swish = Swish()

        blocks: List[MBConvBlock] = []
        for stage in scaled_blocks(variant):
            for i in range(stage.repeats):
                blocks.append(MBConvBlock(
                    in_channels=stage.in_channels if i == 0 else stage.out_channels,
                    out_channels=stage.out_channels,
                    kernel=stage.kernel,
                    stride=stage.stride if i == 0 else 1,
                    expand_ratio=stage.expand_ratio,
                    se_ratio=stage.se_ratio,
                ))
        self._blocks = nn.ModuleList(blocks)
        # Index of each block whose output is a returned feature map.
        last = len(blocks) - 1
        self.feature_indices: Tuple[int, ...] = tuple(
            i - 1 for i, block in enumerate(blocks) if block.stride == 2) + (last,)
        self.feature_channels: Tuple[int, ...] = tuple(
            blocks[i]._bn2.num_features for i in self.feature_indices)

    def forward(self, x: Tensor) -> List[Tensor]:
        """x: Tensor[B, 3, H, W] normalised RGB -> feature maps at strides 4, 8, 16, 32.

        (The stride-2 map of the stem stage is not returned: no pyramid level uses it.)
        """
        x = self._swish(self._bn0(self._conv_stem(x)))
        features: List[Tensor] = []
        num_blocks = len(self._blocks)
        wanted = self.feature_indices[1:]
        for idx, block in enumerate(self._blocks):
            x = block(x, self.drop_connect_rate * idx / num_blocks)
            if idx in wanted:
                features.append(x)
        return features


class EfficientNetBackbone(nn.Module):
    """The detector's backbone: EfficientNet-B``variant`` returning (P3, P4, P5).

    The network lives in ``self.model`` (published state_dict prefix ``backbone_net.model.``).
    """

    def __init__(self, variant: int, drop_connect_rate: float = DROP_CONNECT_RATE) -> None:
        super().__init__()
        self.model = EfficientNet(variant, drop_connect_rate)
        # Channels of P3, P4, P5 (strides 8, 16, 32).
        self.out_channels: Tuple[int, int, int] = tuple(self.model.feature_channels[-3:])  # type: ignore

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x: Tensor[B, 3, H, W] -> (P3 Tensor[B, C3, H/8, W/8], P4 [.., H/16, W/16], P5 [.., H/32, W/32])."""
        _, p3, p4, p5 = self.model(x)
        return p3, p4, p5
