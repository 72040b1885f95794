"""Detect objects in a video file or a webcam stream and write an annotated video.

    python efficientdet_test_videos.py -c 0 --video clip.mp4 --output test/clip_det.mp4
    python efficientdet_test_videos.py -c 0 --video 0 --max_frames 300     # webcam 0

Frames are BGR like images read from files and use the same pre-processing (project mean/std).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2

from utils.weights.download import ensure_weights
from utils.visual.draw import draw_detections
from utils.inference.detector import Detector
from utils.inference.postprocess import DEMO_THRESHOLDS
from utils.config.cli import add_inference_args, add_model_args, add_threshold_args, run_script

DEFAULT_FPS = 25.0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--video", required=True, help="video file, or a webcam index such as 0")
    parser.add_argument("--output", default="test/video_det.mp4",
                        help="annotated video (mp4v), default test/video_det.mp4")
    add_threshold_args(parser, DEMO_THRESHOLDS)
    parser.add_argument("--max_frames", type=int, default=None, help="stop after this many frames (default: all)")
    add_inference_args(parser)
    return parser.parse_args(argv)


def video_source(spec: str) -> Union[int, str]:
    """A webcam index (digits) or an existing video file; FileNotFoundError for a missing file."""
    if spec.isdigit():
        return int(spec)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"video not found: {spec}")
    return spec


def run(args: argparse.Namespace) -> int:
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max_frames must be at least 1, got {args.max_frames}")
    source = video_source(args.video)
    weights = ensure_weights(args.compound_coef, args.weights)
    detector = Detector.from_checkpoint(args.compound_coef, weights, args.project, input_size=args.input_size,
                                        device=args.device, float16=args.float16, threshold=args.threshold,
                                        iou_threshold=args.iou_threshold, mode=args.mode)
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise ValueError(f"cannot open video {args.video!r}")
    writer = None
    frames = 0
    detections = 0
    elapsed = 0.0
    try:
        while args.max_frames is None or frames < args.max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            start = time.perf_counter()
            dets = detector.detect(frame)[0]
            elapsed += time.perf_counter() - start
            if writer is None:
                fps = capture.get(cv2.CAP_PROP_FPS)
                fps = fps if fps and fps > 0 else DEFAULT_FPS
                output = Path(args.output)
                output.parent.mkdir(parents=True, exist_ok=True)
                writer = cv2.VideoWriter(str(output), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                         (frame.shape[1], frame.shape[0]))
                if not writer.isOpened():
                    raise ValueError(f"cannot write video {output} (mp4v)")
            writer.write(draw_detections(frame, dets.boxes, dets.class_ids, dets.scores, dets.class_names))
            frames += 1
            detections += len(dets)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if frames == 0:
        raise ValueError(f"no frames could be read from {args.video!r}")
    print(f"{frames} frames, {detections} detections, {frames / elapsed:.2f} FPS "
          f"(pre-processing, network and post-processing), saved {args.output}")
    return 0


def main(args: argparse.Namespace) -> int:
    return run_script(run, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
