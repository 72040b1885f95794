"""Where the time of one training step goes: data loading, forward, loss, backward, optimizer, the non-finite
guard, EMA and logging, each timed on its own (the parts of ``utils.training.step.optimizer_step`` and the
trainer's loop around it).

    python benchmark/train_profile.py                      # D0, batch 8, 512 px, the shape project's images

Batches come from the project's training DataLoader in this process (``--num_workers 0``: loading shows in
full; ``train.py``'s loader workers overlap it with the step) or, without the data, from random images.
Prints the median seconds of each part over ``--steps`` steps after ``--warmup``, and its share of the step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backbone import build_model  # noqa: E402
from efficientdet.loss import DetectionLoss  # noqa: E402
from utils.config.cli import keep_freed_memory  # noqa: E402
from utils.config.project import load_project  # noqa: E402
from utils.training.guard import FiniteGuard  # noqa: E402
from utils.training.measure import training_batches  # noqa: E402
from utils.training.parts import ModelEMA, ModelWithLoss  # noqa: E402
from utils.training.reporting import RunLog  # noqa: E402
from utils.training.step import amp_dtype, autocast  # noqa: E402

PARTS = ("data", "forward", "loss", "backward", "optimizer", "guard", "ema", "logging")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-p", "--project", default="shape")
    p.add_argument("--data_path", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("-c", "--compound_coef", type=int, default=0)
    p.add_argument("--input_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CPU) / fp16 (CUDA)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    project = load_project(args.project)
    model = build_model(args.compound_coef, project).train()
    net = ModelWithLoss(model, DetectionLoss(project.loss, from_logits=True))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    guard, ema = FiniteGuard(model, optimizer), ModelEMA(model)
    dtype = amp_dtype(torch.device("cpu")) if args.amp else None
    data = training_batches(project, args.data_path, args.input_size, args.batch_size)
    times: Dict[str, List[float]] = {part: [] for part in PARTS}
    with tempfile.TemporaryDirectory() as log_dir:
        run_log = RunLog(Path(log_dir), "profile")
        for step in range(args.warmup + args.steps):
            marks = [time.perf_counter()]
            images, annotations = next(data)
            marks.append(time.perf_counter())
            guard.begin()
            optimizer.zero_grad(set_to_none=True)
            with autocast(images.device, dtype):
                _, regression, logits, anchors = model(images.contiguous(memory_format=torch.channels_last),
                                                       logits=True)
                marks.append(time.perf_counter())
                cls_loss, reg_loss = net.criterion(logits, regression, anchors, annotations)
            marks.append(time.perf_counter())
            (cls_loss + reg_loss).backward()
            marks.append(time.perf_counter())
            finite = guard.step_is_finite(cls_loss + reg_loss)
            optimizer.step()
            marks.append(time.perf_counter())
            finite = guard.is_finite() and finite
            guard.accept()
            marks.append(time.perf_counter())
            ema.update(model)
            marks.append(time.perf_counter())
            losses = {"cls_loss": float(cls_loss.detach()), "reg_loss": float(reg_loss.detach())}
            run_log.scalars(losses, step, 1, "train")
            marks.append(time.perf_counter())
            if step >= args.warmup:
                for part, start, end in zip(PARTS, marks, marks[1:]):
                    times[part].append(end - start)
        run_log.close()
    medians = {part: statistics.median(values) for part, values in times.items()}
    total = sum(medians.values())
    print(f"D{args.compound_coef} batch {args.batch_size} {args.input_size} px{' --amp' if args.amp else ''}, "
          f"{args.threads} threads, median of {args.steps} steps (finite: {finite})")
    for part, seconds in medians.items():
        print(f"{part:<10}{seconds:>9.4f} s{100 * seconds / total:>7.1f} %")
    print(f"{'step':<10}{total:>9.4f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
