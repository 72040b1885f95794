"""``train.py`` as a Python function: :func:`train` takes the script's settings by the names of its flags
(:func:`utils.training.cli.build_parser`, the one place of names and defaults), runs the same training
in-process (:func:`utils.training.launch.run_training`: signals, run-folder lock, ``num_gpus``) and returns a
:class:`TrainSummary`. Bad input raises ValueError / FileNotFoundError (the script turns them into one line)."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Union

from utils.config.cli import parse_with_settings
from utils.config.project import load_project
from utils.training.cli import build_parser
from utils.training.launch import run_training
from utils.training.trainer import Trainer
from utils.weights.checkpoints import best_name, find_resume_point, state_path


@dataclass
class TrainSummary:
    """What a :func:`train` run did.

    ``exit_status``: 0, 1 (non-finite training), 130 / 143 (SIGINT / SIGTERM; the point reached is saved);
    ``steps``: optimizer steps done in total (the final step, counting a resumed run's earlier ones);
    ``epochs``: epochs finished; ``cls_loss`` / ``reg_loss``: the training losses of the last step this call
    ran (None when it ran none, or with ``num_gpus`` > 1 where the processes are started here);
    ``best_metric`` / ``best_metric_name``: the best validation value, ``"loss"`` (validation loss) or ``"mAP"``
    (``val_map``), None before any validation; ``last_weights`` / ``last_state``: the checkpoint pair written
    last (``efficientdet-d{c}_last.json`` names it); ``best_weights``: ``efficientdet-d{c}_best.pth``, or None.
    """
    exit_status: int
    steps: int
    epochs: int
    cls_loss: Optional[float]
    reg_loss: Optional[float]
    best_metric: Optional[float]
    best_metric_name: str
    last_weights: Optional[Path]
    last_state: Optional[Path]
    best_weights: Optional[Path]


def training_args(project: Union[str, Path], compound_coef: int = 0, **settings: Any) -> argparse.Namespace:
    """The Namespace ``train.py -c C -p PROJECT`` parses, with ``settings`` as explicit flags."""
    argv = ["-c", str(compound_coef), "-p", str(project)]
    return parse_with_settings(build_parser(), argv, settings, "train()")


def train(project: Union[str, Path], compound_coef: int = 0, **settings: Any) -> TrainSummary:
    """Train like ``python train.py -c COMPOUND_COEF -p PROJECT --FLAG VALUE ...``::

        summary = train("projects/shape.yml", 0, batch_size=4, num_epochs=10, load_weights="last")

    ``settings``: train.py's flags by name (``load_weights``, ``num_workers``, ``batch_size``, ...); each given
    counts as explicit (it wins over a resumed run's saved value). An unknown name is a ValueError naming it."""
    args = training_args(project, compound_coef, **settings)
    trainers: List[Trainer] = []
    status = run_training(args, on_trainer=trainers.append)
    folder = Path(args.saved_path) / load_project(args.project).project_name
    best = folder / best_name(args.compound_coef)
    best_weights = best if best.is_file() else None
    if trainers:
        trainer = trainers[0]
        run, val_map, last = trainer.state, bool(trainer.args.val_map), trainer.saved_as
        counters = {"step": run.step, "epoch": run.epoch, "best_metric": run.best_metric}
        losses = trainer.last_losses
    else:  # processes started here: what the last save recorded
        last, counters, val_map, losses = _last_save(folder, args.compound_coef)
    best_metric = counters.get("best_metric")
    if best_metric is None or not math.isfinite(best_metric):
        best_metric = None
    elif val_map:
        best_metric = -best_metric  # kept negated so that lower is better
    return TrainSummary(exit_status=status, steps=int(counters.get("step") or 0),
                        epochs=int(counters.get("epoch") or 0), cls_loss=losses[0] if losses else None,
                        reg_loss=losses[1] if losses else None, best_metric=best_metric,
                        best_metric_name="mAP" if val_map else "loss", last_weights=last,
                        last_state=state_path(last) if last is not None else None, best_weights=best_weights)


def _last_save(folder: Path, compound_coef: int):
    """(weights, run counters, val_map, None) of the pair written last (:func:`find_resume_point`); none yet:
    (None, {}, False, None)."""
    try:
        point = find_resume_point(folder, compound_coef)
    except FileNotFoundError:
        return None, {}, False, None
    return point.weights, point.state.get("run") or {}, bool((point.state.get("config") or {}).get("val_map")), None
