"""Train or fine-tune EfficientDet on a COCO-format project.

    python train.py -c 0 -p shape --batch_size 8 --lr 1e-4 --num_epochs 50 -w weights/efficientdet-d0.pth
    python train.py -c 0 -p shape -w last                 # resume exactly where the last run stopped
    torchrun --nproc_per_node 2 train.py -c 0 -p shape    # DistributedDataParallel (NCCL / gloo)

Data: ``{data_path}/{project_name}/{train_set|val_set}/*.jpg`` and
``{data_path}/{project_name}/annotations/instances_{set}.json``, described by ``projects/PROJECT.yml``.
Checkpoints: ``{saved_path}/{project_name}/efficientdet-d{c}_{epoch}_{step}.pth`` (every
``--save_interval`` steps, each epoch end, on Ctrl+C / SIGTERM) and ``..._best.pth``; all written
atomically. Logs: tqdm, TensorBoard scalars and ``train_log.jsonl`` under ``{log_path}/{project_name}/``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from backbone import EfficientDetBackbone, build_model
from efficientdet.config import get_model_config
from efficientdet.dataset import create_dataloaders
from efficientdet.loss import FocalLoss
from utils.device import select_device
from utils.draw import draw_detections
from utils.evaluation import evaluate_detector
from utils.inference import Detector
from utils.plot import plot_training_log
from utils.postprocess import postprocess
from utils.project import ProjectConfig, load_project
from utils.training import (CHECKPOINT_FORMAT, ModelEMA, ResumableSampler, checkpoint_name,
                            find_last_checkpoint, freeze_backbone_and_bifpn, is_training_checkpoint,
                            load_backbone_weights, warmup_cosine_lambda)
from utils.weights import atomic_save, load_weights, read_checkpoint
from utils.cli import add_bool_arg, run_script

MAX_BAD_STEPS = 10  # consecutive non-finite losses before the run stops
DEBUG_DIR = Path("test")  # --debug images, as published


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-p", "--project", default="coco", help="projects/PROJECT.yml, or a path to a YAML file")
    p.add_argument("-c", "--compound_coef", type=int, default=0, help="EfficientDet D0..D7x = 0..8")
    p.add_argument("-n", "--num_workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batch_size", type=int, default=12, help="images per batch (per process)")
    add_bool_arg(p, "--head_only", help="freeze the backbone and the BiFPN")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optim", choices=("adamw", "sgd"), default="adamw",
                   help="AdamW (published default) or SGD with Nesterov momentum 0.9 (official)")
    p.add_argument("--weight_decay", type=float, default=None,
                   help="default: the optimizer's own (AdamW 1e-2, SGD 0); official recipe 4e-5")
    p.add_argument("--num_epochs", type=int, default=500)
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps in total (0: no limit)")
    p.add_argument("--val_interval", type=int, default=1, help="validate every N epochs")
    p.add_argument("--save_interval", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--es_min_delta", type=float, default=0.0, help="early stopping: minimum improvement")
    p.add_argument("--es_patience", type=int, default=0, help="early stopping: epochs without improvement (0: off)")
    p.add_argument("--data_path", default="datasets/", help="root holding PROJECT_NAME/ dataset folders")
    p.add_argument("--log_path", default="logs/")
    p.add_argument("-w", "--load_weights", default=None,
                   help="a checkpoint path, 'last' to resume the latest run of this project, or 'none'")
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
    p.add_argument("--bn_momentum", type=float, default=None,
                   help="BatchNorm momentum while training (default: the official 0.01; from-scratch runs on small "
                        "data may prefer 0.1 so that the running statistics used at evaluation converge quickly)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Model with loss


class ModelWithLoss(nn.Module):
    """The detector and its loss in one module, so DDP wraps a single forward.

    ``forward(images Tensor[B, 3, S, S], annotations Tensor[B, M, 5] (x1, y1, x2, y2, class), input
    pixels, padded with -1)`` returns ``(cls_loss, reg_loss, outputs)`` with ``outputs`` =
    ``(regression, classification probabilities, anchors)`` for ``--debug`` drawing.
    """

    def __init__(self, model: EfficientDetBackbone, criterion: FocalLoss) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, images: Tensor, annotations: Tensor):
        model = self.model
        model.check_input_size(int(images.shape[2]), int(images.shape[3]))
        features = model.bifpn(model.backbone_net(images))
        regression = model.regressor(features)
        logits = model.classifier.forward_raw(features)
        anchors = model.anchors(images)
        cls_loss, reg_loss = self.criterion(logits, regression, anchors, annotations)
        return cls_loss, reg_loss, (regression, logits, anchors)


# --------------------------------------------------------------------------------------------------
# Run state


@dataclass
class RunState:
    epoch: int = 0              # current epoch (0-based)
    step: int = 0               # optimizer steps done in total
    epoch_step: int = 0         # batches done in the current epoch
    best_metric: float = math.inf
    best_epoch: int = -1
    bad_steps: int = 0
    skipped_steps: int = 0


class Interrupted(Exception):
    """Raised by the signal handler's flag check: save and stop."""


def distributed_context() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (data order and augmentation have their own seeded streams)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def build_optimizer(args: argparse.Namespace, params) -> torch.optim.Optimizer:
    kwargs: Dict[str, Any] = {}
    if args.weight_decay is not None:
        kwargs["weight_decay"] = args.weight_decay
    if args.optim == "adamw":
        return torch.optim.AdamW(params, args.lr, **kwargs)
    return torch.optim.SGD(params, args.lr, momentum=0.9, nesterov=True, **kwargs)


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    if args.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=3)
    total = max(1, args.num_epochs * steps_per_epoch)
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(total, warmup))


def resolve_weights(args: argparse.Namespace, run_dir: Path) -> Optional[Path]:
    value = args.load_weights
    if value is None or str(value).lower() == "none":
        return None
    if value == "last":
        return find_last_checkpoint(run_dir, args.compound_coef)
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


class Trainer:
    """One training run (one process of a DDP group)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rank, self.world, self.local_rank = distributed_context()
        self.is_main = self.rank == 0
        if self.world > 1:
            backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend=backend)
            device = torch.device("cuda", self.local_rank) if backend == "nccl" else torch.device("cpu")
        else:
            device = select_device(args.device)
        self.device = device
        self.project: ProjectConfig = load_project(args.project)
        self.config = get_model_config(args.compound_coef)
        self.input_size = args.input_size or self.config.input_size
        if self.input_size % self.config.max_stride:
            raise ValueError(f"--input_size {self.input_size} is not a multiple of {self.config.max_stride} "
                             f"(the stride of P{self.config.max_level} in {self.config.name})")
        top = self.input_size // self.config.max_stride
        if args.batch_size * top * top < 2:
            raise ValueError(f"--batch_size {args.batch_size} at input {self.input_size} leaves P{self.config.max_level} "
                             f"{top}x{top}: BatchNorm needs more than one value per channel while training; "
                             f"use --batch_size 2 or more, or a larger --input_size")
        name = self.project.project_name
        self.run_dir = Path(args.saved_path) / name
        self.log_dir = Path(args.log_path) / name
        self.loss_name = args.loss or str(self.project.extra.get("loss", "yaep"))
        seed_everything(args.seed)
        # Tiny Adam second moments and activations become denormal floats, which run 10-100x slower
        # on CPUs; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)

        self.data_root = Path(args.data_path) / name
        self.data = create_dataloaders(
            self.project, args.data_path, self.input_size, args.batch_size, num_workers=args.num_workers,
            flip=not args.no_flip, scale_jitter=args.scale_jitter, seed=args.seed,
            pin_memory=device.type == "cuda",
            sampler=lambda dataset, train: ResumableSampler(len(dataset), shuffle=train, seed=args.seed,
                                                             rank=self.rank, world_size=self.world))
        self.train_loader, self.val_loader = self.data.train_loader, self.data.val_loader
        self.train_sampler: ResumableSampler = self.train_loader.sampler

        model = build_model(args.compound_coef, self.project)
        self.state = RunState()
        self.resume_from: Optional[Dict[str, Any]] = None
        weights = resolve_weights(args, self.run_dir)
        if args.backbone_weights:
            count = load_backbone_weights(model, args.backbone_weights)
            self.log(f"loaded {count} backbone tensors from {args.backbone_weights}")
        if weights is not None:
            checkpoint = read_checkpoint(weights)
            skipped = load_weights(model, checkpoint)
            if is_training_checkpoint(checkpoint) and not skipped:
                self.resume_from = checkpoint
            self.log(f"loaded weights from {weights}" + (" (class output layer re-initialised)" if skipped else ""))
        if args.bn_momentum is not None:
            if not 0.0 < args.bn_momentum <= 1.0:
                raise ValueError(f"--bn_momentum must be in (0, 1], got {args.bn_momentum}")
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = args.bn_momentum
        if args.head_only:
            frozen = freeze_backbone_and_bifpn(model)
            self.log(f"--head_only: froze {len(frozen)} backbone and BiFPN tensors")
        if self.world > 1 and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device)
        self.model = model
        self.net = ModelWithLoss(model, FocalLoss(self.loss_name, from_logits=True))
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.local_rank] if device.type == "cuda" else None)

        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(args, params)
        self.scheduler = build_scheduler(args, self.optimizer, len(self.train_loader))
        self.amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=bool(args.amp and device.type == "cuda"))
        self.ema = ModelEMA(model, args.ema_decay) if args.ema else None
        self.writer = None
        self.stop_requested: Optional[str] = None
        if self.resume_from is not None:
            self._restore(self.resume_from)
            self.log(f"resuming at epoch {self.state.epoch}, step {self.state.step}, "
                     f"lr {self.optimizer.param_groups[0]['lr']:.3g}")

    # ---------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def _checkpoint(self) -> Dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": (self.ema.module if self.ema else self.model).state_dict(),
            "train_model": self.model.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "epoch": self.state.epoch, "step": self.state.step, "epoch_step": self.state.epoch_step,
            "best_metric": self.state.best_metric, "best_epoch": self.state.best_epoch,
            "skipped_steps": self.state.skipped_steps,
            "rng_torch": torch.get_rng_state(),
            "config": {k: v for k, v in vars(self.args).items()},
            "project": self.project.project_name, "compound_coef": self.args.compound_coef,
            "num_classes": self.project.num_classes, "input_size": self.input_size,
        }

    def _restore(self, ckpt: Dict[str, Any]) -> None:
        if ckpt.get("train_model") is not None:
            self.model.load_state_dict(ckpt["train_model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        s = self.state
        s.epoch, s.step, s.epoch_step = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt["epoch_step"])
        s.best_metric, s.best_epoch = float(ckpt["best_metric"]), int(ckpt["best_epoch"])
        s.skipped_steps = int(ckpt.get("skipped_steps", 0))
        torch.set_rng_state(ckpt["rng_torch"])

    def save(self, name: Optional[str] = None) -> Optional[Path]:
        if not self.is_main:
            return None
        filename = name or checkpoint_name(self.args.compound_coef, self.state.epoch, self.state.step)
        path = atomic_save(self._checkpoint(), self.run_dir / filename)
        return path

    def _log_scalars(self, values: Dict[str, float], step: int, prefix: str) -> None:
        if not self.is_main:
            return
        if self.writer is None:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(self.log_dir / "tensorboard"))
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        record = {"kind": prefix, "step": step, "epoch": self.state.epoch, **values}
        with open(self.log_dir / "train_log.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------------------------------------
    def _plot_curves(self) -> None:
        """Training curves to ``{log_path}/{project}/loss_curves.png`` (rank 0)."""
        log = self.log_dir / "train_log.jsonl"
        if self.is_main and log.exists():
            records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
            plot_training_log(records, self.log_dir / "loss_curves.png",
                              title=f"{self.config.name} {self.project.project_name}")

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def train_step(self, images: Tensor, annotations: Tensor) -> Optional[Tuple[float, float]]:
        """One optimizer step; None (and no update) when the loss is not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            cls_loss, reg_loss, outputs = self.net(images, annotations)
        self.last_outputs = tuple(t.detach() for t in outputs)
        loss = cls_loss + reg_loss
        if not bool(torch.isfinite(loss)):
            return None
        self.scaler.scale(loss).backward()
        if self.args.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        return float(cls_loss.detach()), float(reg_loss.detach())

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        net = self.net.module if isinstance(self.net, nn.parallel.DistributedDataParallel) else self.net
        eval_model = self.ema.module if self.ema is not None else self.model
        eval_net = ModelWithLoss(eval_model, net.criterion)
        was_training = self.model.training
        eval_model.eval()
        cls_total, reg_total, batches = 0.0, 0.0, 0
        for batch in tqdm(self.val_loader, desc="val", leave=False, disable=not self.is_main):
            images, annotations = batch["img"].to(self.device), batch["annot"].to(self.device)
            with self._autocast():
                cls_loss, reg_loss, _ = eval_net(images, annotations)
            cls_total += float(cls_loss)
            reg_total += float(reg_loss)
            batches += 1
        self.model.train(was_training)
        totals = torch.tensor([cls_total, reg_total, float(batches)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(totals)
        n = max(1.0, float(totals[2]))
        metrics = {"cls_loss": float(totals[0]) / n, "reg_loss": float(totals[1]) / n}
        metrics["loss"] = metrics["cls_loss"] + metrics["reg_loss"]
        if self.args.val_map:
            value = torch.tensor([self._val_map(eval_model) if self.is_main else 0.0], dtype=torch.float64)
            if self.world > 1:
                dist.broadcast(value, src=0)
            metrics["mAP"] = float(value[0])
            self.model.train(was_training)
        return metrics

    def _val_map(self, model: EfficientDetBackbone) -> float:
        """COCO mAP@[.5:.95] of ``model`` on the val set (the evaluator's defaults: 0.05 / NMS 0.5)."""
        detector = Detector(model, self.project, input_size=self.input_size, device=self.device,
                            threshold=0.05, iou_threshold=0.5)
        set_name = self.project.val_set
        metrics, _ = evaluate_detector(detector, self.data_root / set_name,
                                       self.data_root / "annotations" / f"instances_{set_name}.json",
                                       self.project.obj_list, batch_size=self.args.batch_size)
        return float(metrics["AP"])

    def _save_debug_image(self, images: Tensor) -> None:
        """--debug: the batch's first image with the boxes the model predicts now, to test/."""
        regression, logits, anchors = (t.detach().float() for t in self.last_outputs)
        dets = postprocess((int(images.shape[2]), int(images.shape[3])), anchors, regression[:1],
                           logits[:1].sigmoid(), threshold=0.5, iou_threshold=0.3, obj_list=self.project.obj_list)[0]
        mean = torch.tensor(self.project.mean).view(3, 1, 1)
        std = torch.tensor(self.project.std).view(3, 1, 1)
        rgb = (images[0].detach().float().cpu() * std + mean).clamp(0, 1).mul(255).byte()
        bgr = np.ascontiguousarray(rgb.permute(1, 2, 0).numpy()[..., ::-1])
        canvas = draw_detections(bgr, dets.boxes, dets.class_ids, dets.scores, dets.class_names)
        path = DEBUG_DIR / f"debug_e{self.state.epoch}_s{self.state.step}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), canvas)

    def _handle_signal(self, signum, _frame) -> None:
        self.stop_requested = signal.Signals(signum).name

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._handle_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.model.train()
        if self.is_main:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            return self._loop()
        except Interrupted:
            path = self.save()
            self.log(f"{self.stop_requested}: checkpoint saved to {path}; resume with -w last")
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.writer is not None:
                self.writer.close()

    def _loop(self) -> int:
        args, state = self.args, self.state
        while state.epoch < args.num_epochs:
            self.train_sampler.set_epoch(state.epoch, state.epoch_step * args.batch_size)
            self.data.train_set.set_epoch(state.epoch)
            epoch_losses: List[float] = []
            bar = tqdm(self.train_loader, disable=not self.is_main, dynamic_ncols=True,
                       desc=f"epoch {state.epoch + 1}/{args.num_epochs}",
                       initial=state.epoch_step, total=state.epoch_step + len(self.train_loader))
            for batch in bar:
                if self.stop_requested:
                    raise Interrupted()
                images, annotations = batch["img"].to(self.device), batch["annot"].to(self.device)
                losses = self.train_step(images, annotations)
                state.epoch_step += 1
                if losses is None:
                    state.bad_steps += 1
                    state.skipped_steps += 1
                    self.log(f"step {state.step}: non-finite loss, step skipped ({state.bad_steps} in a row)")
                    if state.bad_steps >= MAX_BAD_STEPS:
                        self.log(f"stopping: {MAX_BAD_STEPS} non-finite losses in a row; the last good "
                                 f"checkpoint in {self.run_dir} is kept (try a lower --lr or --clip_grad 10)")
                        return 1
                    continue
                state.bad_steps = 0
                state.step += 1
                if args.lr_schedule == "cosine":
                    self.scheduler.step()
                cls_loss, reg_loss = losses
                epoch_losses.append(cls_loss + reg_loss)
                lr = self.optimizer.param_groups[0]["lr"]
                bar.set_postfix(step=state.step, cls=f"{cls_loss:.4f}", reg=f"{reg_loss:.4f}", lr=f"{lr:.2e}")
                self._log_scalars({"cls_loss": cls_loss, "reg_loss": reg_loss, "loss": cls_loss + reg_loss,
                                   "lr": lr}, state.step, "train")
                if args.debug and self.is_main:
                    self._save_debug_image(images)
                if args.save_interval > 0 and state.step % args.save_interval == 0:
                    self.save()
                if self.stop_requested:
                    raise Interrupted()
                if args.max_steps and state.step >= args.max_steps:
                    self.save()
                    self.log(f"reached --max_steps {args.max_steps}")
                    return 0
            # End of epoch.
            if args.lr_schedule == "plateau" and epoch_losses:
                self.scheduler.step(float(np.mean(epoch_losses)))
            finished_epoch = state.epoch
            state.epoch, state.epoch_step = state.epoch + 1, 0
            self.save(checkpoint_name(args.compound_coef, finished_epoch, state.step))
            stop = args.val_interval > 0 and (finished_epoch + 1) % args.val_interval == 0 and \
                self._validate_and_maybe_stop(finished_epoch)
            self._plot_curves()
            if stop:
                return 0
        return 0

    def _validate_and_maybe_stop(self, epoch: int) -> bool:
        args, state = self.args, self.state
        metrics = self.validate()
        self._log_scalars(metrics, state.step, "val")
        key = "mAP" if args.val_map else "loss"
        value = -metrics[key] if key == "mAP" else metrics[key]
        self.log(f"val epoch {epoch + 1}: " + ", ".join(f"{k} {v:.5f}" for k, v in metrics.items()))
        if value + args.es_min_delta < state.best_metric:
            state.best_metric, state.best_epoch = value, epoch
            self.save(f"efficientdet-d{args.compound_coef}_best.pth")
        if args.es_patience > 0 and epoch - state.best_epoch > args.es_patience:
            self.log(f"early stopping at epoch {epoch + 1}: best {key} at epoch {state.best_epoch + 1}")
            return True
        return False


def run(args: argparse.Namespace) -> int:
    try:
        return Trainer(args).run()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(args: argparse.Namespace) -> int:
    return run_script(run, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
