"""Inference-only transformations of a detector: BatchNorm folding, channels-last, frozen graphs.

Every transformation keeps the network's function (up to float round-off) and returns a model with
the same ``forward`` contract as :class:`backbone.EfficientDetBackbone`. They are for inference
only: folded models cannot be trained or saved as published checkpoints.
"""
from __future__ import annotations

import copy
import logging
from typing import Sequence

import torch
from torch import Tensor, nn

from efficientdet.model import Head, SeparableConvBlock
from efficientnet.utils import Conv2dStaticSamePadding

logger = logging.getLogger(__name__)

MODES = ("eager", "fused", "channels_last", "trace", "bf16")


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


def _fold_into(wrapper: Conv2dStaticSamePadding, bn: nn.BatchNorm2d) -> None:
    wrapper.conv = fold_conv_bn(wrapper.conv, bn)


class FoldedHead(nn.Module):
    """A :class:`Head` with each level's BN folded into its own copy of the shared pointwise convs.

    Same outputs as the original head; ``sigmoid`` is applied for the classifier.
    """

    def __init__(self, head: Head) -> None:
        super().__init__()
        self.num_outputs = head.num_outputs
        self.num_anchors = head.num_anchors
        self.apply_sigmoid = type(head).__name__ == "Classifier"
        levels = []
        for bns in head.bn_list:
            convs = []
            for conv, bn in zip(head.conv_list, bns):
                block = copy.deepcopy(conv)
                _fold_into(block.pointwise_conv, bn)
                convs.append(block)
            levels.append(nn.ModuleList(convs))
        self.levels = nn.ModuleList(levels)
        self.header = copy.deepcopy(head.header)
        self.swish = copy.deepcopy(head.swish)

    def forward_raw(self, inputs: Sequence[Tensor]) -> Tensor:
        """inputs: per-level Tensor[B, C, H_l, W_l] -> Tensor[B, N, num_outputs] before activation."""
        outs = []
        for feat, convs in zip(inputs, self.levels):
            for conv in convs:
                feat = self.swish(conv(feat))
            feat = self.header(feat)
            outs.append(feat.permute(0, 2, 3, 1).reshape(feat.shape[0], -1, self.num_outputs))
        return torch.cat(outs, dim=1)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        out = self.forward_raw(inputs)
        return out.sigmoid() if self.apply_sigmoid else out


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an :class:`EfficientDetBackbone` (in eval mode) with every BatchNorm folded into the
    convolution before it: backbone convs, BiFPN node convs and down-channel convs, and the heads'
    per-level BNs (each level gets its own folded copy of the shared convs)."""
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        names = type(module).__name__
        if names == "MBConvBlock":
            if module.has_expansion:
                _fold_into(module._expand_conv, module._bn0)
                module._bn0 = nn.Identity()
            _fold_into(module._depthwise_conv, module._bn1)
            module._bn1 = nn.Identity()
            _fold_into(module._project_conv, module._bn2)
            module._bn2 = nn.Identity()
        elif names == "EfficientNet":
            _fold_into(module._conv_stem, module._bn0)
            module._bn0 = nn.Identity()
        elif isinstance(module, SeparableConvBlock) and module.norm:
            _fold_into(module.pointwise_conv, module.bn)
            module.bn = nn.Identity()
        elif isinstance(module, nn.Sequential) and len(module) >= 2 and isinstance(
                module[0], Conv2dStaticSamePadding) and isinstance(module[1], nn.BatchNorm2d):
            _fold_into(module[0], module[1])
            module[1] = nn.Identity()
    model.regressor = FoldedHead(model.regressor)
    model.classifier = FoldedHead(model.classifier)
    remaining = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if remaining:
        raise RuntimeError(f"BatchNorm left unfolded: {remaining[:3]}")
    return model
