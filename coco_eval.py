"""COCO-style bbox evaluation of an EfficientDet checkpoint (pycocotools)::

    python coco_eval.py -c 0 -p coco -w weights/efficientdet-d0.pth

The published options keep their meaning: ``-p``, ``-c``, ``-w``, ``--nms_threshold``, ``--cuda BOOL`` (default
True: CUDA, else the CPU with a note), ``--device N`` (or ``cpu``, ``cuda:N``), ``--float16 BOOL``, ``--override
BOOL`` (default True: run the model); booleans also take ``true/false``, ``1/0``, a bare ``--flag``. Data as
published: ``{data_path}/{project_name}/{val_set}/`` and ``.../annotations/instances_{val_set}.json``.

The detections are the published evaluation's: ``preprocess`` -> model -> ``postprocess`` (boxes clipped to
the network input) -> ``invert_affine`` -> xywh, each value the float32 number the published script writes;
``--clip_boxes`` also clips boxes to the original image. They go to ``{output}/{val_set}_bbox_results.json``
(default: the current directory) with a provenance record beside it (:func:`utils.evaluation.evaluation_provenance`:
hashes of weights, annotations and results, every setting that shapes them, ``--clip_boxes`` included), both
written atomically. ``--override False`` re-scores that file without running the model only when its record
proves the same weights, annotations and settings; otherwise the model runs and one line says why (published:
re-scored whatever file was there). Prints pycocotools' 12 numbers and each class's AP (``--save_json``: also as
JSON). A checkpoint of another class count, or holding NaN or inf values, is refused (one line naming it).

The work is :func:`utils.evaluation.api.run_evaluation` (the flags: :func:`utils.evaluation.cli.build_parser`; from
Python: :func:`utils.evaluation.evaluate`, same names, returning the metrics).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from utils.config.cli import run_script
from utils.evaluation.api import check_args, compute_results, run_evaluation
from utils.evaluation.cli import build_parser
from utils.inference import Detector

__all__ = ["parse_args", "main", "evaluate", "check_args", "compute_results", "Detector"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of the evaluator."""
    return build_parser().parse_args(argv)


def evaluate(args: argparse.Namespace) -> int:
    """The work of :func:`main` (messages printed); ValueError / FileNotFoundError on bad input."""
    run_evaluation(args, log=print, compute=compute_results)
    return 0


def main(args: argparse.Namespace) -> int:
    """Evaluate; bad input gives one line on stderr and exit status 1."""
    return run_script(evaluate, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
