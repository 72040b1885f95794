"""Processes of a training run: one, N started here for the YAML's ``num_gpus: N`` (DistributedDataParallel,
one process per GPU, gloo on the CPU), or one rank started by torchrun. Signals reach every process; the
exit status is 0, 1 (an error or non-finite training), 130 (SIGINT) or 143 (SIGTERM)."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from utils.config.cli import run_script
from utils.config.project import load_project
from utils.training.parts import Interrupted, StopRequest, distributed_context
from utils.training.runfolder import RunFolderLock
from utils.training.trainer import Trainer


OnTrainer = Optional[Callable[[Trainer], None]]


def train_process(args: argparse.Namespace, on_trainer: OnTrainer = None) -> int:
    """One process's training, signals handled from the first line (nothing to save before training). The
    checkpoint folder is checked writable and locked first (rank 0), for the whole run. ``on_trainer`` is
    given the :class:`Trainer` before it runs (:func:`utils.training.train` reads its state afterwards)."""
    with StopRequest() as stop:
        try:
            folder = Path(args.saved_path) / load_project(args.project).project_name
            with RunFolderLock(folder) if distributed_context()[0] == 0 else nullcontext():
                trainer = Trainer(args, stop)
                if on_trainer is not None:
                    on_trainer(trainer)
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
    each = f", {args.batch_size // world} images each per step" if args.batch_size else ""
    print(f"num_gpus: {world}: starting {world} training processes ({'NCCL' if use_cuda else 'gloo on the CPU'})"
          + each)
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


def run_training(args: argparse.Namespace, on_trainer: OnTrainer = None) -> int:
    """``train.py``'s work: one process, or N (the YAML's ``num_gpus``) started here; the exit status.
    ``on_trainer``: see :func:`train_process` (this process's run only; not called for N started here)."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    world = load_project(args.project).num_gpus
    if world > 1 and "WORLD_SIZE" not in os.environ:
        if args.batch_size is not None and args.batch_size % world:
            raise ValueError(f"--batch_size {args.batch_size} is the total over {world} processes (num_gpus: "
                             f"{world}): use a multiple of {world}")
        return launch_workers(args, world)
    return train_process(args, on_trainer)
