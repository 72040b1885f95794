"""Seconds per training step and peak memory: the starting training loop against fp32, --amp, --grad_checkpoint.

    git worktree add /tmp/effdet_base 1236e98      # the starting loop, imported from there
    python benchmark/train_speed.py --runs 0:8:512 2:4:768 --steps 3

Each variant runs in a fresh subprocess (peak memory is that process's max RSS on CPU, max allocated on CUDA),
variants taking turns, ``--rounds`` times; a watchdog kills a child above ``--cap_gib`` of RSS and reports it as
"does not fit". A step is what the trainer runs: forward, loss, backward, optimizer (AdamW), the non-finite guard
(``base``: the starting loop's guard, which copied every weight and optimizer tensor per step; ``nchw``: fp32 with
``channels_last=False``: the losses of the first two steps equal ``base``'s bit for bit, later ones to float32
round-off of the recomputed BatchNorm output), on one synthetic
batch, glibc keeping freed memory as ``train.py`` does. Prints medians and ratios against ``base``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"base": (), "fp32": (), "nchw": ("nchw",), "amp": ("amp",), "ckpt": ("ckpt",), "amp+ckpt": ("amp", "ckpt")}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=["0:8:512", "2:4:768"], help="COEF:BATCH:SIZE ...")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=3, help="timed steps per child (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="times each variant runs (taking turns)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", default="/tmp/effdet_base", help="worktree of the starting commit")
    p.add_argument("--cap_gib", type=float, default=18.0, help="kill a child above this RSS")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> int:
    """Run one variant here; print one JSON line."""
    coef, batch, size = (int(v) for v in args.runs[0].split(":"))
    flags = VARIANTS[args.child]
    sys.path.insert(0, str(Path(args.base) if args.child == "base" else REPO))
    import resource, torch  # noqa: E401 (imported here, after choosing the tree the variant runs from)
    import backbone
    from backbone import EfficientDet
    from efficientdet.loss import DetectionLoss
    from utils.config.cli import keep_freed_memory
    from utils.training.parts import FiniteGuard, ModelWithLoss
    keep_freed_memory()
    torch.set_num_threads(args.threads), torch.set_flush_denormal(True), torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = EfficientDet(num_classes=2, compound_coef=coef).train().to(device)
    if "ckpt" in flags:
        model.set_grad_checkpointing(True)
    layout = {} if args.child == "base" else {"channels_last": False if "nchw" in flags else None}
    net = ModelWithLoss(model, DetectionLoss("yaep", from_logits=True), **layout)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    guard = FiniteGuard(model, optimizer)
    images = torch.randn(batch, 3, size, size, device=device)
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5, 0], [0.5, 0.4, 0.9, 0.8, 1], [0.3, 0.6, 0.5, 0.9, 0]])
    annotations = (boxes * torch.tensor([size, size, size, size, 1.0])).to(device).repeat(batch, 1, 1)
    if args.child == "base":
        def step():  # the starting trainer's train_step (fp32; its --amp was never asked for here)
            guard.begin(), optimizer.zero_grad(set_to_none=True)
            cls_loss, reg_loss, _ = net(images, annotations)
            assert bool(torch.isfinite(cls_loss + reg_loss))
            (cls_loss + reg_loss).backward()
            optimizer.step()
            assert guard.is_finite()
            guard.accept()
            return float(cls_loss.detach()), float(reg_loss.detach())
    else:
        from utils.training.step import amp_dtype, optimizer_step
        dtype = amp_dtype(device) if "amp" in flags else None
        scaler = torch.amp.GradScaler("cuda", enabled="amp" in flags and device.type == "cuda")

        def step():
            verdict, cls_loss, reg_loss, _ = optimizer_step(net, optimizer, guard, images, annotations, dtype, scaler)
            return float(cls_loss), float(reg_loss)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses.append(step())
        torch.cuda.synchronize() if device.type == "cuda" else None
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"  # utils.training.measure.peak_memory_bytes
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    print(json.dumps({"seconds": statistics.median(times), "peak_gib": peak, "losses": losses,
                      "tree": str(Path(backbone.__file__).parent)}))
    return 0


def run_child(args: argparse.Namespace, run: str, variant: str) -> Dict:
    """One variant in a fresh process under the memory cap."""
    sys.path.insert(0, str(REPO))
    from utils.training.measure import run_capped
    cmd = [sys.executable, __file__, "--child", variant, "--runs", run, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--threads", str(args.threads), "--base", args.base]
    code, out, killed = run_capped(cmd, int(args.cap_gib * 2 ** 30))
    if killed or code != 0:
        return {"error": f"does not fit in {args.cap_gib:g} GiB" if killed or code < 0 else f"exit {code}"}
    return json.loads(out.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> int:
    if args.child:
        return child(args)
    if "base" in args.variants and not (Path(args.base) / "backbone.py").is_file():
        return print(f"error: {args.base}: no worktree of the starting commit (git worktree add {args.base} "
                     "1236e98)", file=sys.stderr) or 1
    for run in args.runs:
        results: Dict[str, List[Dict]] = {v: [] for v in args.variants}
        for variant in [v for _ in range(args.rounds) for v in args.variants]:  # taking turns
            results[variant].append(run_child(args, run, variant))
        coef, batch, size = run.split(":")
        print(f"-c {coef} batch {batch} size {size}, {args.threads} threads, median of {args.steps} steps, "
              f"{args.rounds} round(s)")
        print(f"{'variant':<10}{'s/step':>9}{'x base':>8}{'peak GiB':>10}{'x base':>8}  first losses")
        summary = {}
        for variant, rows in results.items():
            good = [r for r in rows if "error" not in r]
            if not good:
                print(f"{variant:<10}  {rows[0]['error']}")
                continue
            summary[variant] = (statistics.median(r["seconds"] for r in good), max(r["peak_gib"] for r in good))
            base = summary.get("base", summary[variant])
            first = " ".join(f"{c + r:.5f}" for c, r in good[0]["losses"][:2])
            if variant != "base" and results.get("base") and "error" not in results["base"][0]:
                same = good[0]["losses"] == results["base"][0]["losses"]  # every step's float32 losses
                first += "  (= base, bit for bit)" if same else ""
            print(f"{variant:<10}{summary[variant][0]:>9.3f}{summary[variant][0] / base[0]:>8.2f}"
                  f"{summary[variant][1]:>10.2f}{summary[variant][1] / base[1]:>8.2f}  {first}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
