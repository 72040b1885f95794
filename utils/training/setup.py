"""What one training process sets up from its settings before the first step: its device, its share of the
batch and its data loaders (with the anchor-fit warning). :class:`utils.training.trainer.Trainer` calls these."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from backbone import check_input_size
from efficientdet.anchor_fit import anchor_fit_warning
from efficientdet.augment import AUGMENT_SETTINGS, check_augmentations
from efficientdet.config import ModelConfig
from efficientdet.dataset import CocoDataset, DataBundle, create_dataloaders
from utils.config.device import select_device
from utils.config.project import ProjectConfig
from utils.training.parts import ResumableSampler, SignalSafeLoader
from utils.visual.draw import augmentation_grid


def training_device(args: argparse.Namespace, project: ProjectConfig, world: int, local_rank: int) -> torch.device:
    """``--device``, or the YAML's ``num_gpus: 0`` (the CPU, as published); under DDP the rank's GPU (NCCL) or
    the CPU (gloo), the process group initialised here."""
    if world > 1:
        use_cuda = torch.cuda.is_available() and (args.device or "cuda") != "cpu"
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if args.device is None and project.num_gpus == 0:
        return torch.device("cpu")  # the published meaning of num_gpus: 0
    return select_device(args.device)


def per_process_batch(batch_size: int, world: int, config: ModelConfig, input_size: int) -> int:
    """This process's share of ``--batch_size`` (the total over ``world`` processes); ValueError when it does
    not split evenly or leaves BatchNorm a single value per channel at the top level."""
    if batch_size < 1 or batch_size % world:
        raise ValueError(f"--batch_size {batch_size} is the total over {world} processes: "
                         f"use a positive multiple of {world}")
    per_process = batch_size // world
    check_input_size(config, input_size, input_size)
    top = input_size // config.max_stride
    if per_process * top * top < 2:
        raise ValueError(f"--batch_size {batch_size} ({per_process} per process) at input {input_size} "
                         f"leaves P{config.max_level} {top}x{top}: BatchNorm needs more than one value per "
                         f"channel while training; use --batch_size {2 * world} or more, or a larger --input_size")
    return per_process


def training_loaders(args: argparse.Namespace, project: ProjectConfig, input_size: int, batch_size: int,
                     device: torch.device, rank: int, world: int) -> DataBundle:
    """The train and val loaders of this process (each rank its own share, resumable sampling, workers started
    with the stop signals held back: :class:`SignalSafeLoader`); at least one train batch."""
    augment = {key: getattr(args, key, None) or 0.0 for key in AUGMENT_SETTINGS}
    check_augmentations(augment, prefix="--")
    data = create_dataloaders(
        project, args.data_path, input_size, batch_size, num_workers=args.num_workers,
        flip=not args.no_flip, scale_jitter=args.scale_jitter, seed=args.seed,
        pin_memory=device.type == "cuda", skip_bad_images=args.skip_bad_images, **augment,
        sampler=lambda dataset, train: ResumableSampler(len(dataset), shuffle=train, seed=args.seed,
                                                         rank=rank, world_size=world))
    if len(data.train_loader) == 0:
        raise ValueError(f"{data.train_set.annotation_file}: {len(data.train_set)} training images, "
                         f"fewer than one batch of {batch_size}"
                         + (f" per process ({world} processes)" if world > 1 else "")
                         + ": lower --batch_size")
    return data._replace(train_loader=SignalSafeLoader(data.train_loader), val_loader=SignalSafeLoader(data.val_loader))


def warn_anchor_fit(data: DataBundle, args: argparse.Namespace, project: ProjectConfig, config: ModelConfig,
                    input_size: int, log: Callable[[str], None]) -> None:
    """Warn when the project's anchors leave more than 5 % of the training boxes without a positive anchor."""
    warning = anchor_fit_warning(data.train_set, config, project.anchors_scales, project.anchors_ratios, input_size,
                                 f"python tools/fit_anchors.py -c {args.compound_coef} -p {args.project} "
                                 f"--data_path {args.data_path} --input_size {input_size}")
    if warning:
        log(f"warning: {warning}")


def save_debug_grid(train_set: CocoDataset, project: ProjectConfig, log_dir: Path,
                    log: Callable[[str], None]) -> Path:
    """``--debug``: a grid of the first 16 training samples as augmented (boxes drawn) to
    ``log_dir/augmentations.jpg``; logs and returns its path."""
    path = augmentation_grid(train_set, Path(log_dir) / "augmentations.jpg", project.mean, project.std)
    log(f"--debug: augmented training samples in {path}")
    return path
