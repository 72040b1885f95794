"""EfficientNet backbone with TensorFlow static "same" padding."""
from .model import EfficientNet, EfficientNetBackbone, MBConvBlock

__all__ = ["EfficientNet", "EfficientNetBackbone", "MBConvBlock"]
