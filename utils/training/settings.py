"""The settings of a training run: their defaults (one table), which of them a resumed run keeps, and the
command that resumes a run.

``train.py`` parses every setting of :data:`DEFAULTS` with ``None`` for "not given", so that a resumed run
(``-w last``) can tell an explicit flag (it wins, one line each) from one left out (the saved run's value).
Callers that build an ``argparse.Namespace`` themselves may leave these keys out or None. ``--recipe``
(:mod:`utils.training.recipes`) fills the settings it names under the explicit flags; the resolved settings
are logged with their sources at start and written beside the checkpoints as ``settings.yml`` with every
checkpoint the run saves (:func:`write_run_settings`): a start that fails before its first save leaves the
folder's ``settings.yml`` describing the checkpoints already there.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Mapping, NamedTuple, Optional

from utils.training.recipes import load_recipe, write_settings

#: Every setting that shapes a run and its real default. ``-w last`` takes each from the saved run unless it
#: is given on the command line. None: decided later (``weight_decay``: the optimizer's own, ``input_size``:
#: the model's, ``loss``: the project's, ``bn_momentum``: the model's 0.01, ``device``: the YAML's num_gpus,
#: ``channels_last``: on for the CPU, ``recipe``: none). ``lr_batch``: the total batch size ``lr`` is given
#: for (0: ``lr`` as is; see :func:`scaled_lr`). ``head_only_epochs``: backbone + BiFPN frozen for that many
#: epochs first (0: off).
DEFAULTS: Dict[str, Any] = {
    "input_size": None, "batch_size": 12, "num_workers": 2,
    "no_flip": False, "scale_jitter": False, "loss": None,
    "vflip": 0.0, "mosaic": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0,
    "affine_scale": 0.0, "affine_translate": 0.0, "affine_rotate": 0.0,
    "lr": 1e-4, "optim": "adamw", "weight_decay": None, "clip_grad": 0.0,
    "num_epochs": 500, "max_steps": 0, "lr_schedule": "plateau", "warmup_epochs": 1.0,
    "amp": False, "grad_checkpoint": False, "channels_last": None, "ema": False, "ema_decay": 0.9998,
    "bn_momentum": None, "head_only": False, "seed": 42,
    "lr_batch": 0, "head_only_epochs": 0.0, "recipe": None,
    "val_interval": 1, "val_map": False, "save_interval": 500, "es_min_delta": 0.0, "es_patience": 0,
    "skip_bad_images": False, "debug": False, "data_path": "datasets/", "log_path": "logs/", "device": None,
}
#: Where checkpoints go (not restored: it is where ``-w last`` looks).
SAVED_PATH_DEFAULT = "logs/"
_FLAGS = {"num_workers": "-n"}


def flag(key: str) -> str:
    """The command-line flag of a setting: ``--batch_size``, ``-n``."""
    return _FLAGS.get(key, f"--{key}")


class Resolved(NamedTuple):
    """What :func:`resolve_settings` returns."""

    settings: argparse.Namespace  #: every setting of :data:`DEFAULTS` filled
    given: FrozenSet[str]  #: the keys given explicitly (flags, and the settings of a recipe given in ``args``)
    sources: Dict[str, str]  #: per key: "flag", "recipe", "resumed" or "default"


def resolve_settings(args: argparse.Namespace, saved: Optional[Mapping[str, Any]],
                     log: Callable[[str], None]) -> Resolved:
    """Fill every setting of :data:`DEFAULTS` that ``args`` leaves None: from ``--recipe`` (given in ``args``)
    when it sets it, else from ``saved`` (the resumed run's settings, which hold the values of its recipe),
    else the default. Returns the filled namespace, the keys given explicitly and each key's source.

    On resume, each explicit value that differs from the saved one is logged in one line, and the saved values
    kept that differ from the defaults in one more line. Then one line lists every value that is not the
    default with its source (flag, recipe, resumed), and another the learning rate ``lr_batch`` scales to."""
    settings = argparse.Namespace(**vars(args))
    recipe_spec = getattr(args, "recipe", None)
    recipe = load_recipe(recipe_spec, DEFAULTS) if recipe_spec else {}
    given = frozenset(key for key in DEFAULTS if getattr(args, key, None) is not None or key in recipe)
    kept, sources = [], {}
    for key, default in DEFAULTS.items():
        value = getattr(args, key, None)
        source = "default" if value is None else "flag"
        if value is None and key in recipe:
            value, source = recipe[key], "recipe"
        if saved is not None and key in saved:
            before = saved[key]
            if key not in given:
                value, source = before, "resumed"
                if before != default:
                    kept.append(f"{flag(key)} {before}")
            elif value != before:
                via = f" (recipe {recipe_spec})" if source == "recipe" else ""
                log(f"{flag(key)} {value}{via} replaces the resumed run's {before}")
        setattr(settings, key, default if value is None else value)
        sources[key] = source
    if kept:
        log("settings of the resumed run: " + " ".join(kept))
    _check_lr_batch(settings)
    _report(settings, sources, log)
    return Resolved(settings, given, sources)


def scaled_lr(args: argparse.Namespace) -> float:
    """The learning rate the optimizer takes: ``lr``, or with ``lr_batch`` set (the total batch size ``lr`` is
    given for) ``lr * batch_size / lr_batch`` (linear scaling; ``batch_size`` the run's total)."""
    lr_batch = getattr(args, "lr_batch", 0) or 0
    return args.lr * args.batch_size / lr_batch if lr_batch else args.lr


def _check_lr_batch(settings: argparse.Namespace) -> None:
    if settings.lr_batch < 0:
        raise ValueError(f"--lr_batch must be 0 (lr as is) or a batch size, got {settings.lr_batch}")
    if settings.head_only_epochs < 0:
        raise ValueError(f"--head_only_epochs must be 0 (off) or more, got {settings.head_only_epochs}")


def _report(settings: argparse.Namespace, sources: Mapping[str, str], log: Callable[[str], None]) -> None:
    """Log the values that are not the defaults with their sources, and the scaled lr."""
    title = f"settings (recipe {settings.recipe})" if settings.recipe else "settings"
    changed = [f"{key} {getattr(settings, key)} ({sources[key]})" for key, default in DEFAULTS.items()
               if key != "recipe" and getattr(settings, key) != default]
    log(f"{title}: " + (", ".join(changed) if changed else "the defaults"))
    if settings.lr_batch:
        log(f"lr {settings.lr:.4g} is for batch {settings.lr_batch}: {scaled_lr(settings):.4g} at batch "
            f"{settings.batch_size} (linear scaling, --lr_batch)")


def write_run_settings(folder: Path, settings: argparse.Namespace, sources: Mapping[str, str]) -> Path:
    """Write the resolved ``settings`` (with the ``sources`` of :func:`resolve_settings`) as ``folder/
    settings.yml``, atomically (:func:`utils.training.recipes.write_settings`); the header says where each
    value came from. The trainer calls it with every checkpoint it saves."""
    by_source = {src: [k for k, s in sources.items() if s == src and k != "recipe"]
                 for src in ("flag", "recipe", "resumed")}
    header = (f"The resolved settings of the efficientdet-d{getattr(settings, 'compound_coef', 0)} run on "
              f"{getattr(settings, 'project', '?')} whose checkpoints are beside this file; recipe: "
              f"{settings.recipe}.\n"
              + "".join(f"From the {src if src != 'flag' else 'command line'}: {' '.join(keys)}\n"
                        for src, keys in by_source.items() if keys)
              + "Start a run with the same settings: --recipe THIS_FILE.")
    return write_settings(folder, vars(settings), DEFAULTS, header)


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run exactly: ``python train.py -c C -p PROJECT -w last`` (with the
    run's ``--saved_path`` when it is not the default); the other settings come from the checkpoint."""
    command = f"python train.py -c {args.compound_coef} -p {shlex.quote(str(args.project))} -w last"
    saved_path = getattr(args, "saved_path", SAVED_PATH_DEFAULT)
    if Path(saved_path) != Path(SAVED_PATH_DEFAULT):
        command += f" --saved_path {shlex.quote(str(saved_path))}"
    return command
