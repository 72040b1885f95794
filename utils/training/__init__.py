"""Training: the loop (:mod:`.trainer`), its state and resumption (:mod:`.state`), the settings a resume keeps
(:mod:`.settings`), what a process sets up (:mod:`.setup`), the checkpoint folder's lock (:mod:`.runfolder`), its
log and debug images (:mod:`.reporting`), the building blocks (:mod:`.parts`: loss wrapper, EMA, sampler, finite guard, stop
signals) and the processes (:mod:`.launch`). ``train.py`` is the command line over :func:`run_training` (its flags:
:mod:`.cli`); :func:`train` (:mod:`.api`) is the same from Python, returning a :class:`TrainSummary`.
"""
from utils.training.parts import (FiniteGuard, Interrupted, ModelEMA, ModelWithLoss, ResumableSampler, StopRequest,
                                  freeze_backbone_and_bifpn, load_backbone_weights, warmup_cosine_lambda)
from utils.training.trainer import Trainer
from utils.training.launch import run_training
from utils.training.api import TrainSummary, train

__all__ = ["FiniteGuard", "Interrupted", "ModelEMA", "ModelWithLoss", "ResumableSampler", "StopRequest",
           "TrainSummary", "Trainer", "freeze_backbone_and_bifpn", "load_backbone_weights", "run_training", "train",
           "warmup_cosine_lambda"]
