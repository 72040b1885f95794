"""The training loop: :class:`Trainer` runs one process of a training run (the whole run, or one rank of a
DistributedDataParallel group), from the command-line settings to the last checkpoint.

It wires together the project and model (:mod:`backbone`), the data
(:func:`efficientdet.dataset.create_dataloaders`), the loss (:class:`utils.training.parts.ModelWithLoss`), the
last-finite-state guard, checkpoints (:mod:`utils.weights.checkpoints`, :mod:`utils.training.state`), validation (loss,
optionally COCO mAP through the one :class:`utils.inference.detector.Detector`) and the run's log
(:mod:`utils.training.reporting`). Stop signals are checked between batches in every phase; whatever stops a
run saves a checkpoint first.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from backbone import EfficientDet, build_model, check_input_size
from efficientdet.anchor_fit import anchor_fit_warning
from efficientdet.config import get_model_config
from efficientdet.dataset import DataBundle, annotation_path, create_dataloaders
from efficientdet.loss import DetectionLoss
from utils.weights.checkpoints import ResumePoint, best_name, checkpoint_name, save_checkpoint, save_weights
from utils.config.device import select_device
from utils.evaluation import evaluate_detector
from utils.inference.detector import Detector
from utils.inference.postprocess import EVAL_THRESHOLDS
from utils.config.project import ProjectConfig, load_project
from utils.training.parts import (FiniteGuard, Interrupted, ModelEMA, ModelWithLoss, ResumableSampler, StopRequest,
                                  distributed_context, freeze_backbone_and_bifpn, load_backbone_weights)
from utils.training.reporting import DEBUG_DIR, RunLog, save_debug_image
from utils.training.state import (build_optimizer, build_scheduler, initial_run_state, resolve_settings,
                                  resolve_weights, seed_everything, training_state)
from utils.weights.loading import load_weights, remove_stale_temp_files

MAX_BAD_STEPS = 10  # consecutive non-finite steps before the run stops


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
        self.loss_name = args.loss or self.project.loss
        seed_everything(args.seed)
        # Tiny Adam second moments and activations become denormal floats, which run 10-100x slower
        # on CPUs; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)

        self.data = self._create_loaders(args)
        self.train_loader, self.val_loader = self.data.train_loader, self.data.val_loader
        self._check_anchors(args)
        self.train_sampler: ResumableSampler = self.train_loader.sampler

        self.model = self._build_model(args, resume)
        self.net: nn.Module = ModelWithLoss(self.model, DetectionLoss(self.loss_name, from_logits=True))
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(args, params)
        self.scheduler = build_scheduler(args, self.optimizer, len(self.train_loader))
        self.amp_dtype = (torch.float16 if self.device.type == "cuda" else torch.bfloat16) if args.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=bool(args.amp and self.device.type == "cuda"))
        self.ema = ModelEMA(self.model, args.ema_decay) if args.ema else None
        self.run_log = RunLog(self.log_dir, f"{self.config.name} {name}", enabled=self.is_main)
        self.state = initial_run_state(resume, args, self.model, self.optimizer, self.scheduler, self.scaler,
                                       self.ema, self._lr_given, len(self.train_loader), self.log)
        self.guard = FiniteGuard(self.model, self.optimizer)
        self.rolled_back = False  # the model was just restored by the guard
        self.confirmed = True     # the last step started from weights of a step that went well

    def _create_loaders(self, args: argparse.Namespace) -> DataBundle:
        """The train and val data loaders of this process (each rank its own share); at least one train batch."""
        data = create_dataloaders(
            self.project, args.data_path, self.input_size, self.batch_size, num_workers=args.num_workers,
            flip=not args.no_flip, scale_jitter=args.scale_jitter, seed=args.seed,
            pin_memory=self.device.type == "cuda", skip_bad_images=args.skip_bad_images,
            sampler=lambda dataset, train: ResumableSampler(len(dataset), shuffle=train, seed=args.seed,
                                                             rank=self.rank, world_size=self.world))
        if len(data.train_loader) == 0:
            raise ValueError(f"{data.train_set.annotation_file}: {len(data.train_set)} training images, "
                             f"fewer than one batch of {self.batch_size}"
                             + (f" per process ({self.world} processes)" if self.world > 1 else "")
                             + ": lower --batch_size")
        return data

    def _check_anchors(self, args: argparse.Namespace) -> None:
        """Warn when the project's anchors leave more than 5 % of the training boxes without a positive anchor."""
        if self.is_main:
            warning = anchor_fit_warning(self.data.train_set, self.config, self.project.anchors_scales,
                                         self.project.anchors_ratios, self.input_size,
                                         f"python tools/fit_anchors.py -c {args.compound_coef} -p {args.project} "
                                         f"--data_path {args.data_path} --input_size {self.input_size}")
            if warning:
                self.log(f"warning: {warning}")

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

    def _build_model(self, args: argparse.Namespace, resume: Optional[ResumePoint]) -> EfficientDet:
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

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def save(self, name: Optional[str] = None) -> Optional[Path]:
        """Weights + training state (rank 0); never a file with a non-finite tensor."""
        if not self.is_main:
            return None
        filename = name or checkpoint_name(self.args.compound_coef, self.state.epoch, self.state.step)
        weights = (self.ema.module if self.ema else self.model).state_dict()
        extra = {"project": self.project.project_name, "compound_coef": self.args.compound_coef,
                 "num_classes": self.project.num_classes, "input_size": self.input_size}
        state = training_state(self.state, self.args, self.model, self.optimizer, self.scheduler, self.scaler,
                               self.ema, extra)
        return save_checkpoint(self.run_dir, filename, weights, state, self.args.compound_coef)

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

    def _val_map(self, model: EfficientDet) -> float:
        """COCO mAP@[.5:.95] of ``model`` on the val set (the evaluator's thresholds, ``EVAL_THRESHOLDS``)."""
        detector = Detector(model, self.project, input_size=self.input_size, device=self.device,
                            threshold=EVAL_THRESHOLDS.score, iou_threshold=EVAL_THRESHOLDS.iou)
        set_name = self.project.val_set
        metrics, _ = evaluate_detector(detector, self.data_root / set_name,
                                       annotation_path(self.data_root, set_name),
                                       self.project.obj_list, batch_size=self.batch_size)
        return float(metrics["AP"])

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
            self.run_log.close()

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
                self.run_log.scalars({"cls_loss": cls_loss, "reg_loss": reg_loss, "loss": cls_loss + reg_loss,
                                      "lr": lr}, state.step, state.epoch, "train")
                if args.debug and self.is_main:
                    save_debug_image(DEBUG_DIR / f"debug_e{state.epoch}_s{state.step}.jpg", images, self.last_outputs,
                                     self.project.mean, self.project.std, self.project.obj_list)
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
        self.run_log.plot()
        return stop

    def _validate_and_maybe_stop(self, epoch: int) -> bool:
        args, state = self.args, self.state
        metrics = self.validate()
        self.run_log.scalars(metrics, state.step, state.epoch, "val")
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
