"""The EfficientDet family in one frozen table (DEVELOPING.md, 'Model family'): every per-model number lives here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one EfficientDet variant.

    Attributes:
        compound_coef: ``-c N`` on every script (8 is D7x).
        name: "D0" … "D7x".
        backbone: EfficientNet-B variant.
        fpn_channels: BiFPN width.
        fpn_cells: number of stacked BiFPN cells.
        head_repeats: separable convs in each head before its output layer.
        input_size: default square input side in pixels.
        max_level: highest pyramid level (P3 … P7, or P8 for D7x).
        anchor_scale: anchor base size in units of the level's stride.
        weighted_fusion: fast normalised fusion (True) or a plain sum (False) in the BiFPN.
    """

    compound_coef: int
    name: str
    backbone: int
    fpn_channels: int
    fpn_cells: int
    head_repeats: int
    input_size: int
    max_level: int
    anchor_scale: float
    weighted_fusion: bool
    min_level: int = 3

    @property
    def pyramid_levels(self) -> Tuple[int, ...]:
        return tuple(range(self.min_level, self.max_level + 1))

    @property
    def max_stride(self) -> int:
        """Input sides must be multiples of this (the stride of the highest level)."""
        return 2 ** self.max_level


MODEL_CONFIGS: Tuple[ModelConfig, ...] = (
    ModelConfig(0, "D0", 0, 64, 3, 3, 512, 7, 4.0, True),
    ModelConfig(1, "D1", 1, 88, 4, 3, 640, 7, 4.0, True),
    ModelConfig(2, "D2", 2, 112, 5, 3, 768, 7, 4.0, True),
    ModelConfig(3, "D3", 3, 160, 6, 4, 896, 7, 4.0, True),
    ModelConfig(4, "D4", 4, 224, 7, 4, 1024, 7, 4.0, True),
    ModelConfig(5, "D5", 5, 288, 7, 4, 1280, 7, 4.0, True),
    ModelConfig(6, "D6", 6, 384, 8, 5, 1280, 7, 4.0, False),
    ModelConfig(7, "D7", 6, 384, 8, 5, 1536, 7, 5.0, False),
    ModelConfig(8, "D7x", 7, 384, 8, 5, 1536, 8, 4.0, False),
)


def get_model_config(compound_coef: int) -> ModelConfig:
    """The row of ``MODEL_CONFIGS`` for ``-c compound_coef``; ValueError outside 0…8."""
    if not isinstance(compound_coef, int) or not 0 <= compound_coef < len(MODEL_CONFIGS):
        raise ValueError(
            f"compound coefficient must be an integer 0..{len(MODEL_CONFIGS) - 1} (D0..D7x), got {compound_coef!r}")
    return MODEL_CONFIGS[compound_coef]
