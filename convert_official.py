"""Convert an official (google/automl) EfficientDet TensorFlow checkpoint into our state_dict.

    python convert_official.py -c 0 --ckpt efficientdet-d0/ -o weights/efficientdet-d0-official.pth

Takes the ``NAME/ExponentialMovingAverage`` shadows the released numbers use (``--raw``: the raw variables).
The mapping is :mod:`utils.weights.tf_convert`. The converted model must be built with ``pool_padding="official"``
and the official anchor ratios (``projects/coco_official.yml``); the output is a plain state_dict, written
atomically.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from efficientdet.config import get_model_config
from utils.config.cli import add_bool_arg, run_script
from utils.weights.tf_checkpoint import TFCheckpointReader
from utils.weights.tf_convert import convert
from utils.weights.loading import atomic_save

logger = logging.getLogger("convert_official")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert an official EfficientDet TF checkpoint to a PyTorch state_dict")
    parser.add_argument("-c", "--compound_coef", type=int, required=True, help="model: 0..8 (D0..D7x)")
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (with a 'checkpoint' file) or prefix")
    parser.add_argument("-o", "--output", required=True, help="output .pth path")
    parser.add_argument("--num_classes", type=int, default=90, help="classes of the checkpoint (90 for COCO)")
    add_bool_arg(parser, "--raw", help="use the raw variables instead of their moving averages (not the released numbers)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    config = get_model_config(args.compound_coef)
    reader = TFCheckpointReader(args.ckpt)
    state_dict = convert(reader, args.compound_coef, args.num_classes, use_ema=not args.raw)
    atomic_save(state_dict, Path(args.output))
    logger.info("wrote %s (%s, %d classes); build the model with pool_padding='official' and the official "
                "anchor ratios (projects/coco_official.yml)", args.output, config.name, args.num_classes)
    return 0


def main(args: argparse.Namespace) -> int:
    return run_script(run, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
