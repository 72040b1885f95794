"""The state of a training run and how it is saved and resumed.

- :class:`RunState`: the counters a checkpoint carries (epoch, step, best metric, ...);
- the optimizer and schedule builders (``--optim``, ``--lr_schedule``);
- :func:`resolve_weights` / :func:`resolve_settings`: what ``-w`` names and which settings a resumed run
  takes from its checkpoint (an explicit ``--lr``, ``--optim`` or ``--num_epochs`` wins, logged);
- :func:`training_state` / :func:`restore_training_state`: the ``.state.pt`` companion of a checkpoint
  (optimizer, scheduler, AMP scaler, EMA, RNG, counters, settings) and its exact restoration;
- :func:`initial_run_state`: the counters a run starts from (resumed, continued from a file name, or zero).
"""
from __future__ import annotations

import argparse
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from utils.weights.checkpoints import LEGACY_FORMAT, ResumePoint, find_resume_point, step_from_name
from utils.training.parts import ModelEMA, warmup_cosine_lambda
from utils.weights.loading import extract_state_dict, read_checkpoint

# Settings a resumed run takes from its checkpoint unless given on the command line.
RESUMED_DEFAULTS = {"lr": 1e-4, "optim": "adamw", "num_epochs": 500}

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
                           ema: Optional[ModelEMA], lr_given: bool, log: Callable[[str], None]) -> RunState:
    """Continue the saved run ``ckpt`` (the ``.state.pt`` beside ``weights_file``, already loaded into
    ``model``): returns its counters. A changed optimizer or schedule starts fresh (logged), an explicit
    ``--lr`` is applied at the resumed step; an incomplete state is a ValueError, never a traceback."""
    try:
        return _restore(ckpt, weights_file, args, model, optimizer, scheduler, scaler, ema, lr_given, log)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{weights_file}: incomplete training state ({type(exc).__name__}: {exc}); "
                         "pass it with -w FILE to fine-tune from its weights") from None


def initial_run_state(resume: Optional[ResumePoint], args: argparse.Namespace, model: nn.Module,
                      optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                      ema: Optional[ModelEMA], lr_given: bool, steps_per_epoch: int,
                      log: Callable[[str], None]) -> RunState:
    """The counters a run starts from: the resumed run's (see :func:`restore_training_state`), else zero with,
    for ``-w efficientdet-d0_9_3000.pth``, the step counter continuing from the name (published)."""
    if resume is not None and resume.state is not None:
        run = restore_training_state(resume.state, resume.weights, args, model, optimizer, scheduler, scaler, ema,
                                     lr_given, log)
        log(f"resuming {resume.weights.name} at epoch {run.epoch}, step {run.step}, "
            f"lr {optimizer.param_groups[0]['lr']:.3g}")
        return run
    run = RunState()
    step = step_from_name(resume.weights) if resume is not None else 0
    if step:
        run.step, run.epoch, run.epoch_step = step, step // steps_per_epoch, step % steps_per_epoch
        log(f"fine-tuning from {resume.weights.name}: the step counter continues at {step} "
            f"(epoch {run.epoch}), as the published train.py does")
    return run


def _restore(ckpt, weights_file, args, model, optimizer, scheduler, scaler, ema, lr_given, log) -> RunState:
    if int(ckpt.get("compound_coef", args.compound_coef)) != args.compound_coef:
        raise ValueError(f"{weights_file}: saved by a D{ckpt['compound_coef']} run, not -c {args.compound_coef}")
    if ckpt.get("train_model") is not None:
        model.load_state_dict(ckpt["train_model"])
    if ema is not None:
        saved_ema = ckpt.get("ema")
        if saved_ema:
            module = saved_ema.get("module") or extract_state_dict(read_checkpoint(weights_file), str(weights_file))
            ema.load_state_dict({"module": module, "updates": saved_ema["updates"], "decay": saved_ema["decay"]})
        else:
            log("--ema: the resumed run had no EMA; it starts from the current weights")
    saved = ckpt.get("config") or {}
    same_optim = saved.get("optim", RESUMED_DEFAULTS["optim"]) == args.optim
    if same_optim:
        optimizer.load_state_dict(ckpt["optimizer"])
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
    if lr_given or not restored_schedule:
        set_lr(optimizer, scheduler, args.lr, run.step)
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    elif "rng_torch" in ckpt:
        torch.set_rng_state(ckpt["rng_torch"])
    return run


def set_lr(optimizer: torch.optim.Optimizer, scheduler: Any, lr: float, step: int) -> None:
    """Make the optimizer's learning rate follow ``lr`` (the resolved ``--lr``) at ``step``."""
    groups = optimizer.param_groups
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.base_lrs = [lr] * len(groups)
        scheduler.last_epoch = step
        factor = scheduler.lr_lambdas[0](step)
        for group in groups:
            group["initial_lr"], group["lr"] = lr, lr * factor
    elif abs(groups[0]["lr"] - lr) > 1e-12 * max(lr, 1e-30):
        for group in groups:
            group["lr"] = lr
