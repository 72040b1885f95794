"""Measuring training (for ``benchmark/``): a process's peak memory, a child process run under a memory cap (an
out-of-memory child is killed instead of taking the machine down), and batches to time steps on."""
from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import torch
from torch import Tensor

from efficientdet.loaders import create_dataloaders


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: max allocated on CUDA, max resident set size elsewhere (Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_capped(cmd: List[str], cap_bytes: int, poll_s: float = 0.1) -> Tuple[int, str, bool]:
    """Run ``cmd``, killing it once its resident set exceeds ``cap_bytes`` (a watchdog thread reading
    ``/proc``; an address-space limit of twice the cap stops runaway allocations between two looks).

    Returns:
        ``(returncode, stdout, killed)``; ``killed`` is True when the cap was hit.
    """
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 * cap_bytes, 2 * cap_bytes))

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=limit)
    killed = threading.Event()

    def watch() -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while proc.poll() is None:
            try:
                rss = int(Path(f"/proc/{proc.pid}/statm").read_text().split()[1]) * page
            except (OSError, IndexError, ValueError):
                return
            if rss > cap_bytes:
                killed.set()
                proc.kill()
                return
            time.sleep(poll_s)

    threading.Thread(target=watch, daemon=True).start()
    out, _ = proc.communicate()
    return proc.returncode, out, killed.is_set()


def training_batches(project, data_path: str, input_size: int, batch_size: int) -> Iterator[Tuple[Tensor, Tensor]]:
    """(images, annotations) without end: the project's training batches (its DataLoader in this process, seed 0)
    where ``data_path`` holds its data, else random images with two boxes each."""
    if (Path(data_path) / project.project_name).is_dir():
        loader = create_dataloaders(project, data_path, input_size, batch_size, progress=False, seed=0).train_loader
        while True:
            for batch in loader:
                yield batch["img"], batch["annot"]
    boxes = torch.tensor([[0.08, 0.1, 0.4, 0.5, 0], [0.6, 0.55, 0.82, 0.98, 1]]) * torch.tensor(
        [input_size, input_size, input_size, input_size, 1.0])
    while True:
        yield torch.randn(batch_size, 3, input_size, input_size), boxes.repeat(batch_size, 1, 1)
