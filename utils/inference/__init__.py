"""Inference, one path for the demo, the evaluator, the video script, export and the benchmark: :class:`Detector`
(:mod:`.detector`) over pre-processing (:mod:`.preprocess`, the pixel steps of :mod:`efficientdet.transforms`),
the network in a run mode (:mod:`.modes`: eager, fused, channels-last, traced, bf16/fp16), post-processing
(:mod:`.postprocess`: decode, thresholds, NMS from :mod:`.nms`; the official soft-NMS in :mod:`.soft_nms`) and
ONNX export (:mod:`.onnx_export`)."""
from utils.inference.detector import Detections, Detector

__all__ = ["Detections", "Detector"]
