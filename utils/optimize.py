"""Inference-only transformations of a detector: BatchNorm folding, channels-last, frozen graphs,
reduced precision, combined into the inference *modes* of :class:`InferenceModel`.

Every transformation keeps the network's function (up to float round-off; bf16/fp16 up to their
precision) and returns the same outputs as :class:`backbone.EfficientDetBackbone`. They are for
inference only: folded models cannot be trained or saved as published checkpoints.

A mode is a ``+``-joined set of components (order does not matter)::

    eager           plain float32 model (the reference; no component)
    fused           the network specialised for inference (:func:`specialize_for_inference`): every
                    BatchNorm folded into the conv before it (:func:`fold_batchnorm`), stride-2 convs and
                    max-pools without padding copies, swish and the class sigmoid fused into the convs
                    (oneDNN on CPU, weights prepacked per input shape) or in place, squeeze-excitation as
                    Linear layers, both heads run side by side
    channels_last   weights and activations in NHWC memory format (oneDNN's preferred layout on CPU)
    trace           torch.jit.trace + torch.jit.freeze per input shape (B, H, W); the frozen graph
                    returns (regression, classification), anchors come from the model's cached Anchors
    bf16            weights and activations in bfloat16 (CPU with AVX512-BF16/AMX, or CUDA)
    fp16            weights and activations in float16 (CUDA only)

e.g. ``fused+channels_last+trace``. Aliases: ``eager`` (no component) and ``fastest``
(:data:`FASTEST`: the fastest float32 combination measured, same detections as ``eager``; see
``benchmark/README.md``). ``torch.compile`` is not offered: on the 2-core reference CPU it took 19–76 s
to compile D0 (inductor, freezing) and then ran slower than the frozen trace of the fused network (34.5
against 27.5 ms).
"""
from __future__ import annotations

import copy
import functools
import logging
import warnings
from collections import OrderedDict
from typing import Dict, FrozenSet, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbone import check_images, check_input_size
from efficientdet.model import Head, SeparableConvBlock
from efficientnet.utils import Conv2dStaticSamePadding, MaxPool2dStaticSamePadding, Swish, same_padding

logger = logging.getLogger(__name__)

# Components in canonical order (mode names are written in this order).
MODE_COMPONENTS: Tuple[str, ...] = ("fused", "channels_last", "trace", "bf16", "fp16")
# The fastest float32 mode (identical detections to eager): D0 512x512 batch 1 on 2 CPU threads,
# see benchmark/README.md.
FASTEST = "fused+channels_last+trace"
MODE_ALIASES: Dict[str, str] = {"eager": "", "fastest": FASTEST}
# The modes worth listing (CLI help, benchmark default); any combination of components is valid.
MODES: Tuple[str, ...] = ("eager", "fused", "channels_last", "trace", "fused+channels_last",
                          "fused+trace", "fused+channels_last+trace", "fused+channels_last+trace+bf16",
                          "fused+channels_last+trace+fp16", "fastest")
# Input shapes whose frozen graphs an InferenceModel keeps (oldest dropped first); also the input shapes
# whose oneDNN-packed weights an InferenceConv2d keeps by default.
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


# ---------------------------------------------------------------------------------------------------------
# Inference-only layers (the "fused" mode): BN folded, no padding copies, activations fused or in place
# ---------------------------------------------------------------------------------------------------------
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

        Unpacked, oneDNN reorders the weight on every call (~10 µs per conv here, over 180 convs in D0). The
        layout oneDNN picks depends on the input's shape and dtype, and a weight packed for another shape
        gives the same values but can be 15x slower (D0's 1152->192 1x1 conv at 16x16 packed for 4x4 inputs):
        hence one packing per shape.
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


def _linear_from_conv(wrapper: Conv2dStaticSamePadding) -> nn.Linear:
    """The 1×1 convolution of a squeeze-excitation (applied to a 1×1 map) as a Linear layer."""
    conv = wrapper.conv
    linear = nn.Linear(conv.in_channels, conv.out_channels).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.flatten(1))
        linear.bias.copy_(conv.bias)
    return linear


def _spatial_mean(x: Tensor) -> Tensor:
    """x: Tensor[B, C, H, W] -> Tensor[B, C], the mean over H, W (squeeze-excitation's squeeze).

    bfloat16 / float16: ``avg_pool2d`` over the whole map (accumulated in float32), on CPU 3.6× faster than
    ``mean``, which copies the whole activation to float32 first (D0's 16 blocks: 0.8 ms against 2.9 ms; a
    ones-vector matmul took 1.9 ms). float32 keeps ``mean``, the faster there.
    """
    if x.dtype == torch.float32:
        return x.mean(dim=(2, 3))
    return F.avg_pool2d(x, (int(x.shape[2]), int(x.shape[3]))).flatten(1)


class InferenceMBConvBlock(nn.Module):
    """An MBConvBlock with BN folded (see :func:`fold_batchnorm`) for inference: swish fused into the expand and
    depthwise convs, squeeze-excitation as Linear layers scaling in place, the residual added in place."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.expand = InferenceConv2d(block._expand_conv, "swish") if block.has_expansion else None
        self.depthwise = InferenceConv2d(block._depthwise_conv, "swish")
        self.se_reduce = _linear_from_conv(block._se_reduce)
        self.se_expand = _linear_from_conv(block._se_expand)
        self.project = InferenceConv2d(block._project_conv)
        self.has_residual = block.has_residual

    def forward(self, inputs: Tensor, drop_connect_rate: float = 0.0) -> Tensor:
        """inputs: Tensor[B, C_in, H, W] -> Tensor[B, C_out, H / stride, W / stride]."""
        x = self.expand(inputs) if self.expand is not None else inputs
        x = self.depthwise(x)
        scale = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(_spatial_mean(x)), inplace=True)))
        x = self.project(x.mul_(scale[:, :, None, None]))
        return x.add_(inputs) if self.has_residual else x


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
    """The regressor and the classifier (each a :class:`FoldedHead`) run as one network, for inference.

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
                    InferenceConv2d(_side_by_side([reg.depthwise_conv, cls.depthwise_conv])),
                    InferenceConv2d(_side_by_side([reg.pointwise_conv, cls.pointwise_conv]), "swish")))
            self.levels.append(layers)
        self.header_depthwise = InferenceConv2d(
            _side_by_side([regressor.header.depthwise_conv, classifier.header.depthwise_conv]),
            max_packed=TRACE_CACHE_SIZE * len(self.levels))  # one input shape per level
        self.regression_output = InferenceConv2d(regressor.header.pointwise_conv)
        self.class_output = InferenceConv2d(classifier.header.pointwise_conv, "sigmoid")

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


class InferenceEfficientDet(nn.Module):
    """An :class:`EfficientDetBackbone` specialised for inference (see :func:`specialize_for_inference`): same
    ``forward`` contract, ``(features, regression, classification, anchors)``; not trainable, not a checkpoint."""

    def __init__(self, model: nn.Module, heads: InferenceHeads) -> None:
        super().__init__()
        self.config = model.config
        self.compound_coef = model.compound_coef
        self.num_classes = model.num_classes
        self.backbone_net = model.backbone_net
        self.bifpn = model.bifpn
        self.heads = heads
        self.anchors = model.anchors

    def check_input_size(self, height: int, width: int) -> None:
        """See :meth:`backbone.EfficientDetBackbone.check_input_size`."""
        check_input_size(self.config, height, width)

    def forward(self, inputs: Tensor) -> Tuple[Tuple[Tensor, ...], Tensor, Tensor, Tensor]:
        check_images(inputs, self.config)
        features = self.bifpn(self.backbone_net(inputs))
        regression, classification = self.heads(features)
        return features, regression, classification, self.anchors(inputs)


@torch.no_grad()
def specialize_for_inference(model: nn.Module) -> InferenceEfficientDet:
    """A copy of an :class:`EfficientDetBackbone` for inference only (the ``fused`` mode): BatchNorm folded
    (:func:`fold_batchnorm`); every convolution an :class:`InferenceConv2d` (stride 2 without padding copies;
    swish and the class sigmoid fused by oneDNN on CPU; weights prepacked for oneDNN); squeeze-excitation as
    Linear layers; in-place activations and residual adds; both heads run side by side
    (:class:`InferenceHeads`). Same outputs as the model up to float round-off."""
    model = fold_batchnorm(model)
    net = model.backbone_net.model
    net._conv_stem = InferenceConv2d(net._conv_stem, "swish")
    net._swish = nn.Identity()  # inside _conv_stem now
    net._blocks = nn.ModuleList([InferenceMBConvBlock(block) for block in net._blocks])
    model = InferenceEfficientDet(model, InferenceHeads(model.regressor, model.classifier))
    for module in model.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, Swish):
                setattr(module, name, InplaceSwish())
            elif isinstance(child, Conv2dStaticSamePadding):
                setattr(module, name, InferenceConv2d(child))
            elif isinstance(child, MaxPool2dStaticSamePadding):
                setattr(module, name, InferenceMaxPool2d(child))
    return model


def parse_mode(mode: str) -> FrozenSet[str]:
    """The components of a mode string such as ``"fused+channels_last+trace"``, ``"eager"`` or ``"fastest"``.

    Raises ValueError naming the mode for an unknown component, or for ``bf16`` with ``fp16``.
    """
    if not isinstance(mode, str) or not mode.strip():
        raise ValueError(f"mode must be a non-empty string such as 'eager' or 'fused+trace', got {mode!r}")
    components = set()
    for part in mode.strip().lower().split("+"):
        part = part.strip()
        if part in MODE_ALIASES:
            components.update(p for p in MODE_ALIASES[part].split("+") if p)
        elif part in MODE_COMPONENTS:
            components.add(part)
        else:
            raise ValueError(f"unknown mode component {part!r} in mode {mode!r}: use 'eager', 'fastest' or a "
                             f"'+'-joined set of {', '.join(MODE_COMPONENTS)}")
    if "bf16" in components and "fp16" in components:
        raise ValueError(f"mode {mode!r} asks for both bf16 and fp16: pick one")
    return frozenset(components)


def mode_name(components: Union[str, FrozenSet[str], Sequence[str]]) -> str:
    """Canonical name of a mode (components in :data:`MODE_COMPONENTS` order; ``"eager"`` when empty)."""
    parts = parse_mode(components) if isinstance(components, str) else frozenset(components)
    unknown = parts.difference(MODE_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown mode components {sorted(unknown)}")
    return "+".join(c for c in MODE_COMPONENTS if c in parts) or "eager"


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 convolutions have native support here (CUDA with bf16, or a CPU with oneDNN bf16:
    AVX512-BF16 / AMX). Elsewhere bf16 still runs, through slow emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and checker is not None and checker())


class _OutputsOnly(nn.Module):
    """The detector without features and anchors, for tracing: images -> (regression, classification)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor) -> Tuple[Tensor, Tensor]:
        _, regression, classification, _ = self.model(inputs)
        return regression, classification


class InferenceModel:
    """An :class:`EfficientDetBackbone` prepared for one inference mode; ``__call__(images)`` runs it.

    Args:
        model: the detector (eval mode is set). It is moved to ``device`` and, for the modes without
            ``fused``, converted in place (dtype, memory format) as the Detector always did; ``fused``
            folds a copy (in float32, before any precision change) and leaves ``model`` unconverted.
        mode: see the module doc, e.g. ``"eager"``, ``"fused+channels_last+trace"``, ``"fastest"``.
        device: where the network runs (``torch.device``); default: where ``model`` is.

    ``fp16`` on a non-CUDA device is a ValueError. ``bf16`` is allowed everywhere; where
    :func:`bf16_supported` is False it is emulated (slow) and a warning is logged.

    Attributes:
        network: the module that runs (the folded copy under ``fused``, else ``model`` itself).
        components: the mode's components; ``name``: its canonical name.
        dtype: the network's dtype (float32, bfloat16 or float16).
    """

    def __init__(self, model: nn.Module, mode: str = "eager", device: Optional[torch.device] = None) -> None:
        self.components = parse_mode(mode)
        self.name = mode_name(self.components)
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        if "fp16" in self.components and self.device.type != "cuda":
            raise ValueError(f"mode {mode!r}: fp16 inference needs a CUDA device, got {self.device}")
        if "bf16" in self.components and not bf16_supported(self.device):
            logger.warning("mode %r: no native bfloat16 support on %s, bf16 is emulated (slow)", mode, self.device)
        self.dtype = (torch.bfloat16 if "bf16" in self.components
                      else torch.float16 if "fp16" in self.components else torch.float32)
        self.memory_format = torch.channels_last if "channels_last" in self.components else torch.contiguous_format
        model.eval()
        self.anchors = model.anchors
        if "fused" in self.components:
            network = specialize_for_inference(model.to(device=self.device, dtype=torch.float32))
        else:
            network = model
        self.network = network.to(device=self.device, dtype=self.dtype, memory_format=self.memory_format).eval()
        self._traced: "OrderedDict[Tuple[int, ...], torch.jit.ScriptModule]" = OrderedDict()

    def prepare_inputs(self, images: Tensor) -> Tensor:
        """images: Tensor[B, 3, H, W] (any device / float dtype) -> on the network's device, dtype and layout."""
        images = images.to(device=self.device, non_blocking=True)
        # Layout first, then dtype: on CPU the single copy that does both is 2x slower (bf16 1x3x512x512:
        # 0.42 ms against 0.18 ms).
        return images.contiguous(memory_format=self.memory_format).to(self.dtype)

    def traced(self, inputs: Tensor) -> torch.jit.ScriptModule:
        """The frozen graph for ``inputs``'s shape (traced on first use; :data:`TRACE_CACHE_SIZE` kept)."""
        key = tuple(int(v) for v in inputs.shape)
        graph = self._traced.get(key)
        if graph is None:
            logger.info("tracing %s for input shape %s", self.name, key)
            with torch.no_grad():
                # One eager run first: it creates the lazily packed conv weights (InferenceConv2d), which the
                # tracer then records as buffers; created during tracing they would be untraceable constants.
                self.network(inputs)
            with torch.no_grad(), warnings.catch_warnings():
                # Python ints (input checks, padding amounts) become constants of this shape's graph.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # torch.jit is deprecated in favour of torch.compile, which is far slower to build here
                # (see the module doc); the frozen trace is the measured faster option.
                warnings.simplefilter("ignore", DeprecationWarning)
                graph = torch.jit.freeze(torch.jit.trace(_OutputsOnly(self.network).eval(), inputs,
                                                         check_trace=False))
                # TorchScript's profiling executor specialises and optimises the graph over its first runs.
                for _ in range(2):
                    graph(inputs)
            self._traced[key] = graph
            while len(self._traced) > TRACE_CACHE_SIZE:
                self._traced.popitem(last=False)
        else:
            self._traced.move_to_end(key)
        return graph

    def __call__(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """images: Tensor[B, 3, H, W] normalised RGB -> ``(regression Tensor[B, N, 4] (dy, dx, dh, dw),
        classification Tensor[B, N, C] sigmoid probabilities, anchors Tensor[1, N, 4] (y1, x1, y2, x2)
        input pixels float32)``; regression and classification in :attr:`dtype`."""
        check_images(images, self.network.config)  # the frozen graphs check nothing
        inputs = self.prepare_inputs(images)
        if "trace" in self.components:
            regression, classification = self.traced(inputs)(inputs)
        else:
            _, regression, classification, _ = self.network(inputs)
        reference = inputs.new_empty((0, 3, inputs.shape[2], inputs.shape[3]), dtype=torch.float32)
        return regression, classification, self.anchors(reference)


class ExportModule(nn.Module):
    """The detector as an ONNX-exportable graph: images -> (regression, classification), or with
    ``with_decode`` -> (boxes, scores) through :class:`efficientdet.anchors.BBoxTransform` and
    :class:`efficientdet.anchors.ClipBoxes` against the anchors of ``input_hw`` (a constant of the graph).

    Outputs: regression Tensor[B, N, 4] (dy, dx, dh, dw), classification Tensor[B, N, C] sigmoid
    probabilities; or boxes Tensor[B, N, 4] (x1, y1, x2, y2) input pixels clipped to the input, and
    scores Tensor[B, N, C] (the classification).
    """

    def __init__(self, model: nn.Module, input_hw: Tuple[int, int], with_decode: bool = False) -> None:
        super().__init__()
        from efficientdet.anchors import BBoxTransform, ClipBoxes

        self.model = model
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.with_decode = with_decode
        self.regress = BBoxTransform()
        self.clip = ClipBoxes()
        reference = torch.empty((0, 3) + self.input_hw, dtype=torch.float32,
                                device=next(model.parameters()).device)
        self.register_buffer("anchors", model.anchors(reference).clone(), persistent=False)

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        _, regression, classification, _ = self.model(images)
        if not self.with_decode:
            return regression, classification
        reference = images.new_empty((0, 0) + self.input_hw)
        return self.clip(self.regress(self.anchors, regression), reference), classification


@torch.no_grad()
def export_onnx(model: nn.Module, path: str, input_hw: Tuple[int, int], batch_size: int = 1,
                dynamic_batch: bool = False, with_decode: bool = False, opset: int = 17,
                fuse: bool = True) -> Tuple[str, str]:
    """Export an :class:`EfficientDetBackbone` (eval mode, float32, on its device) to ONNX at ``path``.

    The graph takes ``images`` float32[B, 3, H, W] (B symbolic with ``dynamic_batch``) and returns
    ``(regression, classification)`` or, with ``with_decode``, ``(boxes, scores)`` (see
    :class:`ExportModule`). ``fuse`` folds BatchNorm first (the same function, fewer nodes).
    Returns the output names.
    """
    height, width = int(input_hw[0]), int(input_hw[1])
    model.check_input_size(height, width)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    network = fold_batchnorm(model) if fuse else copy.deepcopy(model).eval()
    module = ExportModule(network, (height, width), with_decode=with_decode).eval()
    device = next(network.parameters()).device
    example = torch.zeros((batch_size, 3, height, width), dtype=torch.float32, device=device)
    outputs = ("boxes", "scores") if with_decode else ("regression", "classification")
    dynamic_axes = {name: {0: "batch"} for name in ("images",) + outputs} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=list(outputs),
                          dynamic_axes=dynamic_axes, opset_version=int(opset), dynamo=False)
    logger.info("exported %s (%dx%d, opset %d) to %s", type(model).__name__, height, width, opset, path)
    return outputs
