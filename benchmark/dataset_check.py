"""Seconds of the image-file check that runs before training, against one epoch of data loading.

    python benchmark/dataset_check.py                          # shape project, ../shared/data, D0 input
    python benchmark/dataset_check.py --train_steps 0 --json   # without the D0 step timing

Measured on the project's training set:

- ``check``: :func:`efficientdet.dataset.verify_images` (header and tail of every image file, no
  decoding; what ``CocoDataset`` / ``create_dataloaders`` run when built), ``--repeats`` times: the first
  run (coldest page cache this process can get; no root, so caches are not dropped) and the median;
- ``loading``: one pass over the training DataLoader with the default transforms (decode, normalise,
  flip, resize, collate; ``--num_workers`` workers), without a model;
- ``train step``: ``--train_steps`` timed D0 steps (forward + loss + backward + AdamW on real batches,
  after one warm-up step) at the same batch size: a full model epoch is far too slow to time on a CPU
  here, so the epoch is estimated as steps per epoch × median step (+ the loading time when the loader
  runs in the training process, ``--num_workers 0``).

Prints the check's share of each.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backbone import build_model  # noqa: E402
from efficientdet.config import get_model_config  # noqa: E402
from efficientdet.dataset import CocoDataset, create_dataloaders, verify_images  # noqa: E402
from efficientdet.loss import DetectionLoss  # noqa: E402
from utils.training.parts import ModelWithLoss  # noqa: E402
from utils.config.cli import add_bool_arg, run_script  # noqa: E402
from utils.config.project import load_project  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-p", "--project", default="shape", help="projects/PROJECT.yml, or a path to a YAML file")
    p.add_argument("--data_path", default=str(REPO.parent / "shared" / "data"),
                   help="root holding PROJECT_NAME/ (default: ../shared/data beside the checkout)")
    p.add_argument("-c", "--compound_coef", type=int, default=0)
    p.add_argument("--input_size", type=int, default=None, help="default: the model's input size")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("-n", "--num_workers", type=int, default=0, help="DataLoader workers for the loading pass")
    p.add_argument("--repeats", type=int, default=3, help="runs of the check")
    p.add_argument("--train_steps", type=int, default=3, help="timed training steps (0: skip the model)")
    p.add_argument("--threads", type=int, default=2)
    add_bool_arg(p, "--json", help="print JSON instead of a table")
    return p.parse_args(argv)


def time_check(dataset: CocoDataset, repeats: int) -> Dict[str, Any]:
    """Seconds of :func:`verify_images` over ``dataset``: the first run and the median of ``repeats``."""
    times, problems = [], []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        problems = verify_images(dataset, progress=False)
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "median_s": statistics.median(times), "images": len(dataset),
            "problems": len(problems)}


def time_loading(loader: torch.utils.data.DataLoader) -> Dict[str, Any]:
    """Seconds of one pass over ``loader`` (batches and images seen)."""
    start = time.perf_counter()
    batches = images = 0
    for batch in loader:
        batches += 1
        images += int(batch["img"].shape[0])
    return {"seconds": time.perf_counter() - start, "batches": batches, "images": images}


def time_train_steps(args: argparse.Namespace, project: Any, loader: torch.utils.data.DataLoader) -> Dict[str, Any]:
    """Median seconds of ``args.train_steps`` training steps on the first batches of ``loader`` (one warm-up)."""
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # as train.py: denormal floats make CPU steps erratic
    model = build_model(args.compound_coef, project).train()
    net = ModelWithLoss(model, DetectionLoss("yaep", from_logits=True))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    times: List[float] = []
    batches = iter(loader)
    for step in range(1 + args.train_steps):
        batch = next(batches)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        cls_loss, reg_loss, _ = net(batch["img"], batch["annot"])
        (cls_loss + reg_loss).backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "steps": len(times)}


def run(args: argparse.Namespace) -> int:
    if args.batch_size <= 0 or args.repeats <= 0 or args.train_steps < 0:
        raise ValueError(f"need --batch_size > 0, --repeats > 0, --train_steps >= 0, got {args.batch_size}, "
                         f"{args.repeats}, {args.train_steps}")
    torch.set_num_threads(args.threads)
    project = load_project(args.project)
    size = args.input_size or get_model_config(args.compound_coef).input_size
    root = Path(args.data_path) / project.project_name
    unchecked = CocoDataset(root, project.train_set, project, verify_images=False)
    check = time_check(unchecked, args.repeats)
    bundle = create_dataloaders(project, args.data_path, size, args.batch_size, num_workers=args.num_workers,
                                seed=0, verify_images=False, progress=False)
    loading = time_loading(bundle.train_loader)
    result: Dict[str, Any] = {"config": {**vars(args), "input_size": size}, "check": check, "loading": loading,
                              "check_share_of_loading": check["median_s"] / loading["seconds"]}
    if args.train_steps:
        step = time_train_steps(args, project, bundle.train_loader)
        epoch = step["median_s"] * len(bundle.train_loader) + (loading["seconds"] if args.num_workers == 0 else 0.0)
        result.update(train_step=step, estimated_epoch_s=epoch, check_share_of_epoch=check["median_s"] / epoch)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{project.project_name} train set: {check['images']} images, input {size}, batch {args.batch_size}, "
          f"{args.num_workers} loader workers, {args.threads} threads")
    print(f"check (header + tail, no decoding): first {check['first_s']:.3f} s, median {check['median_s']:.3f} s "
          f"of {args.repeats} ({1e3 * check['median_s'] / max(1, check['images']):.3f} ms per image, "
          f"{check['problems']} problems)")
    print(f"one epoch of loading + augmentation: {loading['seconds']:.2f} s ({loading['batches']} batches): "
          f"check = {100 * result['check_share_of_loading']:.2f} %")
    if args.train_steps:
        print(f"D{args.compound_coef} training step: median {result['train_step']['median_s']:.2f} s of "
              f"{args.train_steps}; estimated epoch {result['estimated_epoch_s']:.0f} s "
              f"({len(bundle.train_loader)} steps): check = {100 * result['check_share_of_epoch']:.3f} %")
    return 0


def main(args: argparse.Namespace) -> int:
    return run_script(run, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
