"""Write a synthetic two-class "shape" dataset (rectangle = 1, circle = 2) in the published COCO layout.

    OUT/train/0.jpg …          OUT/val/N.jpg …
    OUT/annotations/instances_train.json, OUT/annotations/instances_val.json

Image ids start at 0 in each json (as ``../shared/data/shape``); file names continue across the sets
(train ``0.jpg`` …, val ``<num_train>.jpg`` …). Boxes are ``[x, y, w, h]`` pixels covering exactly the
pixels drawn: a rectangle covers columns ``x … x + w - 1``, a circle of radius r centred at (cx, cy) has
the box ``[cx - r, cy - r, 2r + 1, 2r + 1]``. Shapes may overlap; some images have none (negatives).

    python tools/make_shape_dataset.py --out datasets/shape --num-train 900 --num-val 100 --size 512
    python tools/make_shape_dataset.py --out datasets/elongated --aspect 5 8   # long thin shapes
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from efficientdet.synthetic import make_shape_dataset  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (e.g. datasets/shape)")
    parser.add_argument("--num-train", type=int, default=900)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--max-shapes", type=int, default=4, help="at most this many shapes per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aspect", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="elongated shapes: rectangles and ellipses MIN to MAX times longer than wide")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = make_shape_dataset(args.out, args.num_train, args.num_val, args.size, args.seed, args.max_shapes,
                                     tuple(args.aspect) if args.aspect else None)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
