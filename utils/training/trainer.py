"""The training loop: :class:`Trainer` runs one process of a training run (the whole run, or one rank of a
DistributedDataParallel group), from the command-line settings to the last checkpoint.

It wires together the project and model (:mod:`backbone`), the data
(:func:`efficientdet.dataset.create_dataloaders`), the loss (:class:`utils.training.parts.ModelWithLoss`), the
last-finite-state guard, checkpoints (:mod:`utils.weights.checkpoints`, :mod:`utils.training.state`), validation (loss,
optionally COCO mAP through the one :class:`utils.inference.detector.Detector`) and the run's log
(:mod:`utils.training.reporting`). Stop signals are checked between batches in every phase; whatever stops a
run leaves one checkpoint pair holding the point it reached (written then, unless the last save already holds
it), from which ``-w last`` continues exactly.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from backbone import EfficientDet, build_model
from efficientdet.config import get_model_config
from efficientdet.dataset import annotation_path
from efficientdet.loss import DetectionLoss
from utils.weights.checkpoints import ResumePoint, best_name, checkpoint_name, save_checkpoint, save_weights
from utils.inference.detector import Detector
from utils.inference.postprocess import EVAL_THRESHOLDS
from utils.config.project import ProjectConfig, load_project
from utils.training.parts import (FiniteGuard, Interrupted, ModelEMA, ModelWithLoss, ResumableSampler, SignalHook,
                                  StopRequest, distributed_context, freeze_backbone_and_bifpn, load_backbone_weights)
from utils.training.distributed import (agreed_batches, copy_from_rank0, on_all_ranks, same_on_all_ranks,
                                        sharded_val_map)
from utils.training.reporting import DEBUG_DIR, RunLog, save_debug_image
from utils.training.settings import resolve_settings, resume_command, write_run_settings
from utils.training.setup import per_process_batch, save_debug_grid, training_device, training_loaders, warn_anchor_fit
from utils.training.step import amp_dtype, optimizer_step
from utils.training.state import (build_optimizer, build_scheduler, initial_run_state, resolve_weights,
                                  head_only_phase, schedule_start, seed_everything, training_state)
from utils.weights.loading import HeadMismatchError, load_weights, remove_stale_temp_files

MAX_BAD_STEPS = 10  # consecutive non-finite steps before the run stops


class Trainer:
    """One training run (one process of a DDP group)."""

    def __init__(self, args: argparse.Namespace, stop: Optional[StopRequest] = None) -> None:
        self.rank, self.world, self.local_rank = distributed_context()
        self.is_main = self.rank == 0
        self.stop = stop or StopRequest()
        self.signal_hook, self.phase = SignalHook(), "setup"
        self.project: ProjectConfig = load_project(args.project)
        name = self.project.project_name
        self.run_dir = Path(args.saved_path) / name
        if self.is_main:
            remove_stale_temp_files(self.run_dir)
        resume = resolve_weights(args, self.run_dir)
        saved = (resume.state.get("config") or {}) if resume is not None and resume.state is not None else None
        self.args, self.given, self.sources = resolve_settings(args, saved, self.log)
        args = self.args
        self.device = training_device(args, self.project, self.world, self.local_rank)
        self.config = get_model_config(args.compound_coef)
        self.input_size = args.input_size or self.config.input_size
        self.batch_size = per_process_batch(args.batch_size, self.world, self.config, self.input_size)
        self.log_dir = Path(args.log_path) / name
        self.data_root = Path(args.data_path) / name
        self.loss_name = args.loss or self.project.loss
        seed_everything(args.seed)
        # Tiny Adam second moments and activations become denormal floats, which run 10-100x slower
        # on CPUs; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)

        self.data = training_loaders(args, self.project, self.input_size, self.batch_size, self.device, self.rank,
                                     self.world)
        self.train_loader, self.val_loader = self.data.train_loader, self.data.val_loader
        if self.is_main:
            warn_anchor_fit(self.data, args, self.project, self.config, self.input_size, self.log)
            if args.debug:  # the augmented samples, as a grid in the log folder
                save_debug_grid(self.data.train_set, self.project, self.log_dir, self.log)
        self.train_sampler: ResumableSampler = self.train_loader.sampler

        self.model = self._build_model(args, resume)
        self.net: nn.Module = ModelWithLoss(self.model, DetectionLoss(self.loss_name, from_logits=True),
                                                 channels_last=args.channels_last)
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(args, params)
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler = build_scheduler(args, self.optimizer, self.steps_per_epoch, schedule_start(resume), self.log)
        self.amp_dtype = amp_dtype(self.device, self.log) if args.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=bool(args.amp and self.device.type == "cuda"))
        self.ema = ModelEMA(self.model, args.ema_decay) if args.ema else None
        self.run_log = RunLog(self.log_dir, f"{self.config.name} {name}", enabled=self.is_main)
        self.state = initial_run_state(resume, args, self.model, self.optimizer, self.scheduler, self.scaler,
                                       self.ema, self.given, self.steps_per_epoch, self.log)
        # The save that holds this point of the run (the resumed one), and whether anything changed since.
        self.saved_as = resume.weights if resume is not None and resume.state is not None else None
        self.unsaved = False
        self.guard = FiniteGuard(self.model, self.optimizer)
        self.last_losses: Optional[Tuple[float, float]] = None  # (cls, reg) of the last good step
        self.last_verdict = "ok"  # of the last optimizer step: "ok", "skipped" or "restored" (optimizer_step)
        self.rolled_back = False  # the model was just restored by the guard
        self.confirmed = True     # the last step started from weights of a step that went well

    def _build_model(self, args: argparse.Namespace, resume: Optional[ResumePoint]) -> EfficientDet:
        model = build_model(args.compound_coef, self.project)
        if args.backbone_weights:
            count = load_backbone_weights(model, args.backbone_weights)
            self.log(f"loaded {count} backbone tensors from {args.backbone_weights}")
        if resume is not None:
            try:  # an exact resume needs the same anchor and class counts; a weights file fine-tunes across them
                load_weights(model, resume.weights, strict_classes=resume.state is not None)
            except HeadMismatchError as exc:
                raise ValueError(f"{exc}: cannot resume exactly; pass the file with -w FILE to fine-tune") from None
            self.log(f"loaded weights from {resume.weights}")
        if args.bn_momentum is not None:
            if not 0.0 < args.bn_momentum <= 1.0:
                raise ValueError(f"--bn_momentum must be in (0, 1], got {args.bn_momentum}")
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = args.bn_momentum
        if args.grad_checkpoint:
            model.set_grad_checkpointing(True)
        if args.head_only:
            frozen = freeze_backbone_and_bifpn(model)
            self.log(f"--head_only: froze {len(frozen)} backbone and BiFPN tensors")
        if self.world > 1 and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model.to(self.device)

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def save(self) -> Optional[Path]:
        """Weights + training state of the point the run is at (rank 0), named as published (at an epoch's end:
        the finished epoch); never a file with a non-finite tensor."""
        self.signal_hook("save")
        if not self.is_main:
            self.unsaved = False
            return None
        run = self.state
        epoch = run.epoch - 1 if run.epoch_step == 0 and run.epoch > 0 else run.epoch
        weights = (self.ema.module if self.ema else self.model).state_dict()
        extra = {"project": self.project.project_name, "compound_coef": self.args.compound_coef,
                 "num_classes": self.project.num_classes, "input_size": self.input_size}
        state = training_state(run, self.args, self.model, self.optimizer, self.scheduler, self.scaler, self.ema,
                               extra)
        self.saved_as = save_checkpoint(self.run_dir, checkpoint_name(self.args.compound_coef, epoch, run.step),
                                        weights, state, self.args.compound_coef)
        write_run_settings(self.run_dir, self.args, self.sources)  # they describe the checkpoints beside them
        self.unsaved = False
        return self.saved_as

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def train_step(self, images: Tensor, annotations: Tensor) -> Optional[Tuple[float, float]]:
        """One optimizer step (:func:`utils.training.step.optimizer_step`); None when it was not taken: a loss or
        gradient that is not finite skips it (weights, optimizer state and BN statistics stay as they were), and a
        weight it made non-finite puts back the guard's restore point (see :class:`FiniteGuard`)."""
        verdict, cls_loss, reg_loss, self.last_outputs = optimizer_step(
            self.net, self.optimizer, self.guard, images, annotations, self.amp_dtype, self.scaler,
            self.args.clip_grad, self._on_all_ranks)
        self.last_verdict = verdict
        if verdict != "ok":
            self.rolled_back = self.rolled_back or verdict == "restored"
            self.confirmed = False
            return None
        # A good step from weights just restored proves nothing about the step that failed after it,
        # so it does not end a run of bad steps.
        self.confirmed, self.rolled_back = not self.rolled_back, False
        if self.ema is not None:
            self.ema.update(self.model)
        return float(cls_loss), float(reg_loss)

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        net = self.net.module if isinstance(self.net, nn.parallel.DistributedDataParallel) else self.net
        eval_model = self.ema.module if self.ema is not None else self.model
        copy_from_rank0(eval_model, self.world)  # every rank validates the model rank 0 saves
        eval_net = ModelWithLoss(eval_model, net.criterion)
        was_training = self.model.training
        eval_model.eval()
        cls_total, reg_total, batches = 0.0, 0.0, 0
        try:
            for batch in tqdm(agreed_batches(self.val_loader, self._on_all_ranks), desc="val", leave=False,
                              total=len(self.val_loader), disable=not self.is_main):
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
            metrics["mAP"] = self._val_map(eval_model)
            self.model.train(was_training)
        return same_on_all_ranks(metrics, self.world, self.device)  # so early stopping is agreed

    def _val_map(self, model: EfficientDet) -> float:
        """COCO mAP@[.5:.95] of ``model`` on the val set (the evaluator's thresholds, ``EVAL_THRESHOLDS``), each
        rank detecting on its share of the images; the same value on every rank."""
        detector = Detector(model, self.project, input_size=self.input_size, device=self.device,
                            threshold=EVAL_THRESHOLDS.score, iou_threshold=EVAL_THRESHOLDS.iou)
        set_name = self.project.val_set
        return sharded_val_map(detector, self.data_root / set_name, annotation_path(self.data_root, set_name),
                               self.project.obj_list, self.batch_size, self.rank, self.world, self.device)

    def _on_all_ranks(self, value: bool) -> bool:
        """``value`` and-ed over the DDP ranks (they must all take the same branch)."""
        return on_all_ranks(value, self.world, self.device)

    def _check_stop(self) -> None:
        """Raise :class:`Interrupted` when a stop signal arrived (on any rank: all ranks stop together)."""
        if not self._on_all_ranks(not self.stop.requested):
            raise Interrupted(self.stop.name or "stop signal")
        self.signal_hook(self.phase)

    def run(self) -> int:
        """Train; returns the exit status (0, 1 after non-finite losses, 130/143 after a signal)."""
        self.model.train()
        if self.is_main:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stop.deferred = True
        try:
            return self._loop()
        except Interrupted:
            self.log(f"{self.stop.name or 'stop'}: {self._keep_work()}")
            return self.stop.exit_code or 130
        except ValueError as exc:  # bad data found mid-run (maybe in a loader worker): keep the work, then report
            reason = str(exc).strip().splitlines()[-1].removeprefix("ValueError: ")
            try:
                kept = self._keep_work("fix the data, then ")
            except (ValueError, OSError):
                raise ValueError(reason) from None
            raise ValueError(f"{reason} ({kept})") from None
        finally:
            self.run_log.close()

    def _keep_work(self, first: str = "") -> str:
        """Save the point the run reached unless a save holds it already (one pair per point); what to say."""
        resume = f"{first}resume with: {resume_command(self.args)}"
        if self.unsaved:
            return f"checkpoint saved to {self.save()}; {resume}"
        if self.saved_as is not None:
            return f"checkpoint {self.saved_as} holds this point; {resume}"
        return "stopped before the first step; nothing to save"

    def _finish(self) -> int:
        """The run ends (status 0), its last point saved (after the last validation)."""
        if self.unsaved:
            self.save()
        return 0

    def _nothing_to_do(self) -> Optional[str]:
        """One line when the run starts at its end (``--max_steps`` or ``--num_epochs``), else None."""
        args, state = self.args, self.state
        if args.max_steps and state.step >= args.max_steps:
            limit, flag = f"--max_steps {args.max_steps}", "--max_steps"
        elif state.epoch >= args.num_epochs:
            limit, flag = f"--num_epochs {args.num_epochs}", "--num_epochs"
        else:
            return None
        return (f"nothing to train: the run is at step {state.step} (epoch {state.epoch + 1}, {state.epoch_step} of its "
                f"{self.steps_per_epoch} steps done), and {limit} ends it there; give a larger {flag} to train on")

    def _loop(self) -> int:
        args, state = self.args, self.state
        if state.pending_val and self._end_of_epoch(state.epoch - 1, save=False):
            return self._finish()
        idle = self._nothing_to_do()
        if idle:
            self.log(idle)
            return self._finish()
        while state.epoch < args.num_epochs:
            self.phase = "epoch"
            self._check_stop()
            code = self._train_epoch()
            if code is not None:
                return code
        return self._finish()

    def _train_epoch(self) -> Optional[int]:
        """The rest of the current epoch, then its end; an exit status to stop with, or None to go on."""
        args, state = self.args, self.state
        self.train_sampler.set_epoch(state.epoch, state.epoch_step * self.batch_size)
        self.data.train_set.set_epoch(state.epoch)
        self.phase = "train"
        with tqdm(disable=not self.is_main, dynamic_ncols=True, initial=state.epoch_step, total=self.steps_per_epoch,
                  desc=f"epoch {state.epoch + 1}/{args.num_epochs}") as bar:  # closed, up to date, however we leave
            for batch in agreed_batches(self.train_loader, self._on_all_ranks):
                self._check_stop()
                images, annotations = batch["img"].to(self.device), batch["annot"].to(self.device)
                self.net = head_only_phase(self.net, self.model, args, state, self.steps_per_epoch, self.log)
                losses = self.train_step(images, annotations)
                state.epoch_step += 1
                self.unsaved = True
                bar.update()
                if losses is None:
                    if self._bad_step():
                        return 1
                elif self._after_step(losses, images, bar):
                    return 0
        if args.lr_schedule == "plateau" and state.epoch_losses:
            self.scheduler.step(float(np.mean(state.epoch_losses)))
        state.epoch, state.epoch_step, state.epoch_losses = state.epoch + 1, 0, []
        return self._finish() if self._end_of_epoch(state.epoch - 1) else None

    def _after_step(self, losses: Tuple[float, float], images: Tensor, bar: tqdm) -> bool:
        """Count, show, log and save a good step; True when it reached ``--max_steps``."""
        args, state = self.args, self.state
        if self.confirmed:
            state.bad_steps = 0
        state.step += 1
        lr = self.optimizer.param_groups[0]["lr"]  # the one this step took
        if args.lr_schedule == "cosine":
            self.scheduler.step()
        cls_loss, reg_loss = self.last_losses = losses
        state.epoch_losses.append(cls_loss + reg_loss)
        bar.set_postfix(step=state.step, cls=f"{cls_loss:.4f}", reg=f"{reg_loss:.4f}", lr=f"{lr:.2e}")
        self.run_log.scalars({"cls_loss": cls_loss, "reg_loss": reg_loss, "loss": cls_loss + reg_loss, "lr": lr},
                             state.step, state.epoch + 1, "train")
        if args.debug and self.is_main:
            save_debug_image(DEBUG_DIR / f"debug_e{state.epoch}_s{state.step}.jpg", images, self.last_outputs,
                             self.project.mean, self.project.std, self.project.obj_list)
        if args.save_interval > 0 and state.step % args.save_interval == 0:
            self.save()
        if args.max_steps and state.step >= args.max_steps:
            self.save()
            self.log(f"reached --max_steps {args.max_steps}")
            return True
        return False

    def _bad_step(self) -> bool:
        """Count a non-finite step (already undone); True when the run must stop."""
        state = self.state
        state.bad_steps += 1
        state.skipped_steps += 1
        if self.last_verdict == "restored":
            what = (f"the optimizer step made a weight non-finite; model and optimizer are back at the restore point "
                    f"({self.guard.last_undone} good steps earlier; the step count goes on)")
        else:
            what = "non-finite loss or gradients; step skipped (weights unchanged)"
        self.log(f"step {state.step + 1}: {what} ({state.bad_steps} in a row)")
        if state.bad_steps < MAX_BAD_STEPS:
            return False
        lr = self.optimizer.param_groups[0]["lr"]
        self.guard.restore()  # the restore point: weights that steps were taken from without trouble
        path = self.save()
        self.log(f"stopping: {MAX_BAD_STEPS} non-finite steps in a row at lr {lr:.3g}. The last weights that gave "
                 f"a finite loss are saved as {path}; resume from them with a lower learning rate: "
                 f"{resume_command(self.args)} --lr {lr / 10:.3g} (or add --clip_grad 10)")
        return True

    def _end_of_epoch(self, finished_epoch: int, save: bool = True) -> bool:
        """Checkpoint, validate (every ``--val_interval`` epochs), plot; True to stop early."""
        args, state = self.args, self.state
        due = args.val_interval > 0 and (finished_epoch + 1) % args.val_interval == 0
        state.pending_val = due
        if save:
            self.save()
        self.phase = "val"
        stop = due and self._validate_and_maybe_stop(finished_epoch)
        state.pending_val = False
        self.unsaved = self.unsaved or due  # validated: best metric, RNG and pending_val changed
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
