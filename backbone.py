"""The assembled detector: EfficientNet → BiFPN cells → Regressor and Classifier, plus Anchors."""
from __future__ import annotations

import copy
import math
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from efficientdet.anchors import DEFAULT_RATIOS, DEFAULT_SCALES, Anchors
from efficientdet.config import ModelConfig, get_model_config
from efficientdet.model import BiFPN, Classifier, InferenceHeads, Regressor
from efficientnet.checkpointing import checkpointed, needs_checkpoint
from efficientnet.model import EfficientNetBackbone
from efficientnet.utils import Conv2dStaticSamePadding, MaxPool2dStaticSamePadding, Swish

CLASS_PRIOR = 0.01  # official initial foreground probability of the class head

# Padding value of the BiFPN's stride-2 max-pools: zeros in the published PyTorch checkpoints,
# -inf (TensorFlow semantics) in the official ones.
POOL_PADDING = {"published": 0.0, "official": float("-inf")}


def check_input_size(config: ModelConfig, height: int, width: int) -> None:
    """ValueError unless both sides are positive multiples of ``config``'s largest stride."""
    stride = config.max_stride
    if height <= 0 or width <= 0 or height % stride or width % stride:
        examples = ", ".join(str(stride * k) for k in range(2, 6))
        raise ValueError(
            f"input size {height}x{width} (HxW) does not work for {config.name}: height and width must be "
            f"multiples of {stride} (the stride of P{config.max_level}), e.g. {examples}; "
            f"the default is {config.input_size}")


def check_images(images: Tensor, config: ModelConfig) -> None:
    """ValueError unless ``images`` is a Tensor[B, 3, H, W] whose size the model ``config`` can take."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images Tensor[B, 3, H, W], got shape {tuple(images.shape)}")
    check_input_size(config, int(images.shape[2]), int(images.shape[3]))


class EfficientDet(nn.Module):
    """EfficientDet D0–D7x (``compound_coef`` 0…8, 8 = D7x): the whole detector. Published name:
    ``EfficientDetBackbone`` (an alias of this class).

    Args:
        num_classes: number of object classes (90 for the COCO checkpoints).
        compound_coef: row of :data:`efficientdet.config.MODEL_CONFIGS`.
        ratios: anchor (width, height) stretch pairs, from the project YAML.
        scales: anchor scales, from the project YAML.
        pool_padding: "published" (zero padding, for the published PyTorch checkpoints; default) or
            "official" (TensorFlow max-pool padding, for converted official checkpoints).

    ``forward(images, logits=False)`` with images Tensor[B, 3, H, W] (normalised RGB, H and W multiples of
    ``config.max_stride``) returns ``(features, regression, classification, anchors)``; the one forward of
    training (``logits=True``, for the loss), evaluation, inference and export:

    - features: tuple of BiFPN outputs P3 … P7 (P8 for D7x), Tensor[B, fpn_channels, H / 2**L, W / 2**L];
    - regression: Tensor[B, N, 4] (dy, dx, dh, dw);
    - classification: Tensor[B, N, num_classes], sigmoid probabilities (pre-sigmoid logits with ``logits``);
    - anchors: Tensor[1, N, 4] (y1, x1, y2, x2), input pixels.
    """

    def __init__(self, num_classes: int = 80, compound_coef: int = 0,
                 ratios: Sequence[Tuple[float, float]] = DEFAULT_RATIOS,
                 scales: Sequence[float] = DEFAULT_SCALES, pool_padding: str = "published") -> None:
        super().__init__()
        if pool_padding not in POOL_PADDING:
            raise ValueError(f"pool_padding must be one of {sorted(POOL_PADDING)}, got {pool_padding!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.config: ModelConfig = get_model_config(compound_coef)
        self.compound_coef = compound_coef
        self.num_classes = num_classes
        self.pool_padding = pool_padding
        cfg = self.config
        num_levels = len(cfg.pyramid_levels)
        num_anchors = len(ratios) * len(scales)

        backbone = EfficientNetBackbone(cfg.backbone)
        self.bifpn = nn.Sequential(*[
            BiFPN(cfg.fpn_channels, backbone.out_channels, first_time=(i == 0), weighted=cfg.weighted_fusion,
                  min_level=cfg.min_level, max_level=cfg.max_level, pool_pad_value=POOL_PADDING[pool_padding])
            for i in range(cfg.fpn_cells)])
        self.regressor = Regressor(cfg.fpn_channels, num_anchors, cfg.head_repeats, num_levels)
        self.classifier = Classifier(cfg.fpn_channels, num_anchors, num_classes, cfg.head_repeats, num_levels)
        self.anchors = Anchors(cfg.anchor_scale, cfg.pyramid_levels, scales=scales, ratios=ratios)
        self.backbone_net = backbone
        self.grad_checkpointing = False  # see set_grad_checkpointing
        self.reset_head_biases()

    @torch.no_grad()
    def reset_head_biases(self, prior: float = CLASS_PRIOR) -> None:
        """Initialise the output biases as the official model does: the class output at
        ``-log((1 - prior) / prior)`` (every anchor starts as background with probability
        ``1 - prior``, which keeps the focal loss of a fresh head small), the box output at 0."""
        self.classifier.header.pointwise_conv.conv.bias.fill_(-math.log((1.0 - prior) / prior))
        self.regressor.header.pointwise_conv.conv.bias.zero_()

    def check_input_size(self, height: int, width: int) -> None:
        """ValueError unless both sides are positive multiples of the largest stride."""
        check_input_size(self.config, height, width)

    def forward(self, inputs: Tensor, logits: bool = False) -> Tuple[Tuple[Tensor, ...], Tensor, Tensor, Tensor]:
        check_images(inputs, self.config)
        features = self.backbone_net(inputs)
        for cell in self.bifpn:
            if self.grad_checkpointing and needs_checkpoint(cell):
                features = checkpointed(lambda *xs, cell=cell: cell(xs), cell, *features)
            else:
                features = cell(features)
        regression = self.regressor(features)
        classification = self.classifier(features, logits=logits)
        anchors = self.anchors(inputs)
        return features, regression, classification, anchors

    def set_grad_checkpointing(self, enable: bool = True) -> "EfficientDet":
        """Activation checkpointing in training (timm's name): the backbone's stages (the stem with the first),
        each BiFPN cell and each head's levels keep only their inputs in the forward and run again in the
        backward (:func:`efficientnet.checkpointing.checkpointed`): less memory for about one more forward's
        compute, same gradients. Parts without trainable parameters (``--head_only``) are not checkpointed."""
        self.grad_checkpointing = bool(enable)
        self.backbone_net.model.grad_checkpointing = bool(enable)
        self.regressor.grad_checkpointing = self.classifier.grad_checkpointing = bool(enable)
        return self

    @torch.no_grad()
    def fold_batchnorm(self) -> "EfficientDet":
        """A copy (eval mode) with every BatchNorm folded into the convolution before it: backbone convs,
        BiFPN node and down-channel convs, and the heads' per-level BNs (each level gets its own folded copy
        of the shared convs, :class:`efficientdet.model.FoldedHead`). Same outputs; for inference only."""
        model = copy.deepcopy(self).eval()
        model.backbone_net.model.fold_batchnorm_()
        for cell in model.bifpn:
            cell.fold_batchnorm_()
        model.regressor = model.regressor.fold_batchnorm()
        model.classifier = model.classifier.fold_batchnorm()
        remaining = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        if remaining:
            raise RuntimeError(f"BatchNorm left unfolded: {remaining[:3]}")
        return model

    @torch.no_grad()
    def fuse(self) -> "FusedEfficientDet":
        """This detector specialised for inference (a copy; the ``fused`` mode of :mod:`utils.inference.modes`):
        BatchNorm folded (:meth:`fold_batchnorm`), then each module in its inference form (``fuse()`` of
        the same-padding convs and pools, swish, the MBConv blocks and the two heads side by side). Same
        outputs up to float round-off; not trainable, not a checkpoint."""
        model = self.fold_batchnorm()
        model.backbone_net.model.fuse_()
        fused = FusedEfficientDet(model, InferenceHeads(model.regressor, model.classifier))
        for module in fused.modules():
            for name, child in list(module.named_children()):
                if isinstance(child, (Swish, Conv2dStaticSamePadding, MaxPool2dStaticSamePadding)):
                    setattr(module, name, child.fuse())
        return fused


class FusedEfficientDet(nn.Module):
    """The inference form of an :class:`EfficientDet` (:meth:`EfficientDet.fuse`): the same
    ``forward`` contract, ``(features, regression, classification, anchors)``; not trainable, not a checkpoint."""

    def __init__(self, model: EfficientDet, heads: InferenceHeads) -> None:
        super().__init__()
        self.config = model.config
        self.compound_coef = model.compound_coef
        self.num_classes = model.num_classes
        self.backbone_net = model.backbone_net
        self.bifpn = model.bifpn
        self.heads = heads
        self.anchors = model.anchors

    def check_input_size(self, height: int, width: int) -> None:
        """See :meth:`EfficientDet.check_input_size`."""
        check_input_size(self.config, height, width)

    def forward(self, inputs: Tensor, logits: bool = False) -> Tuple[Tuple[Tensor, ...], Tensor, Tensor, Tensor]:
        if logits:
            raise ValueError("the fused detector's classifier ends in a fused sigmoid: train or compute the "
                             "loss with the EfficientDet it was made from")
        check_images(inputs, self.config)
        features = self.bifpn(self.backbone_net(inputs))
        regression, classification = self.heads(features)
        return features, regression, classification, self.anchors(inputs)


def build_model(compound_coef: int, project) -> EfficientDet:
    """The detector for a project (a :class:`utils.config.project.ProjectConfig`): its class count, anchor
    scales and ratios, and its ``pool_padding`` key ("published" unless the YAML says "official")."""
    return EfficientDet(num_classes=project.num_classes, compound_coef=compound_coef,
                        ratios=project.anchors_ratios, scales=project.anchors_scales,
                        pool_padding=getattr(project, "pool_padding", "published"))


#: The published name (``from backbone import EfficientDetBackbone``): the same class, the whole detector
#: (backbone, BiFPN, heads, anchors), whose ``backbone_net`` is the EfficientNet backbone.
EfficientDetBackbone = EfficientDet
