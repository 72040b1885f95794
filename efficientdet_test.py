"""Detect objects in images with a trained EfficientDet and save annotated copies.

    python efficientdet_test.py -c 0 --images test/img.jpg            # writes test/img_det.jpg
    python efficientdet_test.py -c 2 -w my.pth -p shape --images folder/ --output out/
    python efficientdet_test.py -c 0 --speed_test                      # FPS, post-processing included

Without ``-w`` the published ``weights/efficientdet-d{c}.pth`` is used (downloaded when missing).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import cv2

from utils.weights.download import ensure_weights
from utils.visual.draw import draw_detections
from utils.inference.detector import Detections, Detector
from utils.inference.postprocess import DEMO_THRESHOLDS
from utils.inference.preprocess import list_images
from utils.config.cli import add_bool_arg, add_inference_args, add_model_args, add_threshold_args, run_script

DEFAULT_IMAGE = str(Path(__file__).resolve().parent / "test" / "img.jpg")  # the sample shipped in the repo
SPEED_TEST_RUNS = 10


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--images", nargs="+", default=[DEFAULT_IMAGE], help="image files and/or folders")
    add_threshold_args(parser, DEMO_THRESHOLDS)
    parser.add_argument("--output", default="test", help="folder for the annotated images (default test/)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward pass (default 1)")
    add_bool_arg(parser, "--speed_test", help=f"time {SPEED_TEST_RUNS} runs on the first batch after one warm-up and print FPS")
    add_inference_args(parser)
    return parser.parse_args(argv)


def format_detections(source: str, dets: Detections) -> List[str]:
    """Printable lines: a header and one line per detection (name, score, box in image pixels)."""
    lines = [f"{source}: {len(dets)} detection{'s' if len(dets) != 1 else ''}"]
    for box, name, class_id, score in zip(dets.boxes, dets.class_names, dets.class_ids, dets.scores):
        x1, y1, x2, y2 = (float(v) for v in box)
        lines.append(f"  {name or f'class {int(class_id)}'} {float(score):.3f} "
                     f"({x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f})")
    return lines


def speed_test(detector: Detector, images: List[Path], batch_size: int) -> float:
    """FPS over :data:`SPEED_TEST_RUNS` runs (forward + post-processing) on the same pre-processed batch."""
    batch, metas, _ = detector.preprocess(images[:batch_size])
    detector.predict_batch(batch, metas)  # warm-up
    start = time.perf_counter()
    for _ in range(SPEED_TEST_RUNS):
        detector.predict_batch(batch, metas)  # returns numpy: includes the device synchronisation
    elapsed = time.perf_counter() - start
    return SPEED_TEST_RUNS * batch.shape[0] / elapsed


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    images = list_images(args.images)
    weights = ensure_weights(args.compound_coef, args.weights)
    detector = Detector.from_checkpoint(args.compound_coef, weights, args.project, input_size=args.input_size,
                                        device=args.device, float16=args.float16, threshold=args.threshold,
                                        iou_threshold=args.iou_threshold, mode=args.mode)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    used_names = set()
    for start in range(0, len(images), args.batch_size):
        chunk = images[start:start + args.batch_size]
        batch, metas, originals = detector.preprocess(chunk)
        for path, dets, original in zip(chunk, detector.predict_batch(batch, metas), originals):
            print("\n".join(format_detections(str(path), dets)))
            annotated = draw_detections(original, dets.boxes, dets.class_ids, dets.scores, dets.class_names)
            name = f"{path.stem}_det.jpg"
            suffix = 1
            while name in used_names:  # same stem from another folder
                suffix += 1
                name = f"{path.stem}_{suffix}_det.jpg"
            used_names.add(name)
            target = output / name
            if not cv2.imwrite(str(target), annotated):
                raise ValueError(f"could not write {target}")
            print(f"  saved {target}")
    if args.speed_test:
        fps = speed_test(detector, images, args.batch_size)
        print(f"speed test: {fps:.2f} FPS ({detector.model.config.name}, batch {min(args.batch_size, len(images))}, "
              f"input {detector.input_hw[0]}x{detector.input_hw[1]}, {detector.device}, "
              f"mode {detector.mode}, post-processing included)")
    return 0


def main(args: argparse.Namespace) -> int:
    return run_script(run, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
