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

The work is :func:`utils.training.run_training` (the loop: ``utils/training/``). Checkpoints
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

from utils.config.cli import add_bool_arg, add_model_args, run_script
from utils.training import run_training
from utils.training.settings import DEFAULTS, SAVED_PATH_DEFAULT

__all__ = ["parse_args", "main"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line; a setting of ``DEFAULTS`` that is not given is None (a resumed run keeps the saved one)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, weights_flags=("-w", "--load_weights"),
                   weights_help="'last' (or 'latest') resumes this project's run exactly, with its settings; a .pth "
                                "fine-tunes from its weights; 'none' starts from scratch")
    p.add_argument("-n", "--num_workers", type=int, help="DataLoader workers")
    p.add_argument("--batch_size", type=int,
                   help="images per step in total; split evenly over the processes of num_gpus / torchrun")
    add_bool_arg(p, "--head_only", default=None, help="freeze the backbone and the BiFPN")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--optim", type=str.lower, choices=("adamw", "sgd"),
                   help="adamw or sgd (Nesterov momentum 0.9, the official recipe); the published advice: adamw "
                        "until the very final stage, then sgd")
    p.add_argument("--weight_decay", type=float, help="None: the optimizer's own (AdamW 1e-2, SGD 0); official 4e-5")
    p.add_argument("--num_epochs", type=int, help="epochs in total")
    p.add_argument("--max_steps", type=int, help="stop after this many steps in total (0: no limit)")
    p.add_argument("--val_interval", type=int, help="validate every N epochs")
    p.add_argument("--save_interval", type=int, help="checkpoint every N steps")
    p.add_argument("--es_min_delta", type=float, help="early stopping: minimum improvement")
    p.add_argument("--es_patience", type=int, help="early stopping: epochs without improvement (0: off)")
    p.add_argument("--data_path", help="root holding PROJECT_NAME/ dataset folders")
    p.add_argument("--log_path", help="logs go to LOG_PATH/PROJECT_NAME/")
    p.add_argument("--saved_path", default=SAVED_PATH_DEFAULT, help="checkpoints go to SAVED_PATH/PROJECT_NAME/")
    add_bool_arg(p, "--debug", default=None, help="save training images with predicted boxes to test/")
    p.add_argument("--lr_schedule", choices=("plateau", "cosine"),
                   help="ReduceLROnPlateau(patience 3) as published, or warm-up + cosine (official)")
    p.add_argument("--warmup_epochs", type=float, help="cosine schedule: linear warm-up length")
    add_bool_arg(p, "--ema", default=None, help="keep an EMA of the weights (decay --ema_decay)")
    p.add_argument("--ema_decay", type=float, help="EMA decay per step")
    add_bool_arg(p, "--amp", default=None, help="mixed precision: bf16 on CPU, fp16 on CUDA")
    add_bool_arg(p, "--grad_checkpoint", default=None,
                 help="activation checkpointing: less memory for about one more forward per step")
    p.add_argument("--clip_grad", type=float, help="gradient clipping max norm (0: off; official 10)")
    p.add_argument("--input_size", type=int, help="None: the model's; else a multiple of 128")
    p.add_argument("--backbone_weights", default=None, help="ImageNet EfficientNet state_dict for the backbone")
    p.add_argument("--loss", choices=("yaep", "official"), help="loss formulation (None: the project's 'loss' "
                                                                 "key, else yaep)")
    add_bool_arg(p, "--no_flip", default=None, help="disable horizontal flip augmentation")
    add_bool_arg(p, "--scale_jitter", default=None, help="random scale 0.1-2.0 + crop (official recipe)")
    add_bool_arg(p, "--val_map", default=None, help="'best' by validation COCO mAP instead of loss")
    add_bool_arg(p, "--skip_bad_images", default=None,
                 help="leave out unreadable or truncated images (counted) instead of stopping")
    p.add_argument("--bn_momentum", type=float,
                   help="BatchNorm momentum while training (None: the official 0.01; from-scratch runs on small "
                        "data may prefer 0.1 so that the running statistics used at evaluation converge quickly)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:N (None: the YAML's num_gpus: 0 is the CPU, else CUDA when "
                                    "available)")
    p.set_defaults(**DEFAULTS)  # shown by --help; a first parse reports bad flags with them
    p.parse_args(argv)
    p.set_defaults(**dict.fromkeys(DEFAULTS))  # then None marks what was not given
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    return run_script(run_training, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
