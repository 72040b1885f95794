"""Seconds per training batch of the data loader (decode, augment, resize, collate), per augmentation.

    python benchmark/augment_speed.py                                  # shape project, ../shared/data, 512, batch 8
    python benchmark/augment_speed.py --batches 5 --data_path datasets/

In this process (``num_workers`` 0, what a loader worker does per batch), after an untimed pass over the same
images, ``--rounds`` rounds over the configurations, each one untimed batch then ``--batches`` timed ones; the
same seed, so every configuration loads the same images. Rows: no
augmentation (not even the default horizontal flip), the default flip, scale jitter, each augmentation of
:mod:`efficientdet.augment` alone (flips and mosaic with probability 1, colour and affine at their example
strengths) and all together. No training step is timed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from efficientdet.dataset import create_dataloaders  # noqa: E402
from utils.config.cli import run_script  # noqa: E402
from utils.config.project import load_project  # noqa: E402

HSV = {"hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4}
AFFINE = {"affine_scale": 0.5, "affine_translate": 0.1, "affine_rotate": 10.0}
#: (name, create_dataloaders keywords)
CONFIGS = (
    ("none", {"flip": False}),
    ("hflip 0.5 (default)", {}),
    ("scale_jitter", {"flip": False, "scale_jitter": True}),
    ("vflip 1.0", {"flip": False, "vflip": 1.0}),
    ("hsv 0.015/0.7/0.4", {"flip": False, **HSV}),
    ("affine 0.5/0.1/10", {"flip": False, **AFFINE}),
    ("mosaic 1.0", {"flip": False, "mosaic": 1.0}),
    ("all (hflip, vflip 0.5, hsv, affine, mosaic 1.0)", {"vflip": 0.5, "mosaic": 1.0, **HSV, **AFFINE}),
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-p", "--project", default="shape", help="projects/PROJECT.yml, or a path to a YAML file")
    p.add_argument("--data_path", default=str(REPO.parent / "shared" / "data"),
                   help="root holding PROJECT_NAME/ (default: ../shared/data beside the checkout)")
    p.add_argument("--input_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=10, help="timed batches per configuration (after one untimed)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all configurations")
    p.add_argument("--threads", type=int, default=2, help="torch threads (cv2 keeps its own)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def time_config(args: argparse.Namespace, settings: Dict[str, Any]) -> List[float]:
    """Seconds of each of ``args.batches`` batches of the training loader built with ``settings``."""
    project = load_project(args.project)
    data = create_dataloaders(project, args.data_path, args.input_size, args.batch_size, num_workers=0,
                              seed=args.seed, verify_images=False, progress=False, **settings)
    if len(data.train_loader) < args.batches + 1:
        raise ValueError(f"{data.train_set.annotation_file}: {len(data.train_loader)} batches of {args.batch_size}, "
                         f"fewer than --batches {args.batches} + 1")
    batches = iter(data.train_loader)
    next(batches)  # untimed: first-use costs
    times = []
    for _ in range(args.batches):
        start = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> int:
    if args.batches < 1 or args.batch_size < 1 or args.rounds < 1:
        raise ValueError(f"--batches, --batch_size and --rounds must be positive, got {args.batches}, "
                         f"{args.batch_size}, {args.rounds}")
    torch.set_num_threads(args.threads)
    time_config(args, CONFIGS[0][1])  # untimed pass: the images of these batches into the page cache
    rows = [(name, []) for name, _ in CONFIGS]
    for _ in range(args.rounds):  # configurations in turn, round after round: load drift spreads evenly
        for (name, times), (_, settings) in zip(rows, CONFIGS):
            times.extend(time_config(args, settings))
    base = statistics.median(rows[0][1])
    print(f"{args.project}: batch {args.batch_size} at {args.input_size}, {args.rounds} x {args.batches} timed "
          f"batches, in-process loading (num_workers 0), {args.threads} torch threads")
    print(f"| {'configuration':<48} | s / batch (median) | min | max | x none |")
    print(f"|{'-' * 50}|---:|---:|---:|---:|")
    for name, times in rows:
        median = statistics.median(times)
        print(f"| {name:<48} | {median:.3f} | {min(times):.3f} | {max(times):.3f} | {median / base:.2f} |")
    return 0


def main(args: argparse.Namespace) -> int:
    return run_script(run, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
