"""Train or fine-tune EfficientDet on a COCO-format project.

    python train.py -c 0 -p shape --batch_size 8 --lr 1e-4 --num_epochs 50 -w weights/efficientdet-d0.pth
    python train.py -c 0 -p shape --head_only True -w weights/efficientdet-d0.pth   # published forms work
    python train.py -c 0 -p shape -w last                 # resume exactly where the last run stopped
    torchrun --nproc_per_node 2 train.py -c 0 -p shape    # DistributedDataParallel (NCCL / gloo)

Data: ``{data_path}/{project_name}/{train_set|val_set}/*.jpg`` and
``{data_path}/{project_name}/annotations/instances_{set}.json``, described by ``projects/PROJECT.yml``.
The YAML's ``num_gpus``: 0 trains on the CPU, N > 1 starts N DistributedDataParallel processes
(one per GPU; gloo on the CPU when ``--device cpu``); ``--batch_size`` is the total over them, split
evenly (it must be a multiple of N), as in the published code.

The work is :func:`utils.training.run_training` (the loop: ``utils/training/``; the flags:
:func:`utils.training.cli.build_parser`; from Python: :func:`utils.training.train`, same names). Checkpoints
(``utils/weights/checkpoints.py``): ``{saved_path}/{project_name}/efficientdet-d{c}_{epoch}_{step}.pth``
is a plain state_dict as the published ``train.py`` wrote (EMA weights with ``--ema``), with the
training state beside it in ``.state.pt``; written every ``--save_interval`` steps, at each epoch end
and on Ctrl+C / SIGTERM (then the exit status is 130 / 143), plus ``..._best.pth``.
``-w last`` resumes exactly from the most recent save, with every setting of the saved run (those of
``utils.training.settings.DEFAULTS``: input size, batch size, workers, augmentation, loss, optimizer, schedule,
EMA, AMP, seed, validation, paths...); a flag given on the command line wins (one line each). ``-w FILE.pth``
fine-tunes from its weights, the step counter continuing from a published-style name (warm-up and cosine then
span the steps left). A second run on the same checkpoint folder stops at once, naming the first.
Logs: tqdm, TensorBoard scalars and ``train_log.jsonl`` under ``{log_path}/{project_name}/``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from utils.config.cli import run_script
from utils.training import run_training
from utils.training.cli import build_parser
from utils.training.settings import DEFAULTS

__all__ = ["parse_args", "main"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line; a setting of ``DEFAULTS`` that is not given is None (a resumed run keeps the saved one)."""
    p = build_parser()
    p.set_defaults(**DEFAULTS)  # shown by --help; a first parse reports bad flags with them
    p.parse_args(argv)
    p.set_defaults(**dict.fromkeys(DEFAULTS))  # then None marks what was not given
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    return run_script(run_training, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
