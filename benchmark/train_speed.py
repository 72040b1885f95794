"""Seconds per training step (forward + loss + backward + AdamW) against the loop we started from.

    python benchmark/train_speed.py -c 0 --input_size 256 --batch_size 8

Variants, measured in the same run on the same synthetic batch:

- ``baseline``: the starting point: every "same" conv padded with ``F.pad`` (as the published
  implementation does) and denormal floats left on;
- ``+conv-padding``: stride-1 convs pad themselves (identical numbers, no extra copy);
- ``+flush-denormal``: that plus ``torch.set_flush_denormal(True)``;
- ``current``: that plus glibc keeping freed memory (``utils.config.cli.keep_freed_memory``), which is what
  ``train.py`` runs with (process-wide, so it is measured last).

Prints the median seconds per step after warm-up and each variant's ratio against ``baseline``.
Without flushing, the two first variants are erratic: once AdamW's second moments and some
activations turn denormal, a step can take from 1x to 50x longer (seen here: 0.75 s to 39 s per step
for the baseline across runs), which is why ``train.py`` flushes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backbone import EfficientDet  # noqa: E402
from efficientdet.loss import DetectionLoss  # noqa: E402
from efficientnet.utils import Conv2dStaticSamePadding  # noqa: E402
from utils.training.parts import ModelWithLoss  # noqa: E402
from utils.config.cli import add_bool_arg, keep_freed_memory  # noqa: E402

WARMUP = 3  # untimed steps per variant


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--compound_coef", type=int, default=0)
    p.add_argument("--input_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 3 warm-up steps)")
    p.add_argument("--threads", type=int, default=2)
    add_bool_arg(p, "--json", help="print JSON instead of a table")
    return p.parse_args(argv)


def pad_everything(model: torch.nn.Module) -> None:
    """Make every static-same conv pad with F.pad, as the published implementation does."""
    for module in model.modules():
        if isinstance(module, Conv2dStaticSamePadding):
            module.conv.padding = (0, 0)
            module._needs_pad = True


def time_variant(args: argparse.Namespace, published_padding: bool, flush_denormal: bool) -> float:
    torch.manual_seed(0)
    torch.set_flush_denormal(flush_denormal)
    model = EfficientDet(num_classes=2, compound_coef=args.compound_coef).train()
    if published_padding:
        pad_everything(model)
    net = ModelWithLoss(model, DetectionLoss("yaep", from_logits=True))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    size = args.input_size
    images = torch.randn(args.batch_size, 3, size, size)
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5, 0], [0.5, 0.4, 0.9, 0.8, 1], [0.3, 0.6, 0.5, 0.9, 0]]) * torch.tensor(
        [size, size, size, size, 1.0])
    annotations = boxes.unsqueeze(0).repeat(args.batch_size, 1, 1)
    times = []
    for step in range(WARMUP + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        cls_loss, reg_loss, _ = net(images, annotations)
        (cls_loss + reg_loss).backward()
        optimizer.step()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    variants = {"baseline": (True, False), "+conv-padding": (False, False), "+flush-denormal": (False, True)}
    # One throw-away run first: the first steps of a process pay one-time costs (oneDNN kernels,
    # allocator growth) that would otherwise land on whichever variant runs first.
    time_variant(argparse.Namespace(**{**vars(args), "steps": 1}), False, True)
    results: Dict[str, float] = {name: time_variant(args, *flags) for name, flags in variants.items()}
    kept = keep_freed_memory()
    results["current" if kept else "current (no glibc: memory not kept)"] = time_variant(args, False, True)
    torch.set_flush_denormal(False)
    base = results["baseline"]
    if args.json:
        print(json.dumps({"config": vars(args), "seconds_per_step": results,
                          "ratio": {k: v / base for k, v in results.items()}}, indent=2))
        return 0
    print(f"D{args.compound_coef} training step, batch {args.batch_size}, input {args.input_size}, "
          f"{args.threads} threads, median of {args.steps} steps")
    print(f"{'variant':<16}{'s/step':>10}{'vs baseline':>14}")
    for name, seconds in results.items():
        print(f"{name:<16}{seconds:>10.3f}{seconds / base:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
