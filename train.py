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
``-w last`` resumes exactly from the most recent save; ``-w FILE.pth`` fine-tunes from its weights,
the step counter continuing from a published-style name. On resume an explicit ``--lr``, ``--optim``
or ``--num_epochs`` replaces the saved one (logged); a changed optimizer starts with fresh state.
Logs: tqdm, TensorBoard scalars and ``train_log.jsonl`` under ``{log_path}/{project_name}/``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from utils.config.cli import add_bool_arg, add_model_args, run_script
from utils.training import run_training

__all__ = ["parse_args", "main"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, weights_flags=("-w", "--load_weights"),
                   weights_help="'last' (or 'latest') resumes this project's run exactly; a .pth fine-tunes from its "
                                "weights; 'none' starts from scratch")
    p.add_argument("-n", "--num_workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batch_size", type=int, default=12,
                   help="images per step in total; split evenly over the processes of num_gpus / torchrun")
    add_bool_arg(p, "--head_only", help="freeze the backbone and the BiFPN")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4; on resume: the saved one)")
    p.add_argument("--optim", type=str.lower, choices=("adamw", "sgd"), default=None,
                   help="adamw (default) or sgd (Nesterov momentum 0.9, the official recipe); the published "
                        "advice: adamw until the very final stage, then sgd. On resume: the saved one")
    p.add_argument("--weight_decay", type=float, default=None,
                   help="default: the optimizer's own (AdamW 1e-2, SGD 0); official recipe 4e-5")
    p.add_argument("--num_epochs", type=int, default=None, help="epochs in total (default 500; on resume: saved)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps in total (0: no limit)")
    p.add_argument("--val_interval", type=int, default=1, help="validate every N epochs")
    p.add_argument("--save_interval", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--es_min_delta", type=float, default=0.0, help="early stopping: minimum improvement")
    p.add_argument("--es_patience", type=int, default=0, help="early stopping: epochs without improvement (0: off)")
    p.add_argument("--data_path", default="datasets/", help="root holding PROJECT_NAME/ dataset folders")
    p.add_argument("--log_path", default="logs/")
    p.add_argument("--saved_path", default="logs/", help="checkpoints go to SAVED_PATH/PROJECT_NAME/")
    add_bool_arg(p, "--debug", help="save training images with predicted boxes to test/")
    p.add_argument("--lr_schedule", choices=("plateau", "cosine"), default="plateau",
                   help="ReduceLROnPlateau(patience 3) as published, or warm-up + cosine (official)")
    p.add_argument("--warmup_epochs", type=float, default=1.0, help="cosine schedule: linear warm-up length")
    add_bool_arg(p, "--ema", help="keep an EMA of the weights (decay --ema_decay)")
    p.add_argument("--ema_decay", type=float, default=0.9998)
    add_bool_arg(p, "--amp", help="mixed precision: bf16 on CPU, fp16 on CUDA")
    p.add_argument("--clip_grad", type=float, default=0.0, help="gradient clipping max norm (0: off; official 10)")
    p.add_argument("--input_size", type=int, default=None, help="override the model's input size (multiple of 128)")
    p.add_argument("--backbone_weights", default=None, help="ImageNet EfficientNet state_dict for the backbone")
    p.add_argument("--loss", choices=("yaep", "official"), default=None,
                   help="loss formulation (default: the project's 'loss' key, else yaep)")
    add_bool_arg(p, "--no_flip", help="disable horizontal flip augmentation")
    add_bool_arg(p, "--scale_jitter", help="random scale 0.1-2.0 + crop (official recipe)")
    add_bool_arg(p, "--val_map", help="'best' by validation COCO mAP instead of loss")
    add_bool_arg(p, "--skip_bad_images", help="leave out unreadable or truncated images (counted) instead of stopping")
    p.add_argument("--bn_momentum", type=float, default=None,
                   help="BatchNorm momentum while training (default: the official 0.01; from-scratch runs on small "
                        "data may prefer 0.1 so that the running statistics used at evaluation converge quickly)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the YAML's num_gpus: 0 is the CPU, "
                                                  "else CUDA when available)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    return run_script(run_training, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
