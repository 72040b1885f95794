"""What the processes of a DistributedDataParallel run must do together.

Every decision taken between steps (skip a step whose loss is not finite, roll back a step that left a
non-finite weight or BatchNorm statistic, stop after too many of them, stop early, stop at ``--max_steps``)
must be the same on every rank: a rank that rolls back alone keeps training from other weights than the
rest (the replicas silently diverge), and a rank that stops alone leaves the others waiting in a collective.
:func:`on_all_ranks` and-s a rank's verdict over the group; the counters derived from agreed verdicts then
stay equal by construction.

Validation COCO mAP runs in shards (:func:`sharded_val_map`): each rank detects on its share of the val
images, rank 0 gathers the result records, scores them with COCOeval and sends the mAP back, so no rank waits
for a whole-set evaluation (a long val set would reach the collective timeout). Failures are passed along
the same way, so a rank that cannot evaluate makes every rank raise instead of leaving them waiting.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple,
                    Union)

import torch
import torch.distributed as dist
from torch import nn

from utils.evaluation.records import detections_to_coco
from utils.evaluation.runner import run_detector_on_set, score_gathered

if TYPE_CHECKING:
    from utils.inference.detector import Detector


def agreed_batches(loader: Iterable[Any], agree: Callable[[bool], bool]) -> Iterator[Any]:
    """The batches of ``loader``; a rank whose next batch fails (an unreadable image: ValueError or
    FileNotFoundError naming the file, raised in a loader worker too) stops every rank at that batch: it raises
    its error, the others a ValueError saying so, instead of leaving them waiting in a collective. ``agree``
    and-s a verdict over the ranks (every rank has the same number of batches)."""
    iterator = iter(loader)
    while True:
        error: Optional[Exception] = None
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (ValueError, FileNotFoundError) as exc:
            error = exc
        if not agree(error is None):
            if error is not None:
                raise error
            raise ValueError("another process of this run stopped on bad data (its message names the file)")
        yield batch


def on_all_ranks(value: bool, world: int, device: torch.device) -> bool:
    """``value`` and-ed over the ``world`` ranks (all of them must call this at the same point)."""
    if world == 1:
        return value
    flag = torch.tensor([1.0 if value else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


@torch.no_grad()
def copy_from_rank0(module: nn.Module, world: int) -> None:
    """Overwrite ``module``'s parameters and buffers with rank 0's (in place).

    Parameters are equal on every rank already (DDP averages the gradients); BatchNorm statistics are not
    (each rank's come from its own batches, unless SyncBatchNorm), so without this each rank would validate
    a slightly different model from the one rank 0 saves. DDP itself copies rank 0's buffers before each
    training forward, so training is unchanged."""
    if world == 1:
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


def same_on_all_ranks(value: Any, world: int, device: torch.device) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if world == 1:
        return value
    box = [value]
    with _object_device(device):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _object_device(device: torch.device):
    """NCCL moves pickled objects through the current CUDA device: make it this rank's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _gather(value: Any, rank: int, world: int, device: torch.device) -> Optional[List[Any]]:
    """Every rank's ``value`` in rank order on rank 0 (None on the others)."""
    if world == 1:
        return [value]
    gathered: Optional[List[Any]] = [None] * world if rank == 0 else None
    with _object_device(device):
        dist.gather_object(value, gathered, dst=0)
    return gathered


def sharded_val_map(detector: "Detector", image_dir: Union[str, Path], ann_file: Union[str, Path],
                    obj_list: Sequence[str], batch_size: int, rank: int = 0, world: int = 1,
                    device: torch.device = torch.device("cpu")) -> float:
    """COCO mAP@[.5:.95] of ``detector`` on a COCO image set, each of the ``world`` ranks detecting on its
    share of the images (every rank calls this with its own ``rank``); every rank returns the same value,
    equal to :func:`utils.evaluation.evaluate_detector`'s on the whole set in one process.

    Raises:
        ValueError, FileNotFoundError, …: on the rank where detection or scoring failed, that error; on the
        other ranks, a ValueError naming the rank and the error.
    """
    error: Optional[Exception] = None
    try:
        image_ids, detections = run_detector_on_set(detector, image_dir, ann_file, batch_size, progress=False,
                                                    shard=(rank, world))
        mine: Tuple[str, Any] = ("ok", detections_to_coco(image_ids, detections, obj_list))
    except Exception as exc:  # passed to every rank below, then raised: no rank is left waiting
        error, mine = exc, ("error", f"{type(exc).__name__}: {exc}")
    shards = _gather(mine, rank, world, device)
    outcome: Tuple[str, Any] = ("ok", 0.0)
    if rank == 0:
        outcome = _score(shards, ann_file, obj_list)
    outcome = same_on_all_ranks(outcome, world, device)
    if error is not None:
        raise error
    if outcome[0] != "ok":
        raise ValueError(f"validation mAP: {outcome[1]}")
    return float(outcome[1])


def _score(shards: Sequence[Tuple[str, Any]], ann_file: Union[str, Path], obj_list: Sequence[str]
           ) -> Tuple[str, Any]:
    """``("ok", mAP)`` of the gathered shards, or ``("error", message)`` naming the first failure."""
    for source, (status, payload) in enumerate(shards):
        if status != "ok":
            return "error", f"rank {source}: {payload}"
    try:
        metrics: Dict[str, Any] = score_gathered(ann_file, [payload for _, payload in shards], obj_list)[0]
    except Exception as exc:  # sent to every rank, which raise it
        return "error", f"rank 0: {type(exc).__name__}: {exc}"
    return "ok", float(metrics["AP"])
