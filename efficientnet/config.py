"""EfficientNet B0–B7: the published block table and the compound scaling rules."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class BlockArgs:
    """One stage of MBConv blocks (B0 numbers; scaled by :func:`scaled_blocks`)."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int
    se_ratio: float = 0.25


# Stages of EfficientNet-B0: (repeats, kernel, stride, expand, in, out), SE ratio 0.25.
B0_STAGES: Tuple[BlockArgs, ...] = (
    BlockArgs(1, 3, 1, 1, 32, 16),
    BlockArgs(2, 3, 2, 6, 16, 24),
    BlockArgs(2, 5, 2, 6, 24, 40),
    BlockArgs(3, 3, 2, 6, 40, 80),
    BlockArgs(3, 5, 1, 6, 80, 112),
    BlockArgs(4, 5, 2, 6, 112, 192),
    BlockArgs(1, 3, 1, 6, 192, 320),
)

STEM_CHANNELS = 32
DROP_CONNECT_RATE = 0.2
DEPTH_DIVISOR = 8


@dataclass(frozen=True)
class EfficientNetScaling:
    """Width and depth multipliers of one EfficientNet variant."""

    width: float
    depth: float


# B0 … B7 (width, depth) coefficients of the EfficientNet paper.
EFFICIENTNET_SCALING: Tuple[EfficientNetScaling, ...] = (
    EfficientNetScaling(1.0, 1.0),
    EfficientNetScaling(1.0, 1.1),
    EfficientNetScaling(1.1, 1.2),
    EfficientNetScaling(1.2, 1.4),
    EfficientNetScaling(1.4, 1.8),
    EfficientNetScaling(1.6, 2.2),
    EfficientNetScaling(1.8, 2.6),
    EfficientNetScaling(2.0, 3.1),
)


def get_scaling(variant: int) -> EfficientNetScaling:
    """Scaling of EfficientNet-B``variant``; ValueError outside 0…7."""
    if not 0 <= variant < len(EFFICIENTNET_SCALING):
        raise ValueError(f"EfficientNet variant must be 0..{len(EFFICIENTNET_SCALING) - 1}, got {variant}")
    return EFFICIENTNET_SCALING[variant]


def round_filters(channels: int, width: float, divisor: int = DEPTH_DIVISOR) -> int:
    """Channels scaled by ``width``, rounded to a multiple of ``divisor`` (never down by > 10 %)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Blocks in a stage scaled by ``depth``, rounded up."""
    return int(math.ceil(depth * repeats))


def scaled_blocks(variant: int) -> Tuple[BlockArgs, ...]:
    """The stages of EfficientNet-B``variant`` with scaled channels and repeats."""
    scaling = get_scaling(variant)
    return tuple(
        BlockArgs(
            repeats=round_repeats(stage.repeats, scaling.depth),
            kernel=stage.kernel,
            stride=stage.stride,
            expand_ratio=stage.expand_ratio,
            in_channels=round_filters(stage.in_channels, scaling.width),
            out_channels=round_filters(stage.out_channels, scaling.width),
            se_ratio=stage.se_ratio,
        )
        for stage in B0_STAGES
    )
