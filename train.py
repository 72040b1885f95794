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

Checkpoints (``utils/checkpoints.py``): ``{saved_path}/{project_name}/efficientdet-d{c}_{epoch}_{step}.pth``
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
import json
import os
import random
import signal
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from backbone import EfficientDetBackbone, build_model, check_input_size
from efficientdet.config import get_model_config
from efficientdet.dataset import annotation_path, create_dataloaders
from efficientdet.loss import FocalLoss
from utils.checkpoints import (LEGACY_FORMAT, ResumePoint, best_name, checkpoint_name, find_resume_point,
                               save_checkpoint, save_weights, step_from_name)
from utils.cli import add_bool_arg, add_model_args, run_script
from utils.device import select_device
from utils.draw import draw_detections
from utils.evaluation import evaluate_detector
from utils.inference import Detector
from utils.plot import plot_training_log
from utils.postprocess import postprocess
from utils.project import ProjectConfig, load_project
from utils.training import (FiniteGuard, Interrupted, ModelEMA, ModelWithLoss, ResumableSampler, StopRequest,
                            freeze_backbone_and_bifpn, load_backbone_weights, warmup_cosine_lambda)
from utils.weights import extract_state_dict, load_weights, read_checkpoint, remove_stale_temp_files

MAX_BAD_STEPS = 10  # consecutive non-finite steps before the run stops
DEBUG_DIR = Path("test")  # --debug images, as published
# Settings a resumed run takes from its checkpoint unless given on the command line.
RESUMED_DEFAULTS = {"lr": 1e-4, "optim": "adamw", "num_epochs": 500}

__all__ = ["ModelWithLoss", "Trainer", "parse_args", "main"]


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


# --------------------------------------------------------------------------------------------------
# Run state


@dataclass
class RunState:
    epoch: int = 0              # current epoch (0-based)
    step: int = 0               # optimizer steps done in total
    epoch_step: int = 0         # batches done in the current epoch
    best_metric: float = float("inf")
    best_epoch: int = -1
    bad_steps: int = 0
    skipped_steps: int = 0
    pending_val: bool = False   # the finished epoch still needs its validation (interrupted during it)


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


def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch RNG states in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss], "python": random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


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


def resolve_weights(args: argparse.Namespace, run_dir: Path) -> Optional[ResumePoint]:
    """``-w``: None (from scratch), ``last``/``latest`` (exact resume), or a file (fine-tune; a file in
    the previous single-file checkpoint format resumes exactly, as it used to)."""
    value = args.load_weights
    if value is None or str(value).lower() == "none":
        return None
    if str(value).lower() in ("last", "latest"):
        return find_resume_point(run_dir, args.compound_coef)
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    checkpoint = read_checkpoint(path)
    return ResumePoint(path, checkpoint if checkpoint.get("format") == LEGACY_FORMAT else None)


def resolve_settings(args: argparse.Namespace, saved: Optional[Dict[str, Any]], log) -> argparse.Namespace:
    """Fill ``--lr``, ``--optim``, ``--num_epochs``: the command line's when given (logged when it replaces
    a saved value), else the resumed run's, else the defaults."""
    settings = argparse.Namespace(**vars(args))
    config = (saved or {}).get("config") or {}
    for key, default in RESUMED_DEFAULTS.items():
        given, before = getattr(args, key), config.get(key)
        if given is None:
            setattr(settings, key, before if before is not None else default)
        elif before is not None and given != before:
            log(f"--{key} {given} replaces the resumed run's {before}")
    return settings


class Trainer:
    """One training run (one process of a DDP group)."""

    def __init__(self, args: argparse.Namespace, stop: Optional[StopRequest] = None) -> None:
        self.rank, self.world, self.local_rank = distributed_context()
        self.is_main = self.rank == 0
        self.stop = stop or StopRequest()
        self.project: ProjectConfig = load_project(args.project)
        self.device = self._select_device(args)
        self.config = get_model_config(args.compound_coef)
        self.input_size = args.input_size or self.config.input_size
        self.batch_size = self._per_process_batch(args.batch_size)
        name = self.project.project_name
        self.run_dir = Path(args.saved_path) / name
        self.log_dir = Path(args.log_path) / name
        self.data_root = Path(args.data_path) / name
        if self.is_main:
            remove_stale_temp_files(self.run_dir)

        resume = resolve_weights(args, self.run_dir)
        saved = resume.state if resume is not None else None
        self._lr_given = args.lr is not None
        self.args = args = resolve_settings(args, saved, self.log)
        self.loss_name = args.loss or str(self.project.extra.get("loss", "yaep"))
        seed_everything(args.seed)
        # Tiny Adam second moments and activations become denormal floats, which run 10-100x slower
        # on CPUs; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)

        self.data = create_dataloaders(
            self.project, args.data_path, self.input_size, self.batch_size, num_workers=args.num_workers,
            flip=not args.no_flip, scale_jitter=args.scale_jitter, seed=args.seed,
            pin_memory=self.device.type == "cuda", skip_bad_images=args.skip_bad_images,
            sampler=lambda dataset, train: ResumableSampler(len(dataset), shuffle=train, seed=args.seed,
                                                             rank=self.rank, world_size=self.world))
        self.train_loader, self.val_loader = self.data.train_loader, self.data.val_loader
        self.train_sampler: ResumableSampler = self.train_loader.sampler
        if len(self.train_loader) == 0:
            raise ValueError(f"{self.data.train_set.annotation_file}: {len(self.data.train_set)} training images, "
                             f"fewer than one batch of {self.batch_size}"
                             + (f" per process ({self.world} processes)" if self.world > 1 else "")
                             + ": lower --batch_size")

        self.model = self._build_model(args, resume)
        self.net: nn.Module = ModelWithLoss(self.model, FocalLoss(self.loss_name, from_logits=True))
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(args, params)
        self.scheduler = build_scheduler(args, self.optimizer, len(self.train_loader))
        self.amp_dtype = (torch.float16 if self.device.type == "cuda" else torch.bfloat16) if args.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=bool(args.amp and self.device.type == "cuda"))
        self.ema = ModelEMA(self.model, args.ema_decay) if args.ema else None
        self.writer = None
        self.state = RunState()
        if saved is not None:
            self._restore(saved, resume.weights)
            self.log(f"resuming {resume.weights.name} at epoch {self.state.epoch}, step {self.state.step}, "
                     f"lr {self.optimizer.param_groups[0]['lr']:.3g}")
        elif resume is not None:
            self._continue_step_count(resume.weights)
        self.guard = FiniteGuard(self.model, self.optimizer)
        self.rolled_back = False  # the model was just restored by the guard
        self.confirmed = True     # the last step started from weights of a step that went well

    # ---------------------------------------------------------------------------------------------
    def _select_device(self, args: argparse.Namespace) -> torch.device:
        if self.world > 1:
            use_cuda = torch.cuda.is_available() and (args.device or "cuda") != "cpu"
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            return torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")
        if args.device is None and self.project.num_gpus == 0:
            return torch.device("cpu")  # the published meaning of num_gpus: 0
        return select_device(args.device)

    def _per_process_batch(self, batch_size: int) -> int:
        if batch_size < 1 or batch_size % self.world:
            raise ValueError(f"--batch_size {batch_size} is the total over {self.world} processes: "
                             f"use a positive multiple of {self.world}")
        per_process = batch_size // self.world
        check_input_size(self.config, self.input_size, self.input_size)
        top = self.input_size // self.config.max_stride
        if per_process * top * top < 2:
            raise ValueError(f"--batch_size {batch_size} ({per_process} per process) at input {self.input_size} "
                             f"leaves P{self.config.max_level} {top}x{top}: BatchNorm needs more than one value per "
                             f"channel while training; use --batch_size {2 * self.world} or more, or a larger "
                             "--input_size")
        return per_process

    def _build_model(self, args: argparse.Namespace, resume: Optional[ResumePoint]) -> EfficientDetBackbone:
        model = build_model(args.compound_coef, self.project)
        if args.backbone_weights:
            count = load_backbone_weights(model, args.backbone_weights)
            self.log(f"loaded {count} backbone tensors from {args.backbone_weights}")
        if resume is not None:
            skipped = load_weights(model, resume.weights)
            if skipped and resume.state is not None:
                raise ValueError(f"{resume.weights}: a checkpoint of {len(self.project.obj_list)} classes is needed "
                                 "to resume this run; pass the file with -w FILE to fine-tune from it instead")
            self.log(f"loaded weights from {resume.weights}" + (" (class output layer re-initialised)" if skipped else ""))
        if args.bn_momentum is not None:
            if not 0.0 < args.bn_momentum <= 1.0:
                raise ValueError(f"--bn_momentum must be in (0, 1], got {args.bn_momentum}")
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = args.bn_momentum
        if args.head_only:
            frozen = freeze_backbone_and_bifpn(model)
            self.log(f"--head_only: froze {len(frozen)} backbone and BiFPN tensors")
        if self.world > 1 and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model.to(self.device)

    def _continue_step_count(self, weights: Path) -> None:
        """``-w efficientdet-d0_9_3000.pth``: the step counter continues from the name (published)."""
        step = step_from_name(weights)
        if step:
            per_epoch = len(self.train_loader)
            self.state.step, self.state.epoch, self.state.epoch_step = step, step // per_epoch, step % per_epoch
            self.log(f"fine-tuning from {weights.name}: the step counter continues at {step} "
                     f"(epoch {self.state.epoch}), as the published train.py does")

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    # ---------------------------------------------------------------------------------------------
    def _training_state(self) -> Dict[str, Any]:
        return {
            "train_model": self.model.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": {"updates": self.ema.updates, "decay": self.ema.decay} if self.ema else None,
            "run": asdict(self.state), "rng": rng_state(),
            "config": {k: v for k, v in vars(self.args).items()},
            "project": self.project.project_name, "compound_coef": self.args.compound_coef,
            "num_classes": self.project.num_classes, "input_size": self.input_size,
        }

    def _restore(self, ckpt: Dict[str, Any], weights_file: Path) -> None:
        """Continue the saved run; explicit settings and a changed optimizer are handled, never a traceback."""
        try:
            self._restore_parts(ckpt, weights_file)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{weights_file}: incomplete training state ({type(exc).__name__}: {exc}); "
                             "pass it with -w FILE to fine-tune from its weights") from None

    def _restore_parts(self, ckpt: Dict[str, Any], weights_file: Path) -> None:
        args = self.args
        if int(ckpt.get("compound_coef", args.compound_coef)) != args.compound_coef:
            raise ValueError(f"{weights_file}: saved by a D{ckpt['compound_coef']} run, not -c {args.compound_coef}")
        if ckpt.get("train_model") is not None:
            self.model.load_state_dict(ckpt["train_model"])
        if self.ema is not None:
            ema = ckpt.get("ema")
            if ema:
                module = ema.get("module") or extract_state_dict(read_checkpoint(weights_file), str(weights_file))
                self.ema.load_state_dict({"module": module, "updates": ema["updates"], "decay": ema["decay"]})
            else:
                self.log("--ema: the resumed run had no EMA; it starts from the current weights")
        saved = ckpt.get("config") or {}
        same_optim = saved.get("optim", RESUMED_DEFAULTS["optim"]) == args.optim
        if same_optim:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        else:
            self.log(f"--optim {args.optim} replaces {saved.get('optim')}: the optimizer starts with fresh state")
        restored_schedule = same_optim and saved.get("lr_schedule", "plateau") == args.lr_schedule
        if restored_schedule:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        run = ckpt.get("run") or {k: ckpt[k] for k in ("epoch", "step", "epoch_step", "best_metric", "best_epoch")}
        self.state = RunState(**{k: v for k, v in run.items() if k in RunState.__dataclass_fields__})
        self.state.bad_steps = 0
        if self._lr_given or not restored_schedule:
            self._set_lr(args.lr)
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        elif "rng_torch" in ckpt:
            torch.set_rng_state(ckpt["rng_torch"])

    def _set_lr(self, lr: Optional[float]) -> None:
        """Make the optimizer's learning rate follow ``lr`` (the resolved ``--lr``) at the resumed step."""
        groups = self.optimizer.param_groups
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            self.scheduler.base_lrs = [lr] * len(groups)
            self.scheduler.last_epoch = self.state.step
            factor = self.scheduler.lr_lambdas[0](self.state.step)
            for group in groups:
                group["initial_lr"], group["lr"] = lr, lr * factor
        elif abs(groups[0]["lr"] - lr) > 1e-12 * max(lr, 1e-30):
            for group in groups:
                group["lr"] = lr

    def save(self, name: Optional[str] = None) -> Optional[Path]:
        """Weights + training state (rank 0); never a file with a non-finite tensor."""
        if not self.is_main:
            return None
        filename = name or checkpoint_name(self.args.compound_coef, self.state.epoch, self.state.step)
        weights = (self.ema.module if self.ema else self.model).state_dict()
        return save_checkpoint(self.run_dir, filename, weights, self._training_state(), self.args.compound_coef)

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
        """One optimizer step; None when the loss or the updated weights are not finite, in which case
        the model (BN statistics included) and the optimizer are back at the start of the last good step
        (see :class:`FiniteGuard`)."""
        self.guard.begin()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            cls_loss, reg_loss, outputs = self.net(images, annotations)
        self.last_outputs = tuple(t.detach() for t in outputs)
        loss = cls_loss + reg_loss
        if not self._on_all_ranks(bool(torch.isfinite(loss))):
            return self._roll_back()
        self.scaler.scale(loss).backward()
        if self.args.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not self.guard.is_finite():
            return self._roll_back()
        self.guard.accept()
        # A good step from weights just restored proves nothing about the step that failed after it,
        # so it does not end a run of bad steps.
        self.confirmed, self.rolled_back = not self.rolled_back, False
        if self.ema is not None:
            self.ema.update(self.model)
        return float(cls_loss.detach()), float(reg_loss.detach())

    def _roll_back(self) -> None:
        self.guard.restore()
        self.rolled_back, self.confirmed = True, False
        return None

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        net = self.net.module if isinstance(self.net, nn.parallel.DistributedDataParallel) else self.net
        eval_model = self.ema.module if self.ema is not None else self.model
        eval_net = ModelWithLoss(eval_model, net.criterion)
        was_training = self.model.training
        eval_model.eval()
        cls_total, reg_total, batches = 0.0, 0.0, 0
        try:
            for batch in tqdm(self.val_loader, desc="val", leave=False, disable=not self.is_main):
                self._check_stop()
                images, annotations = batch["img"].to(self.device), batch["annot"].to(self.device)
                with self._autocast():
                    cls_loss, reg_loss, _ = eval_net(images, annotations)
                cls_total += float(cls_loss)
                reg_total += float(reg_loss)
                batches += 1
        finally:
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
                                       annotation_path(self.data_root, set_name),
                                       self.project.obj_list, batch_size=self.batch_size)
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

    def _on_all_ranks(self, value: bool) -> bool:
        """``value`` and-ed over the DDP ranks (they must all take the same branch)."""
        if self.world == 1:
            return value
        flag = torch.tensor([1.0 if value else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def _check_stop(self) -> None:
        """Raise :class:`Interrupted` when a stop signal arrived (on any rank: all ranks stop together)."""
        if not self._on_all_ranks(not self.stop.requested):
            raise Interrupted(self.stop.name or "stop signal")

    def _resume_hint(self) -> str:
        return f"python train.py -c {self.args.compound_coef} -p {self.args.project} -w last"

    def run(self) -> int:
        """Train; returns the exit status (0, 1 after non-finite losses, 130/143 after a signal)."""
        self.model.train()
        if self.is_main:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stop.deferred = True
        try:
            return self._loop()
        except Interrupted:
            path = self.save()
            self.log(f"{self.stop.name or 'stop'}: checkpoint saved to {path}; resume with: {self._resume_hint()}")
            return self.stop.exit_code or 130
        except ValueError as exc:  # bad data found mid-run (maybe in a loader worker): keep the work, then report
            reason = str(exc).strip().splitlines()[-1].removeprefix("ValueError: ")
            try:
                path = self.save()
            except (ValueError, OSError):
                raise ValueError(reason) from None
            raise ValueError(f"{reason} (checkpoint saved to {path}; fix the data, then resume with: "
                             f"{self._resume_hint()})") from None
        finally:
            if self.writer is not None:
                self.writer.close()

    def _loop(self) -> int:
        args, state = self.args, self.state
        if args.max_steps and state.step >= args.max_steps:
            self.log(f"already at step {state.step}, --max_steps {args.max_steps}: nothing to train")
            return 0
        if state.pending_val:
            self._end_of_epoch(state.epoch - 1, save=False)
        while state.epoch < args.num_epochs:
            self._check_stop()
            self.train_sampler.set_epoch(state.epoch, state.epoch_step * self.batch_size)
            self.data.train_set.set_epoch(state.epoch)
            epoch_losses: List[float] = []
            bar = tqdm(self.train_loader, disable=not self.is_main, dynamic_ncols=True,
                       desc=f"epoch {state.epoch + 1}/{args.num_epochs}",
                       initial=state.epoch_step, total=state.epoch_step + len(self.train_loader))
            for batch in bar:
                self._check_stop()
                images, annotations = batch["img"].to(self.device), batch["annot"].to(self.device)
                losses = self.train_step(images, annotations)
                state.epoch_step += 1
                if losses is None:
                    if self._bad_step():
                        return 1
                    continue
                if self.confirmed:
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
                if args.max_steps and state.step >= args.max_steps:
                    self.save()
                    self.log(f"reached --max_steps {args.max_steps}")
                    return 0
            if args.lr_schedule == "plateau" and epoch_losses:
                self.scheduler.step(float(np.mean(epoch_losses)))
            state.epoch, state.epoch_step = state.epoch + 1, 0
            if self._end_of_epoch(state.epoch - 1):
                return 0
        return 0

    def _bad_step(self) -> bool:
        """Count a non-finite step (already undone); True when the run must stop."""
        state = self.state
        state.bad_steps += 1
        state.skipped_steps += 1
        self.log(f"step {state.step + 1}: non-finite loss or weights; step undone and skipped "
                 f"({state.bad_steps} in a row)")
        if state.bad_steps < MAX_BAD_STEPS:
            return False
        lr = self.optimizer.param_groups[0]["lr"]
        path = self.save()
        self.log(f"stopping: {MAX_BAD_STEPS} non-finite steps in a row at lr {lr:.3g}. The last weights that gave "
                 f"a finite loss are saved as {path}; resume from them with a lower learning rate: "
                 f"{self._resume_hint()} --lr {lr / 10:.3g} (or add --clip_grad 10)")
        return True

    def _end_of_epoch(self, finished_epoch: int, save: bool = True) -> bool:
        """Checkpoint, validate (every ``--val_interval`` epochs), plot; True to stop early."""
        args, state = self.args, self.state
        due = args.val_interval > 0 and (finished_epoch + 1) % args.val_interval == 0
        state.pending_val = due
        if save:
            self.save(checkpoint_name(args.compound_coef, finished_epoch, state.step))
        stop = due and self._validate_and_maybe_stop(finished_epoch)
        state.pending_val = False
        self._plot_curves()
        return stop

    def _validate_and_maybe_stop(self, epoch: int) -> bool:
        args, state = self.args, self.state
        metrics = self.validate()
        self._log_scalars(metrics, state.step, "val")
        key = "mAP" if args.val_map else "loss"
        value = -metrics[key] if key == "mAP" else metrics[key]
        self.log(f"val epoch {epoch + 1}: " + ", ".join(f"{k} {v:.5f}" for k, v in metrics.items()))
        if value + args.es_min_delta < state.best_metric:
            state.best_metric, state.best_epoch = value, epoch
            if self.is_main:
                save_weights((self.ema.module if self.ema else self.model).state_dict(),
                             self.run_dir / best_name(args.compound_coef))
        if args.es_patience > 0 and epoch - state.best_epoch > args.es_patience:
            self.log(f"early stopping at epoch {epoch + 1}: best {key} at epoch {state.best_epoch + 1}")
            return True
        return False


# --------------------------------------------------------------------------------------------------
# Processes


def train_process(args: argparse.Namespace) -> int:
    """One process's training, signals handled from the first line (nothing to save before training)."""
    with StopRequest() as stop:
        try:
            trainer = Trainer(args, stop)
            return trainer.run()
        except Interrupted:
            print(f"{stop.name}: stopped before training started; nothing to save", file=sys.stderr)
            return stop.exit_code
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    sys.exit(run_script(train_process, args))


def launch_workers(args: argparse.Namespace, world: int) -> int:
    """The YAML's ``num_gpus: N`` (N > 1) without torchrun: N processes on this machine, one per GPU
    (gloo on the CPU with ``--device cpu`` or without CUDA). Signals reach them; the first failing
    worker's exit status is returned."""
    use_cuda = torch.cuda.is_available() and (args.device or "cuda") != "cpu"
    if use_cuda and torch.cuda.device_count() < world:
        raise ValueError(f"num_gpus: {world} in {args.project}, but this machine has {torch.cuda.device_count()} "
                         "CUDA device(s): lower num_gpus")
    print(f"num_gpus: {world}: starting {world} training processes ({'NCCL' if use_cuda else 'gloo on the CPU'}), "
          f"{args.batch_size // max(1, world)} images each per step")
    context = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, world, port, args)) for rank in range(world)]
    for worker in workers:
        worker.start()

    def forward(signum, _frame):  # SIGTERM to this process only (a job scheduler): pass it on
        for worker in workers:
            if worker.is_alive() and worker.pid:
                os.kill(worker.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for worker in workers:
            worker.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [worker.exitcode or 0 for worker in workers]
    return next((code for code in codes if code), 0) if all(c >= 0 for c in codes) else 1


def run(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    world = load_project(args.project).num_gpus
    if world > 1 and "WORLD_SIZE" not in os.environ:
        if args.batch_size % world:
            raise ValueError(f"--batch_size {args.batch_size} is the total over {world} processes (num_gpus: "
                             f"{world}): use a multiple of {world}")
        return launch_workers(args, world)
    return train_process(args)


def main(args: argparse.Namespace) -> int:
    return run_script(run, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
