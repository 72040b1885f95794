"""EfficientDet's parts: SeparableConvBlock, BiFPN, and the shared-conv heads (Regressor, Classifier).

Attribute names follow the layout of the published checkpoints (``conv6_up``, ``p6_w1``,
``p5_down_channel`` …) so those state_dicts load with ``strict=True``.
"""
from __future__ import annotations

import copy
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efficientnet.checkpointing import checkpointed, needs_checkpoint
from efficientnet.model import batch_norm
from efficientnet.utils import TRACE_CACHE_SIZE, Conv2dStaticSamePadding, MaxPool2dStaticSamePadding, Swish

FUSION_EPS = 1e-4


class SeparableConvBlock(nn.Module):
    """Depthwise 3×3 conv (no bias) → pointwise 1×1 conv (with bias) → [BN] → [swish]."""

    def __init__(self, in_channels: int, out_channels: int | None = None, norm: bool = True,
                 activation: bool = False) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.depthwise_conv = Conv2dStaticSamePadding(in_channels, in_channels, 3, groups=in_channels, bias=False)
        self.pointwise_conv = Conv2dStaticSamePadding(in_channels, out_channels, 1)
        self.norm = norm
        if norm:
            self.bn = batch_norm(out_channels)
        self.activation = activation
        if activation:
            self.swish = Swish()

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[B, C_in, H, W] -> Tensor[B, C_out, H, W]."""
        x = self.pointwise_conv(self.depthwise_conv(x))
        if self.norm:
            x = self.bn(x)
        if self.activation:
            x = self.swish(x)
        return x

    @torch.no_grad()
    def fold_batchnorm_(self) -> None:
        """Fold the BN (eval mode) into the pointwise conv, in place (no-op without BN)."""
        if self.norm:
            self.pointwise_conv.fold_bn_(self.bn)
            self.bn = nn.Identity()


def _down_channel(in_channels: int, out_channels: int) -> nn.Sequential:
    """1×1 conv + BN that brings a backbone feature to the BiFPN width (the BN is part of the official graph)."""
    return nn.Sequential(Conv2dStaticSamePadding(in_channels, out_channels, 1), batch_norm(out_channels))


class BiFPN(nn.Module):
    """One bidirectional feature pyramid cell over levels ``min_level … max_level``.

    Top-down nodes ``conv{L}_up`` (L = max−1 … min) fuse the level's input with the upsampled node
    above; bottom-up nodes ``conv{L}_down`` (L = min+1 … max) fuse the level's input, its top-down
    node (where there is one) and the max-pooled output below. Each fusion is followed by swish and a
    SeparableConvBlock (DEVELOPING.md, trap 8). With ``weighted=True`` the inputs are combined by fast
    normalised fusion ``Σ relu(w_i) x_i / (Σ relu(w_j) + 1e-4)`` (DEVELOPING.md, trap 10), otherwise summed.

    The first cell (``first_time=True``) takes the backbone's (P3, P4, P5): it down-channels them,
    builds P6 from P5 (1×1 conv + BN + pool) and the levels above by pooling, and down-channels P4
    and P5 a second time, with separate weights, for the bottom-up nodes (DEVELOPING.md, trap 9).
    """

    def __init__(self, num_channels: int, conv_channels: Sequence[int] = (), first_time: bool = False,
                 weighted: bool = True, min_level: int = 3, max_level: int = 7,
                 pool_pad_value: float = 0.0) -> None:
        super().__init__()
        if weighted and (min_level, max_level) != (3, 7):
            raise ValueError(f"weighted fusion is defined for P3–P7, got P{min_level}–P{max_level}")
        self.min_level, self.max_level = min_level, max_level
        self.first_time = first_time
        self.weighted = weighted
        self.top_down_levels = tuple(range(max_level - 1, min_level - 1, -1))
        self.bottom_up_levels = tuple(range(min_level + 1, max_level + 1))

        # Fusion weights first (they lead the published state_dict): top-down then bottom-up. The
        # layout holds the P3–P7 weights in every model, also those that sum (D6–D7x).
        for level in range(6, 2, -1):
            self.register_parameter(f"p{level}_w1", nn.Parameter(torch.ones(2)))
        for level in range(4, 8):
            self.register_parameter(f"p{level}_w2", nn.Parameter(torch.ones(3 if level < 7 else 2)))

        # The published layout lists P3–P7 nodes first and D7x's extra P7-up / P8-down nodes last.
        node_names = [f"conv{level}_up" for level in self.top_down_levels if level < 7]
        node_names += [f"conv{level}_down" for level in self.bottom_up_levels if level <= 7]
        node_names += [f"conv{level}_up" for level in self.top_down_levels if level >= 7]
        node_names += [f"conv{level}_down" for level in self.bottom_up_levels if level > 7]
        for name in node_names:
            self.add_module(name, SeparableConvBlock(num_channels))

        self.downsample = MaxPool2dStaticSamePadding(3, 2, pad_value=pool_pad_value)
        self.swish = Swish()

        if first_time:
            if len(conv_channels) != 3:
                raise ValueError(f"the first BiFPN cell needs the channels of (P3, P4, P5), got {conv_channels}")
            c3, c4, c5 = conv_channels
            self.p5_down_channel = _down_channel(c5, num_channels)
            self.p4_down_channel = _down_channel(c4, num_channels)
            self.p3_down_channel = _down_channel(c3, num_channels)
            self.p5_to_p6 = nn.Sequential(Conv2dStaticSamePadding(c5, num_channels, 1), batch_norm(num_channels),
                                          MaxPool2dStaticSamePadding(3, 2, pad_value=pool_pad_value))
            self.p4_down_channel_2 = _down_channel(c4, num_channels)
            self.p5_down_channel_2 = _down_channel(c5, num_channels)

    def _fuse(self, weight_name: str, inputs: List[Tensor]) -> Tensor:
        """Swish of the (weighted) sum of same-shaped inputs."""
        if self.weighted:
            w = F.relu(getattr(self, weight_name))
            w = w / (w.sum() + FUSION_EPS)
            out = w[0] * inputs[0]
            for i in range(1, len(inputs)):
                out = out + w[i] * inputs[i]
        else:
            out = inputs[0]
            for x in inputs[1:]:
                out = out + x
        return self.swish(out)

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """inputs: (P3, P4, P5) backbone features for the first cell, else the previous cell's
        (P3 … P_max), each Tensor[B, C, H / 2**L, W / 2**L] -> (P3 … P_max) Tensor[B, num_channels, ...]."""
        lo = self.min_level
        if self.first_time:
            p3, p4, p5 = inputs
            p6 = self.p5_to_p6(p5)
            ins = [self.p3_down_channel(p3), self.p4_down_channel(p4), self.p5_down_channel(p5), p6]
            for _ in range(7, self.max_level + 1):
                ins.append(self.downsample(ins[-1]))
            # Inputs of the bottom-up nodes: P4 and P5 down-channelled a second time.
            ins_down = [ins[0], self.p4_down_channel_2(p4), self.p5_down_channel_2(p5)] + ins[3:]
        else:
            ins = list(inputs)
            ins_down = ins

        # Top-down path: td[L] for L = max-1 … min; the highest level enters unchanged.
        td = {self.max_level: ins[-1]}
        for level in self.top_down_levels:
            upsampled = F.interpolate(td[level + 1], scale_factor=2.0, mode="nearest")
            td[level] = getattr(self, f"conv{level}_up")(self._fuse(f"p{level}_w1", [ins[level - lo], upsampled]))

        # Bottom-up path.
        outs = [td[lo]]
        for level in self.bottom_up_levels:
            parts = [ins_down[level - lo]]
            if level < self.max_level:
                parts.append(td[level])
            parts.append(self.downsample(outs[-1]))
            outs.append(getattr(self, f"conv{level}_down")(self._fuse(f"p{level}_w2", parts)))
        return tuple(outs)

    @torch.no_grad()
    def fold_batchnorm_(self) -> None:
        """Fold every BatchNorm (eval mode) into the conv before it, in place: the node convs and the
        first cell's down-channel convs (``Sequential(conv, BN[, pool])``)."""
        for module in list(self.modules()):
            if isinstance(module, SeparableConvBlock):
                module.fold_batchnorm_()
            elif isinstance(module, nn.Sequential) and len(module) >= 2 and isinstance(
                    module[0], Conv2dStaticSamePadding) and isinstance(module[1], nn.BatchNorm2d):
                module[0].fold_bn_(module[1])
                module[1] = nn.Identity()


class Head(nn.Module):
    """Shared-weight prediction head over all pyramid levels (DEVELOPING.md, trap 11).

    ``num_layers`` SeparableConvBlocks shared across levels, each followed by a per-level BN and
    swish, then a shared output SeparableConvBlock with ``num_anchors × num_outputs`` channels.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_outputs: int, num_layers: int,
                 num_levels: int = 5) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.num_outputs = num_outputs
        self.conv_list = nn.ModuleList(
            [SeparableConvBlock(in_channels, in_channels, norm=False) for _ in range(num_layers)])
        self.bn_list = nn.ModuleList(
            [nn.ModuleList([batch_norm(in_channels) for _ in range(num_layers)]) for _ in range(num_levels)])
        self.header = SeparableConvBlock(in_channels, num_anchors * num_outputs, norm=False)
        self.swish = Swish()
        self.apply_sigmoid = False  # the classifier's output activation
        self.grad_checkpointing = False  # activation checkpointing per level (EfficientDet.set_grad_checkpointing)

    def forward(self, inputs: Sequence[Tensor], logits: bool = False) -> Tensor:
        """inputs: per-level Tensor[B, C, H_l, W_l] -> Tensor[B, N, num_outputs], N = Σ_l H_l·W_l·num_anchors,
        levels in order, positions row-major, anchors innermost. The output activation (the classifier's
        sigmoid) is applied unless ``logits``."""
        outs = []
        checkpoint = self.grad_checkpointing and needs_checkpoint(self)
        for feat, bns in zip(inputs, self.bn_list):
            feat = checkpointed(self._level, [self.conv_list, bns, self.header], feat, bns) if checkpoint else (
                self._level(feat, bns))
            outs.append(feat.permute(0, 2, 3, 1).reshape(feat.shape[0], -1, self.num_outputs))
        out = torch.cat(outs, dim=1)
        return out.sigmoid() if self.apply_sigmoid and not logits else out

    def _level(self, feat: Tensor, bns: nn.ModuleList) -> Tensor:
        """One level: the shared convs, each with this level's BN and swish, then the output conv."""
        for conv, bn in zip(self.conv_list, bns):
            feat = self.swish(bn(conv(feat)))
        return self.header(feat)

    @torch.no_grad()
    def fold_batchnorm(self) -> "FoldedHead":
        """This head (eval mode) with each level's BNs folded into its own copy of the shared convs."""
        return FoldedHead(self)


class Regressor(Head):
    """Box head: Tensor[B, N, 4] (dy, dx, dh, dw) per anchor."""

    def __init__(self, in_channels: int, num_anchors: int, num_layers: int, num_levels: int = 5) -> None:
        super().__init__(in_channels, num_anchors, 4, num_layers, num_levels)


class Classifier(Head):
    """Class head: Tensor[B, N, num_classes] sigmoid probabilities per anchor."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_layers: int,
                 num_levels: int = 5) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_layers, num_levels)
        self.num_classes = num_classes
        self.apply_sigmoid = True


# ---------------------------------------------------------------------------------------------------------
# Inference forms of the heads (for inference only: not trainable, not a checkpoint layout)
# ---------------------------------------------------------------------------------------------------------

class FoldedHead(nn.Module):
    """A :class:`Head` with each level's BN folded into its own copy of the shared pointwise convs.

    Same outputs as the original head; ``sigmoid`` is applied for the classifier.
    """

    def __init__(self, head: Head) -> None:
        super().__init__()
        self.num_outputs = head.num_outputs
        self.num_anchors = head.num_anchors
        self.apply_sigmoid = head.apply_sigmoid
        levels = []
        for bns in head.bn_list:
            convs = []
            for conv, bn in zip(head.conv_list, bns):
                block = copy.deepcopy(conv)
                block.pointwise_conv.fold_bn_(bn)
                convs.append(block)
            levels.append(nn.ModuleList(convs))
        self.levels = nn.ModuleList(levels)
        self.header = copy.deepcopy(head.header)
        self.swish = copy.deepcopy(head.swish)

    def forward(self, inputs: Sequence[Tensor], logits: bool = False) -> Tensor:
        """See :meth:`Head.forward`."""
        outs = []
        for feat, convs in zip(inputs, self.levels):
            for conv in convs:
                feat = self.swish(conv(feat))
            feat = self.header(feat)
            outs.append(feat.permute(0, 2, 3, 1).reshape(feat.shape[0], -1, self.num_outputs))
        out = torch.cat(outs, dim=1)
        return out.sigmoid() if self.apply_sigmoid and not logits else out


@torch.no_grad()
def _side_by_side(convs: Sequence[Conv2dStaticSamePadding]) -> Conv2dStaticSamePadding:
    """One convolution doing the work of ``convs`` (same kernel and stride, equal channels per group) on their
    inputs concatenated along channels: outputs concatenated, groups added up."""
    first = convs[0].conv
    merged = Conv2dStaticSamePadding(sum(c.conv.in_channels for c in convs), sum(c.conv.out_channels for c in convs),
                                     first.kernel_size, stride=first.stride, groups=sum(c.conv.groups for c in convs))
    merged = merged.to(device=first.weight.device, dtype=first.weight.dtype)
    merged.conv.weight.copy_(torch.cat([c.conv.weight for c in convs]))
    merged.conv.bias.copy_(torch.cat([c.conv.bias if c.conv.bias is not None else c.conv.weight.new_zeros(
        c.conv.out_channels) for c in convs]))
    return merged


class InferenceHeads(nn.Module):
    """The inference form of the two heads: the regressor and the classifier (each a :class:`FoldedHead`) run
    as one network.

    - Side by side: both heads' convs at each level and layer are one conv on 2·C channels (depthwise: 2·C
      groups; pointwise: 2 groups, each head's folded weights in its own group), swish fused. That halves the
      number of convolution calls, which costs ~20 µs each on CPU whatever the size (the P5–P7 maps are tiny).
    - The output pointwise conv of each head runs once over all levels: the levels' depthwise outputs are laid
      end to end as one channels-last Tensor[B, C, Σ H_l·W_l, 1], whose conv output already has the
      [B, N, num_outputs] layout (no concatenation of the 810-channel class maps). The classifier's sigmoid is
      that conv's fused activation.
    """

    def __init__(self, regressor: FoldedHead, classifier: FoldedHead) -> None:
        super().__init__()
        self.num_outputs = (regressor.num_outputs, classifier.num_outputs)
        self.levels = nn.ModuleList()
        for reg_blocks, cls_blocks in zip(regressor.levels, classifier.levels):
            layers = nn.ModuleList()
            for reg, cls in zip(reg_blocks, cls_blocks):
                layers.append(nn.Sequential(
                    _side_by_side([reg.depthwise_conv, cls.depthwise_conv]).fuse(),
                    _side_by_side([reg.pointwise_conv, cls.pointwise_conv]).fuse("swish")))
            self.levels.append(layers)
        self.header_depthwise = _side_by_side([regressor.header.depthwise_conv, classifier.header.depthwise_conv]).fuse(
            max_packed=TRACE_CACHE_SIZE * len(self.levels))  # one input shape per level
        self.regression_output = regressor.header.pointwise_conv.fuse()
        self.class_output = classifier.header.pointwise_conv.fuse("sigmoid")

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """inputs: per-level Tensor[B, C, H_l, W_l] -> (regression Tensor[B, N, 4] (dy, dx, dh, dw),
        classification Tensor[B, N, num_classes] sigmoid probabilities)."""
        batch, channels = inputs[0].shape[:2]
        positions = []
        for feat, layers in zip(inputs, self.levels):
            feat = torch.cat([feat, feat], dim=1)  # the regressor's input, the classifier's input
            for layer in layers:
                feat = layer(feat)
            positions.append(self.header_depthwise(feat).permute(0, 2, 3, 1).reshape(batch, -1, 2 * channels))
        stacked = torch.cat(positions, dim=1)  # Tensor[B, Σ H_l·W_l, 2·C]
        outputs = []
        for conv, part, num_outputs in ((self.regression_output, stacked[:, :, :channels], self.num_outputs[0]),
                                        (self.class_output, stacked[:, :, channels:], self.num_outputs[1])):
            # Channels-last Tensor[B, C, L, 1] in, Tensor[B, A·K, L, 1] out.
            out = conv(part.contiguous()[:, :, None, :].permute(0, 3, 1, 2))
            outputs.append(out.permute(0, 2, 3, 1).reshape(batch, -1, num_outputs))
        return outputs[0], outputs[1]
