"""The state of a training run and how it is saved and resumed.

- :class:`RunState`: the counters a checkpoint carries (epoch, step, best metric, ...);
- the optimizer and schedule builders (``--optim``, ``--lr_schedule``);
- :func:`resolve_weights`: what ``-w`` names (the settings a resumed run keeps: :mod:`.settings`);
- :func:`training_state` / :func:`restore_training_state`: the ``.state.pt`` companion of a checkpoint
  (optimizer, scheduler, AMP scaler, EMA, RNG, counters, settings) and its exact restoration;
- :func:`schedule_start` / :func:`initial_run_state`: the step a run's schedule starts at and the counters it
  starts from (resumed, continued from a file name, or zero).
"""
from __future__ import annotations

import argparse
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Optional

import numpy as np
import torch
from torch import nn

from utils.weights.checkpoints import LEGACY_FORMAT, ResumePoint, find_resume_point, step_from_name
from utils.training.parts import ModelEMA, head_only_warmup, warmup_cosine_lambda
from utils.training.settings import DEFAULTS, scaled_lr
from utils.weights.loading import extract_state_dict, read_checkpoint

WARMUP_START = 0.1  # the warm-up starts at this fraction of --lr (official)

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
    schedule_start: int = 0     # the step the lr schedule of this run started at (a fine-tune continues a count)
    epoch_losses: List[float] = field(default_factory=list)  # this epoch's so far (the plateau schedule's input)


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
    """``--optim`` over ``params`` at the run's learning rate (:func:`scaled_lr`: ``--lr``, scaled linearly
    with ``--lr_batch``)."""
    kwargs: Dict[str, Any] = {}
    if args.weight_decay is not None:
        kwargs["weight_decay"] = args.weight_decay
    if args.optim == "adamw":
        return torch.optim.AdamW(params, scaled_lr(args), **kwargs)
    return torch.optim.SGD(params, scaled_lr(args), momentum=0.9, nesterov=True, **kwargs)


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    start: int = 0, log: Optional[Callable[[str], None]] = None):
    """``--lr_schedule``: ReduceLROnPlateau (patience 3), or a linear warm-up from ``WARMUP_START * lr`` over
    ``--warmup_epochs`` then a cosine to 0, spanning the steps from ``start`` (the step the run starts its
    schedule at) to the end of the run (``--num_epochs`` or ``--max_steps``): the first step takes the warm-up
    start, the last the cosine's end. The cosine schedule is logged in one line."""
    if args.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=3)
    end = args.num_epochs * steps_per_epoch
    if args.max_steps:
        end = min(end, args.max_steps)
    steps = max(1, end - start)
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    if log is not None and end > start:
        log(f"lr schedule: steps {start + 1}-{end}: linear warm-up over {warmup} steps from "
            f"{WARMUP_START * scaled_lr(args):.3g} to {scaled_lr(args):.3g}, then cosine to 0 at step {end}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(steps - 1, warmup, WARMUP_START))


def head_only_phase(net: nn.Module, model: nn.Module, args: argparse.Namespace, run: RunState, steps_per_epoch: int,
                    log: Callable[[str], None]) -> nn.Module:
    """``--head_only_epochs`` at the point ``run`` is at: :func:`utils.training.parts.head_only_warmup` over the
    steps of the run's schedule (off with ``--head_only``, which freezes for good). Returns the net to train."""
    epochs = 0.0 if args.head_only else args.head_only_epochs
    return head_only_warmup(net, model, run.step - run.schedule_start, steps_per_epoch, epochs, log)


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


def training_state(run: RunState, args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: Any, scaler: torch.amp.GradScaler, ema: Optional[ModelEMA], extra: Dict[str, Any]
                   ) -> Dict[str, Any]:
    """The ``.state.pt`` content: everything but the weights (with EMA on, the raw training weights too)."""
    return {
        "train_model": model.state_dict() if ema else None,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "ema": {"updates": ema.updates, "decay": ema.decay} if ema else None,
        "run": asdict(run), "rng": rng_state(), "config": dict(vars(args)), **extra,
    }


def restore_training_state(ckpt: Dict[str, Any], weights_file: Path, args: argparse.Namespace, model: nn.Module,
                           optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                           ema: Optional[ModelEMA], given: FrozenSet[str], log: Callable[[str], None]) -> RunState:
    """Continue the saved run ``ckpt`` (the ``.state.pt`` beside ``weights_file``, already loaded into
    ``model``): returns its counters. A changed optimizer or schedule starts fresh (logged); an explicit
    ``--lr`` (or ``--lr_batch``, or ``--batch_size`` with it), ``--weight_decay`` or ``--ema_decay`` (in
    ``given``) applies from the resumed step on; an incomplete state is a ValueError, never a traceback."""
    try:
        return _restore(ckpt, weights_file, args, model, optimizer, scheduler, scaler, ema, given, log)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{weights_file}: incomplete training state ({type(exc).__name__}: {exc}); "
                         f"to fine-tune from its weights instead: -w {weights_file}") from None


def schedule_start(resume: Optional[ResumePoint]) -> int:
    """The step the learning-rate schedule of this run starts at: the resumed run's, else the step a
    published-style file name continues (``-w efficientdet-d0_9_3000.pth``: 3000), else 0."""
    if resume is None:
        return 0
    if resume.state is not None:
        return int((resume.state.get("run") or {}).get("schedule_start", 0))
    return step_from_name(resume.weights) or 0


def initial_run_state(resume: Optional[ResumePoint], args: argparse.Namespace, model: nn.Module,
                      optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                      ema: Optional[ModelEMA], given: FrozenSet[str], steps_per_epoch: int,
                      log: Callable[[str], None]) -> RunState:
    """The counters a run starts from: the resumed run's (see :func:`restore_training_state`), else zero with,
    for ``-w efficientdet-d0_9_3000.pth``, the step counter continuing from the name (published)."""
    if resume is not None and resume.state is not None:
        run = restore_training_state(resume.state, resume.weights, args, model, optimizer, scheduler, scaler, ema,
                                     given, log)
        saved_batch = (resume.state.get("config") or {}).get("batch_size") or args.batch_size
        if saved_batch != args.batch_size and run.epoch_step:  # keep the samples done, in batches of the new size
            run.epoch_step = min(steps_per_epoch, run.epoch_step * saved_batch // args.batch_size)
            log(f"--batch_size {args.batch_size} mid-epoch: the epoch goes on after its first "
                f"{run.epoch_step * args.batch_size} samples")
        log(f"resuming {resume.weights.name} at epoch {run.epoch + 1} (step {run.step}, {run.epoch_step} of the "
            f"epoch's steps done), lr {optimizer.param_groups[0]['lr']:.3g}")
        return run
    run = RunState()
    step = step_from_name(resume.weights) if resume is not None else 0
    if step:
        run.step, run.epoch, run.epoch_step = step, step // steps_per_epoch, step % steps_per_epoch
        run.schedule_start = step
        log(f"fine-tuning from {resume.weights.name}: the step counter continues at {step} "
            f"(epoch {run.epoch + 1} at {steps_per_epoch} steps per epoch), as the published train.py does")
    return run


def _restore(ckpt, weights_file, args, model, optimizer, scheduler, scaler, ema, given, log) -> RunState:
    if int(ckpt.get("compound_coef", args.compound_coef)) != args.compound_coef:
        raise ValueError(f"{weights_file}: saved by a D{ckpt['compound_coef']} run, not -c {args.compound_coef}")
    if ckpt.get("train_model") is not None:
        model.load_state_dict(ckpt["train_model"])
    if ema is not None:
        saved_ema = ckpt.get("ema")
        if saved_ema:
            module = saved_ema.get("module") or extract_state_dict(read_checkpoint(weights_file), str(weights_file))
            decay = args.ema_decay if "ema_decay" in given else saved_ema["decay"]
            ema.load_state_dict({"module": module, "updates": saved_ema["updates"], "decay": decay})
        else:
            log("--ema: the resumed run had no EMA; it starts from the current weights")
    saved = ckpt.get("config") or {}
    same_optim = saved.get("optim", DEFAULTS["optim"]) == args.optim
    if same_optim:
        optimizer.load_state_dict(ckpt["optimizer"])
        if "weight_decay" in given:
            for group in optimizer.param_groups:
                group["weight_decay"] = args.weight_decay
    else:
        log(f"--optim {args.optim} replaces {saved.get('optim')}: the optimizer starts with fresh state")
    restored_schedule = same_optim and saved.get("lr_schedule", "plateau") == args.lr_schedule
    if restored_schedule:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    counters = ckpt.get("run") or {k: ckpt[k] for k in ("epoch", "step", "epoch_step", "best_metric", "best_epoch")}
    run = RunState(**{k: v for k, v in counters.items() if k in RunState.__dataclass_fields__})
    run.bad_steps = 0
    if "lr" in given or "lr_batch" in given or (args.lr_batch and "batch_size" in given) or not restored_schedule:
        set_lr(optimizer, scheduler, scaled_lr(args), run.step - run.schedule_start)
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    elif "rng_torch" in ckpt:
        torch.set_rng_state(ckpt["rng_torch"])
    return run


def set_lr(optimizer: torch.optim.Optimizer, scheduler: Any, lr: float, done: int) -> None:
    """Make the optimizer's learning rate follow ``lr`` (the resolved ``--lr``) after ``done`` steps of the
    schedule."""
    groups = optimizer.param_groups
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.base_lrs = [lr] * len(groups)
        scheduler.last_epoch = done
        factor = scheduler.lr_lambdas[0](done)
        for group in groups:
            group["initial_lr"], group["lr"] = lr, lr * factor
    elif abs(groups[0]["lr"] - lr) > 1e-12 * max(lr, 1e-30):
        for group in groups:
            group["lr"] = lr
