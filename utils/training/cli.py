"""The settings of a training run as a command line: ``train.py``'s flags, defined once for the script and for
:func:`utils.training.train` (same names). A setting of :data:`utils.training.settings.DEFAULTS` that is not given
parses as None, so that a resumed run (``-w last``) can tell an explicit value from a default."""
from __future__ import annotations

import argparse

from utils.config.cli import add_bool_arg, add_model_args
from utils.training.settings import SAVED_PATH_DEFAULT

DESCRIPTION = "Train or fine-tune EfficientDet on a COCO-format project."


def build_parser() -> argparse.ArgumentParser:
    """``train.py``'s parser; every setting of ``DEFAULTS`` defaults to None ("not given")."""
    p = argparse.ArgumentParser(description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, weights_flags=("-w", "--load_weights"),
                   weights_help="'last' (or 'latest') resumes this project's run exactly, with its settings; a .pth "
                                "fine-tunes from its weights; 'none' starts from scratch")
    add_recipe_args(p)
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
    add_bool_arg(p, "--debug", default=None, help="save training images with predicted boxes to test/ and, at the "
                                                  "start, a grid of augmented samples to the log folder")
    p.add_argument("--lr_schedule", choices=("plateau", "cosine"),
                   help="ReduceLROnPlateau(patience 3) as published, or warm-up + cosine (official)")
    p.add_argument("--warmup_epochs", type=float, help="cosine schedule: linear warm-up length")
    add_bool_arg(p, "--ema", default=None, help="keep an EMA of the weights (decay --ema_decay)")
    p.add_argument("--ema_decay", type=float, help="EMA decay per step")
    add_bool_arg(p, "--amp", default=None, help="mixed precision: bf16 on CPU, fp16 on CUDA")
    add_bool_arg(p, "--grad_checkpoint", default=None,
                 help="activation checkpointing: less memory for about one more forward per step")
    add_bool_arg(p, "--channels_last", default=None,
                 help="channels-last activations (None: on for the CPU, 2-4x faster convolutions there; False gives "
                      "the plain layout's bit-exact numbers, the layout differs by float round-off only)")
    p.add_argument("--clip_grad", type=float, help="gradient clipping max norm (0: off; official 10)")
    p.add_argument("--input_size", type=int, help="None: the model's; else a multiple of 128")
    p.add_argument("--backbone_weights", default=None, help="ImageNet EfficientNet state_dict for the backbone")
    p.add_argument("--loss", choices=("yaep", "official"), help="loss formulation (None: the project's 'loss' "
                                                                 "key, else yaep)")
    add_bool_arg(p, "--no_flip", default=None, help="disable horizontal flip augmentation")
    add_bool_arg(p, "--scale_jitter", default=None, help="random scale 0.1-2.0 + crop (official recipe)")
    add_augment_args(p)
    add_bool_arg(p, "--val_map", default=None, help="'best' by validation COCO mAP instead of loss")
    add_bool_arg(p, "--skip_bad_images", default=None,
                 help="leave out unreadable or truncated images (counted) instead of stopping")
    p.add_argument("--bn_momentum", type=float,
                   help="BatchNorm momentum while training (None: the official 0.01; from-scratch runs on small "
                        "data may prefer 0.1 so that the running statistics used at evaluation converge quickly)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:N (None: the YAML's num_gpus: 0 is the CPU, else CUDA when "
                                    "available)")
    return p


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """``--recipe`` (:mod:`utils.training.recipes`) and the settings its recipes brought: ``--head_only_epochs``,
    ``--lr_batch``."""
    p.add_argument("--recipe", help="a recipe of settings under the explicit flags: a name of recipes/ (published, "
                                    "official, scratch, finetune) or a FILE.yml")
    p.add_argument("--head_only_epochs", type=float,
                   help="freeze the backbone and the BiFPN for this many epochs first, then train everything (0: off)")
    p.add_argument("--lr_batch", type=int,
                   help="the total batch size --lr is given for: the run takes lr * batch_size / lr_batch (0: lr as "
                        "is; official: lr 0.08 for batch 64)")


def add_augment_args(p: argparse.ArgumentParser) -> None:
    """The flags of :mod:`efficientdet.augment` (``AUGMENT_SETTINGS``): probabilities and strengths, 0 = off."""
    p.add_argument("--vflip", type=float, help="vertical flip probability in [0, 1] (0: off; e.g. 0.5)")
    p.add_argument("--mosaic", type=float, help="probability in [0, 1] of a 4-image mosaic (0: off; e.g. 0.5)")
    p.add_argument("--hsv_h", type=float, help="hue shift, fraction of the circle in [0, 0.5] (0: off; e.g. 0.015)")
    p.add_argument("--hsv_s", type=float, help="saturation gain 1 +- g, g in [0, 1] (0: off; e.g. 0.7)")
    p.add_argument("--hsv_v", type=float, help="value (brightness) gain 1 +- g, g in [0, 1] (0: off; e.g. 0.4)")
    p.add_argument("--affine_scale", type=float, help="random scale 1 +- s, s in [0, 1) (0: off; e.g. 0.5)")
    p.add_argument("--affine_translate", type=float, help="random shift +- t x image side, t in [0, 1] (0: off; e.g. 0.1)")
    p.add_argument("--affine_rotate", type=float, help="random rotation +- degrees in [0, 180] (0: off; e.g. 10)")
