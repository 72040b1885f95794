"""How far ``--amp`` training drifts from float32: the same steps (same initial weights, batches, drop-connect
masks) in float32 and under mixed precision, loss by loss.

    python benchmark/amp_drift.py                 # D0, 256 px, batch 8, 50 steps, the shape project's images

Both runs go through ``utils.training.step.optimizer_step`` (AdamW, lr 1e-3); batches come from the project's
training DataLoader (random images without the data). Prints the loss of both every 10 steps and the largest
relative difference |amp - fp32| / fp32 over all steps and over the last 10.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backbone import build_model  # noqa: E402
from efficientdet.loss import DetectionLoss  # noqa: E402
from efficientnet.utils import bf16_supported  # noqa: E402
from utils.config.cli import keep_freed_memory  # noqa: E402
from utils.config.project import load_project  # noqa: E402
from utils.training.guard import FiniteGuard  # noqa: E402
from utils.training.measure import training_batches  # noqa: E402
from utils.training.parts import ModelWithLoss  # noqa: E402
from utils.training.step import amp_dtype, optimizer_step  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-p", "--project", default="shape")
    p.add_argument("--data_path", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("-c", "--compound_coef", type=int, default=0)
    p.add_argument("--input_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def losses(args: argparse.Namespace, project, data: list, dtype: Optional[torch.dtype]) -> List[float]:
    torch.manual_seed(0)
    model = build_model(args.compound_coef, project).train()
    net = ModelWithLoss(model, DetectionLoss(project.loss, from_logits=True))
    optimizer = torch.optim.AdamW(model.parameters(), args.lr)
    guard = FiniteGuard(model, optimizer)
    out = []
    for step, (images, annotations) in enumerate(data):
        torch.manual_seed(1000 + step)  # the same drop-connect masks in both runs
        verdict, cls_loss, reg_loss, _ = optimizer_step(net, optimizer, guard, images, annotations, dtype)
        out.append(float(cls_loss + reg_loss) if verdict == "ok" else float("nan"))
    return out


def main(args: argparse.Namespace) -> int:
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    project = load_project(args.project)
    source = training_batches(project, args.data_path, args.input_size, args.batch_size)
    data = [next(source) for _ in range(args.steps)]
    device = torch.device("cpu")
    fp32, amp = losses(args, project, data, None), losses(args, project, data, amp_dtype(device))
    rel = [abs(b - a) / abs(a) for a, b in zip(fp32, amp)]
    print(f"D{args.compound_coef} {args.input_size} px batch {args.batch_size}, {args.steps} steps, lr {args.lr}, "
          f"amp bfloat16 (native: {bf16_supported(device)})")
    print(f"{'step':>5}{'fp32':>10}{'amp':>10}{'rel diff':>10}")
    for i in range(0, args.steps, 10):
        print(f"{i + 1:>5}{fp32[i]:>10.4f}{amp[i]:>10.4f}{rel[i]:>10.4f}")
    print(f"{args.steps:>5}{fp32[-1]:>10.4f}{amp[-1]:>10.4f}{rel[-1]:>10.4f}")
    print(f"largest relative difference: {max(rel):.4f} over all steps, {max(rel[-10:]):.4f} over the last 10")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
