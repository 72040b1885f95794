"""Per-image time of the official gaussian soft-NMS (``coco_eval.py --nms soft``): a plain loop against the library.

    python benchmark/soft_nms.py                     # 5 images of 5000 candidates over 90 classes
    python benchmark/soft_nms.py --images 20 --candidates 5000 --threads 1

Each image is a seeded set of candidates shaped like the official top-5000 (class, anchor) pairs: clusters of
overlapping boxes around a few objects in their class, background boxes in every class with low scores, a few
zero-width boxes and score ties. The reference is the published algorithm written out as a loop: per class,
keep the highest score, multiply every other alive score by ``exp(-iou**2 / sigma)`` ("+1" pixel areas), drop
scores under the threshold, up to 100 per class; then the 100 best over all classes.
:func:`utils.inference.soft_nms.batched_soft_nms` runs the same float operations on the kept box's class only
and stops after 100 picks over all classes. Prints ms per image for each, the ratio and whether every image
gives exactly the same boxes, order and scores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from utils.inference.soft_nms import (OFFICIAL_MAX_DETECTIONS, OFFICIAL_SCORE_THRESHOLD, OFFICIAL_SIGMA,  # noqa: E402
                                      batched_soft_nms)


def make_candidates(seed: int, count: int, num_classes: int, size: float = 512.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Boxes Tensor[K, 4] (x1, y1, x2, y2), float32 scores Tensor[K] and classes LongTensor[K] of one image."""
    g = torch.Generator().manual_seed(seed)
    objects = 8
    centre, half = torch.rand(objects, 2, generator=g) * size, 8 + torch.rand(objects, 2, generator=g) * size / 5
    label = torch.randint(num_classes, (objects,), generator=g)
    owner = torch.randint(objects, (count,), generator=g)
    near = torch.rand(count, generator=g) < 0.6
    around = torch.cat([centre - half, centre + half], 1)[owner]
    around = around + torch.randn(count, 4, generator=g) * 0.2 * half[owner].repeat(1, 2)
    corner = torch.rand(count, 2, generator=g) * size
    anywhere = torch.cat([corner, corner + 8 + torch.rand(count, 2, generator=g) * size / 4], 1)
    boxes = torch.where(near[:, None], around, anywhere).clamp(0, size - 1)
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    flat = torch.rand(count, generator=g) < 0.02
    boxes[flat, 2] = boxes[flat, 0]
    own = near & (torch.rand(count, generator=g) < 0.5)
    classes = torch.where(own, label[owner], torch.randint(num_classes, (count,), generator=g))
    scores = torch.where(own, 0.05 + 0.9 * torch.rand(count, generator=g) ** 2,
                         0.005 + 0.1 * torch.rand(count, generator=g) ** 2)
    tie = torch.rand(count, generator=g) < 0.1
    scores[tie] = (scores[tie] * 1024).round() / 1024
    return boxes, scores, classes


def reference_soft_nms(boxes: Tensor, scores: Tensor, sigma: float, threshold: float,
                       max_output: int) -> Tuple[Tensor, Tensor]:
    """One class, one box per step over every box of the class (ties: lowest index)."""
    current, keep, kept = scores.clone(), [], []
    alive = current >= threshold
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    while len(keep) < max_output and bool(alive.any()):
        best = int(torch.argmax(torch.where(alive, current, torch.tensor(float("-inf")))))
        keep.append(best)
        kept.append(current[best])
        alive[best] = False
        b = boxes[best]
        w = (torch.minimum(b[2], boxes[:, 2]) - torch.maximum(b[0], boxes[:, 0]) + 1).clamp(min=0)
        h = (torch.minimum(b[3], boxes[:, 3]) - torch.maximum(b[1], boxes[:, 1]) + 1).clamp(min=0)
        inter = w * h
        iou = inter / ((b[2] - b[0] + 1) * (b[3] - b[1] + 1) + areas - inter)
        current = torch.where(alive, current * torch.exp(-(iou * iou) / sigma), current)
        alive &= current >= threshold
    return torch.tensor(keep, dtype=torch.long), torch.stack(kept) if kept else scores.new_zeros((0,))


def reference_image(boxes: Tensor, scores: Tensor, classes: Tensor, sigma: float = OFFICIAL_SIGMA,
                    threshold: float = OFFICIAL_SCORE_THRESHOLD,
                    max_output: int = OFFICIAL_MAX_DETECTIONS) -> Tuple[Tensor, Tensor, int]:
    """Each class alone, then the max_output best of the union (stable sort: ties in class order); and the
    number of loop steps it took."""
    all_keep, all_scores = [torch.zeros(0, dtype=torch.long)], [scores.new_zeros((0,))]
    for cls in torch.unique(classes).tolist():
        members = torch.nonzero(classes == cls).squeeze(1)
        keep, kept = reference_soft_nms(boxes[members], scores[members], sigma, threshold, max_output)
        all_keep.append(members[keep])
        all_scores.append(kept)
    keep, kept = torch.cat(all_keep), torch.cat(all_scores)
    order = torch.argsort(kept, descending=True, stable=True)[:max_output]
    return keep[order], kept[order], keep.numel()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5, help="candidate sets, one seed each (default %(default)s)")
    parser.add_argument("--candidates", type=int, default=5000, help="per image (default %(default)s)")
    parser.add_argument("--classes", type=int, default=90, help="(default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the library per image (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _timed(fn, *args) -> Tuple[float, tuple]:
    start = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - start) * 1000.0, out


def main(args: argparse.Namespace) -> int:
    if args.images < 1 or args.candidates < 1 or args.classes < 1 or args.repeats < 1:
        print("error: --images, --candidates, --classes and --repeats must be positive", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    old_ms: List[float] = []
    new_ms: List[float] = []
    steps: List[int] = []
    equal = 0
    for i in range(args.images):
        candidates = make_candidates(args.seed + i, args.candidates, args.classes)
        new_ms.append(statistics.median(_timed(batched_soft_nms, *candidates)[0] for _ in range(args.repeats)))
        ms, (ref_keep, ref_scores, ref_steps) = _timed(reference_image, *candidates)
        old_ms.append(ms)
        steps.append(ref_steps)
        keep, scores = batched_soft_nms(*candidates)
        equal += int(torch.equal(keep, ref_keep) and torch.equal(scores, ref_scores))
    old, new = statistics.fmean(old_ms), statistics.fmean(new_ms)
    print(f"{args.images} images x {args.candidates} candidates, {args.classes} classes, "
          f"{torch.get_num_threads()} threads; reference loop steps per image: {statistics.fmean(steps):.0f}")
    print(f"reference (per class, every box per step): {old:8.1f} ms/image")
    print(f"batched_soft_nms (library):                 {new:8.1f} ms/image (median of {args.repeats})")
    print(f"ratio reference / library: {old / new:.1f}x; identical output (boxes, order, scores): "
          f"{equal}/{args.images} images")
    return 0 if equal == args.images else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
