"""EfficientNet as the EfficientDet backbone: stem and MBConv blocks, no classification top.

Attribute names (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` …) follow the layout of the
published checkpoints, so their state_dicts load unchanged.
"""
from __future__ import annotations

import functools
import itertools
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpointing import checkpointed, needs_checkpoint
from .lean import (batchnorm_swish, batchnorm_swish_conv, batchnorm_swish_saved, conv_of_batchnorm_swish,
                   spatial_mean)
from .config import DROP_CONNECT_RATE, STEM_CHANNELS, get_scaling, round_filters, scaled_blocks
from .utils import BN_EPS, BN_MOMENTUM, Conv2dStaticSamePadding, Swish, drop_connect


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with the official graph's momentum and epsilon (TF momentum 0.99 = PyTorch 0.01, eps 1e-3)."""
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
        # swish(bn(.)) and the convs reading it keep only the BN inputs for the backward (efficientnet/lean.py)
        x = inputs
        if self.has_expansion:
            x = batchnorm_swish_conv(self._bn0, self._expand_conv(x), self._depthwise_conv)
        else:
            x = self._depthwise_conv(x)
        x, saved = batchnorm_swish_saved(self._bn1, x)
        squeezed = spatial_mean(x)
        squeezed = self._se_expand(self._swish(self._se_reduce(squeezed)))
        x = self._bn2(conv_of_batchnorm_swish(self._project_conv, x, saved, torch.sigmoid(squeezed)))
        if self.has_residual:
            x = drop_connect(x, drop_connect_rate, self.training) + inputs
        return x

    @torch.no_grad()
    def fold_batchnorm_(self) -> None:
        """Fold every BatchNorm (eval mode) into the conv before it, in place; the BNs become identities."""
        if self.has_expansion:
            self._expand_conv.fold_bn_(self._bn0)
            self._bn0 = nn.Identity()
        self._depthwise_conv.fold_bn_(self._bn1)
        self._bn1 = nn.Identity()
        self._project_conv.fold_bn_(self._bn2)
        self._bn2 = nn.Identity()

    def fuse(self) -> "InferenceMBConvBlock":
        """The inference form of this block, its BatchNorms already folded (:class:`InferenceMBConvBlock`)."""
        return InferenceMBConvBlock(self)


def _linear_from_conv(wrapper: Conv2dStaticSamePadding) -> nn.Linear:
    """The 1×1 convolution of a squeeze-excitation (applied to a 1×1 map) as a Linear layer."""
    conv = wrapper.conv
    linear = nn.Linear(conv.in_channels, conv.out_channels).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.flatten(1))
        linear.bias.copy_(conv.bias)
    return linear


def _squeeze_for_inference(x: Tensor) -> Tensor:
    """x: Tensor[B, C, H, W] -> Tensor[B, C], the mean over H, W (squeeze-excitation's squeeze).

    bfloat16 / float16: ``avg_pool2d`` over the whole map (accumulated in float32), on CPU 3.6× faster than
    ``mean``, which copies the whole activation to float32 first (D0's 16 blocks: 0.8 ms against 2.9 ms; a
    ones-vector matmul took 1.9 ms). float32 keeps ``mean``, the faster there.
    """
    if x.dtype == torch.float32:
        return x.mean(dim=(2, 3))
    return F.avg_pool2d(x, (int(x.shape[2]), int(x.shape[3]))).flatten(1)


class InferenceMBConvBlock(nn.Module):
    """The inference form of an :class:`MBConvBlock` whose BatchNorms are folded (:meth:`MBConvBlock.fuse`):
    swish fused into the expand and depthwise convs, squeeze-excitation as Linear layers scaling in place, the
    residual added in place."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.expand = block._expand_conv.fuse("swish") if block.has_expansion else None
        self.depthwise = block._depthwise_conv.fuse("swish")
        self.se_reduce = _linear_from_conv(block._se_reduce)
        self.se_expand = _linear_from_conv(block._se_expand)
        self.project = block._project_conv.fuse()
        self.has_residual = block.has_residual

    def forward(self, inputs: Tensor, drop_connect_rate: float = 0.0) -> Tensor:
        """inputs: Tensor[B, C_in, H, W] -> Tensor[B, C_out, H / stride, W / stride]."""
        x = self.expand(inputs) if self.expand is not None else inputs
        x = self.depthwise(x)
        scale = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(_squeeze_for_inference(x)), inplace=True)))
        x = self.project(x.mul_(scale[:, :, None, None]))
        return x.add_(inputs) if self.has_residual else x


class EfficientNet(nn.Module):
    """EfficientNet-B``variant`` feature extractor (stem + MBConv blocks).

    ``forward`` returns the feature maps that feed a feature pyramid: the output of the last block
    before each stride-2 block, and the output of the final block (DEVELOPING.md, trap 6). For every variant
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
        # Block index ranges [start, stop) of the stages (activation checkpointing runs one stage at a time).
        starts = list(itertools.accumulate([0] + [stage.repeats for stage in scaled_blocks(variant)]))
        self.stages: Tuple[Tuple[int, int], ...] = tuple(zip(starts[:-1], starts[1:]))
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> List[Tensor]:
        """x: Tensor[B, 3, H, W] normalised RGB -> feature maps at strides 4, 8, 16, 32.

        (The stride-2 map of the stem stage is not returned: no pyramid level uses it.) With
        :attr:`grad_checkpointing` each stage (the stem with the first) keeps only its input for the backward.
        """
        features: List[Tensor] = []
        wanted = self.feature_indices[1:]
        for start, stop in self.stages:
            modules = list(self._blocks[start:stop]) + ([self._conv_stem, self._bn0] if start == 0 else [])
            if self.grad_checkpointing and needs_checkpoint(modules):
                x = checkpointed(functools.partial(self._run_stage, start, stop), modules, x)
            else:
                x = self._run_stage(start, stop, x)
            if stop - 1 in wanted:
                features.append(x)
        return features

    def _run_stage(self, start: int, stop: int, x: Tensor) -> Tensor:
        """Blocks ``start … stop - 1`` (after the stem when ``start`` is 0)."""
        if start == 0:
            x = batchnorm_swish(self._bn0, self._conv_stem(x)) if isinstance(self._bn0, nn.BatchNorm2d) else (
                self._swish(self._bn0(self._conv_stem(x))))  # after fuse_(), _conv_stem applies the swish
        num_blocks = len(self._blocks)
        for idx in range(start, stop):
            x = self._blocks[idx](x, self.drop_connect_rate * idx / num_blocks)
        return x

    @torch.no_grad()
    def fold_batchnorm_(self) -> None:
        """Fold the stem's and every block's BatchNorm into the conv before it, in place."""
        self._conv_stem.fold_bn_(self._bn0)
        self._bn0 = nn.Identity()
        for block in self._blocks:
            block.fold_batchnorm_()

    def fuse_(self) -> None:
        """Switch to the inference form in place (BatchNorms already folded): the stem conv with swish fused,
        every block an :class:`InferenceMBConvBlock`."""
        self._conv_stem = self._conv_stem.fuse("swish")
        self._swish = nn.Identity()  # inside _conv_stem now
        self._blocks = nn.ModuleList([block.fuse() for block in self._blocks])


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
