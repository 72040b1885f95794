"""Measure how well a project's anchors fit its training boxes, and propose anchors that fit better.

    python tools/fit_anchors.py -c 0 -p shape               # report, propose, print the two YAML lines
    python tools/fit_anchors.py -c 0 -p shape --write       # also write them into projects/shape.yml

Boxes are mapped as the training loader maps them at the model's input size (letterbox). Printed: the
best-possible recall (share of boxes whose best anchor reaches IoU 0.5, the positive IoU of both losses),
the best-IoU quantiles, per class and per size band, the boxes no level can cover; then the same for the
proposed ``anchors_scales`` / ``anchors_ratios`` (:func:`efficientdet.anchor_fit.fit_anchors`). 3 scales ×
3 ratios by default, so the heads keep their shape and COCO checkpoints still load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from efficientdet.anchor_fit import (anchor_grid, dataset_boxes, fit_anchors, format_report,  # noqa: E402
                                     measure_anchors, yaml_lines)
from backbone import check_input_size  # noqa: E402
from efficientdet.config import get_model_config  # noqa: E402
from efficientdet.dataset import CocoDataset  # noqa: E402
from utils.config.cli import add_model_args, run_script  # noqa: E402
from utils.config.project import load_project, write_anchors  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, project_default="shape", weights_flags=())
    parser.add_argument("--data_path", default="datasets/", help="root of the datasets (default datasets/)")
    parser.add_argument("--input_size", type=int, default=None, help="input side (default: the model's)")
    parser.add_argument("--num_scales", type=int, default=3, help="anchor scales to propose (default 3)")
    parser.add_argument("--num_ratios", type=int, default=3, help="anchor ratios to propose (default 3)")
    parser.add_argument("--write", action="store_true",
                        help="write the proposed anchors into the project YAML (comments kept)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    project = load_project(args.project)
    config = get_model_config(args.compound_coef)
    size = args.input_size or config.input_size
    check_input_size(config, size, size)  # a size the network cannot take is an error, not a report
    # Only the annotations and the image sizes they record are read: no image file is opened.
    dataset = CocoDataset(Path(args.data_path) / project.project_name, project.train_set, project,
                          verify_images=False, progress=False)
    boxes, labels = dataset_boxes(dataset, size)
    current = anchor_grid(config, project.anchors_scales, project.anchors_ratios, size)
    before = measure_anchors(boxes, labels, project.obj_list, current)
    print(f"{config.name} at input {size}: {len(boxes)} boxes in {len(dataset)} images of "
          f"{dataset.annotation_file}")
    print("\n".join(format_report(before, "project anchors")))
    print(f"  (a box below 0.5: never a positive with --loss yaep, not learned; with --loss official its best anchor "
          f"is forced to be its only positive; this project trains with {project.loss})")
    proposed = fit_anchors(boxes, current, args.num_scales, args.num_ratios)
    after = measure_anchors(boxes, labels, project.obj_list, proposed)
    print("\n".join(format_report(after, "proposed anchors")))
    if (args.num_scales, args.num_ratios) != (len(current.scales), len(current.ratios)):
        print(f"note: {args.num_scales} x {args.num_ratios} anchors per position changes the heads' output layers: "
              "checkpoints with the old count (the COCO ones: 3 x 3) load without them, which train from scratch")
    lines = yaml_lines(proposed)
    print("\n".join(lines))
    if args.write:
        path = write_anchors(project.path, lines)
        print(f"wrote the anchors into {path}")
    return 0


def main(args: argparse.Namespace) -> int:
    return run_script(run, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
