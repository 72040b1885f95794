"""The settings of a training run: their defaults (one table), which of them a resumed run keeps, and the
command that resumes a run.

``train.py`` parses every setting of :data:`DEFAULTS` with ``None`` for "not given", so that a resumed run
(``-w last``) can tell an explicit flag (it wins, one line each) from one left out (the saved run's value).
Callers that build an ``argparse.Namespace`` themselves may leave these keys out or None.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Tuple

#: Every setting that shapes a run and its real default. ``-w last`` takes each from the saved run unless it
#: is given on the command line. None: decided later (``weight_decay``: the optimizer's own, ``input_size``:
#: the model's, ``loss``: the project's, ``bn_momentum``: the model's 0.01, ``device``: the YAML's num_gpus).
DEFAULTS: Dict[str, Any] = {
    "input_size": None, "batch_size": 12, "num_workers": 2,
    "no_flip": False, "scale_jitter": False, "loss": None,
    "lr": 1e-4, "optim": "adamw", "weight_decay": None, "clip_grad": 0.0,
    "num_epochs": 500, "max_steps": 0, "lr_schedule": "plateau", "warmup_epochs": 1.0,
    "amp": False, "grad_checkpoint": False, "ema": False, "ema_decay": 0.9998, "bn_momentum": None, "head_only": False, "seed": 42,
    "val_interval": 1, "val_map": False, "save_interval": 500, "es_min_delta": 0.0, "es_patience": 0,
    "skip_bad_images": False, "debug": False, "data_path": "datasets/", "log_path": "logs/", "device": None,
}
#: Where checkpoints go (not restored: it is where ``-w last`` looks).
SAVED_PATH_DEFAULT = "logs/"
_FLAGS = {"num_workers": "-n"}


def flag(key: str) -> str:
    """The command-line flag of a setting: ``--batch_size``, ``-n``."""
    return _FLAGS.get(key, f"--{key}")


def resolve_settings(args: argparse.Namespace, saved: Optional[Mapping[str, Any]],
                     log: Callable[[str], None]) -> Tuple[argparse.Namespace, FrozenSet[str]]:
    """Fill every setting of :data:`DEFAULTS` that ``args`` leaves None: from ``saved`` (the resumed run's
    settings) when it has one, else the default. Returns the filled namespace and the keys given explicitly.

    On resume, each explicit value that differs from the saved one is logged in one line, and the saved values
    kept that differ from the defaults in one more line."""
    settings = argparse.Namespace(**vars(args))
    given = frozenset(key for key in DEFAULTS if getattr(args, key, None) is not None)
    kept = []
    for key, default in DEFAULTS.items():
        value = getattr(args, key, None)
        if saved is not None and key in saved:
            before = saved[key]
            if value is None:
                value = before
                if before != default:
                    kept.append(f"{flag(key)} {before}")
            elif value != before:
                log(f"{flag(key)} {value} replaces the resumed run's {before}")
        setattr(settings, key, default if value is None else value)
    if kept:
        log("settings of the resumed run: " + " ".join(kept))
    return settings, given


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run exactly: ``python train.py -c C -p PROJECT -w last`` (with the
    run's ``--saved_path`` when it is not the default); the other settings come from the checkpoint."""
    command = f"python train.py -c {args.compound_coef} -p {shlex.quote(str(args.project))} -w last"
    saved_path = getattr(args, "saved_path", SAVED_PATH_DEFAULT)
    if Path(saved_path) != Path(SAVED_PATH_DEFAULT):
        command += f" --saved_path {shlex.quote(str(saved_path))}"
    return command
