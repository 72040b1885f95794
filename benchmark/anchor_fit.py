"""Default against fitted anchors on long thin objects: best-possible recall and COCO mAP after training.

    python benchmark/anchor_fit.py                      # 400 + 100 images of 256 px, aspect 5-8, 600 steps each
    python benchmark/anchor_fit.py --steps 200 --num_train 100 --json out.json

Writes an elongated shape set (``tools/make_shape_dataset.py --aspect 5 8``), one project with the COCO
anchors and one with the anchors :func:`efficientdet.anchor_fit.fit_anchors` proposes, then trains D0 from
scratch on each with the same seed, data order and number of steps (``train.py``) and evaluates each on the
val set (``coco_eval.py``), both run as a user runs them. Prints the recall of each anchor set on the train and
val boxes and the mAP of each model. Each run's output goes to ``OUT/{default,fitted}/train.log`` and ``eval.log``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmark.training_runs import ScriptFailed, train_and_evaluate as train_and_evaluate_run  # noqa: E402
from efficientdet.anchor_fit import anchor_grid, best_anchor_iou, dataset_boxes, fit_anchors, yaml_lines  # noqa: E402
from efficientdet.anchors import DEFAULT_RATIOS, DEFAULT_SCALES  # noqa: E402
from efficientdet.config import get_model_config  # noqa: E402
from efficientdet.dataset import CocoDataset  # noqa: E402
from efficientdet.synthetic import make_shape_dataset  # noqa: E402
from utils.config.project import load_project, write_anchors  # noqa: E402

def project_text() -> str:
    """``projects/shape.yml`` (the COCO anchors) made the ``bars`` project of the elongated set."""
    text = (REPO / "projects" / "shape.yml").read_text(encoding="utf-8")
    return text.replace("project_name: shape", "project_name: bars").replace("'circle'", "'ellipse'")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/anchor_fit"), help="work folder (default %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="image side and input size (default %(default)s)")
    parser.add_argument("--num_train", type=int, default=400)
    parser.add_argument("--num_val", type=int, default=100)
    parser.add_argument("--aspect", type=float, nargs=2, default=(5.0, 8.0), metavar=("MIN", "MAX"))
    parser.add_argument("--steps", type=int, default=600, help="training steps per anchor set (default %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--loss", choices=("official", "yaep"), default="official",
                        help="official (default: every box force-matched to its best anchor) or yaep (the published "
                             "loss: no forced matches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    return parser.parse_args(argv)


def recall(dataset: CocoDataset, scales, ratios, size: int) -> float:
    boxes, _ = dataset_boxes(dataset, size)
    return float(np.mean(best_anchor_iou(boxes, anchor_grid(get_model_config(0), scales, ratios, size)) >= 0.5))


def train_and_evaluate(args: argparse.Namespace, name: str, project: Path) -> Dict[str, float]:
    """``train.py`` then ``coco_eval.py`` on ``project``; returns the COCO metrics and the training time."""
    common = ["-c", "0", "-p", str(project), "--data_path", str(args.out / "datasets"), "--input_size",
              str(args.size), "--device", "cpu"]
    print(f"training with the {name} anchors: log {args.out / name / 'train.log'}", flush=True)
    return train_and_evaluate_run(args.out / name, common,
                                  ["--batch_size", str(args.batch_size), "--loss", args.loss, "--lr", "2e-3",
                                   "--lr_schedule", "cosine", "--bn_momentum", "0.1", "--num_epochs", "1000",
                                   "--max_steps", str(args.steps), "--val_interval", "0", "--save_interval", "0",
                                   "--seed", str(args.seed), "-n", "0"], "bars")


def write_bars(out: Path, size: int, num_train: int, num_val: int, aspect: Tuple[float, float],
               seed: int) -> Dict[str, Path]:
    """The elongated shape set under ``out/datasets/bars`` (``size`` px images) and its two projects:
    ``{"default": out/bars_default.yml (the COCO anchors), "fitted": out/bars_fitted.yml (the anchors
    :func:`fit_anchors` proposes for the train boxes at input ``size``)}``."""
    root = out / "datasets" / "bars"
    make_shape_dataset(root, num_train, num_val, size, seed, aspect=tuple(aspect))
    projects = {"default": out / "bars_default.yml", "fitted": out / "bars_fitted.yml"}
    for path in projects.values():
        path.write_text(project_text())
    train = CocoDataset(root, "train", load_project(projects["default"]), verify_images=False, progress=False)
    default = anchor_grid(get_model_config(0), DEFAULT_SCALES, DEFAULT_RATIOS, size)
    write_anchors(projects["fitted"], yaml_lines(fit_anchors(dataset_boxes(train, size)[0], default)))
    return projects


def run(args: argparse.Namespace) -> int:
    projects = write_bars(args.out, args.size, args.num_train, args.num_val, tuple(args.aspect), args.seed)
    root = args.out / "datasets" / "bars"
    train = CocoDataset(root, "train", load_project(projects["default"]), verify_images=False, progress=False)
    val = CocoDataset(root, "val", load_project(projects["default"]), verify_images=False, progress=False)
    rows: List[Dict[str, object]] = []
    for name, path in projects.items():
        project = load_project(path)
        row: Dict[str, object] = {"anchors": name, "scales": project.anchors_scales, "ratios": project.anchors_ratios,
                                  "train_recall": recall(train, project.anchors_scales, project.anchors_ratios, args.size),
                                  "val_recall": recall(val, project.anchors_scales, project.anchors_ratios, args.size)}
        row.update(train_and_evaluate(args, name, path))
        rows.append(row)
    print(f"D0 from scratch, {args.steps} steps, batch {args.batch_size}, input {args.size}, seed {args.seed}, "
          f"--loss {args.loss}; "
          f"{args.num_train} train / {args.num_val} val images, aspect {args.aspect[0]:g}-{args.aspect[1]:g}")
    print(f"{'anchors':8s} {'train recall':>12s} {'val recall':>10s} {'mAP':>6s} {'AP50':>6s} {'train s':>8s}")
    for row in rows:
        print(f"{row['anchors']:8s} {row['train_recall']:12.4f} {row['val_recall']:10.4f} {row['mAP']:6.3f} "
              f"{row['AP50']:6.3f} {row['train_s']:8.0f}")
    if rows[0]["mAP"] > 0:
        print(f"mAP fitted / default: {rows[1]['mAP'] / rows[0]['mAP']:.2f}")
    else:
        print(f"mAP fitted {rows[1]['mAP']:.3f}, default 0: the default anchors learned nothing")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(run(parse_args()))
    except ScriptFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
