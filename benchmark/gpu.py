"""The measurements of ``benchmark/gpu_report.py``, one :class:`Row` each: the CUDA tests (a pytest run of the
``cuda`` marker), inference timings (:func:`benchmark.speed.benchmark`, the published method: forward plus
post-processing, FPS), and training steps as the trainer takes them (:func:`utils.training.step.optimizer_step`:
autocast, GradScaler, the non-finite guard) on one fixed synthetic batch, whose loss must fall."""
from __future__ import annotations

import math
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from backbone import EfficientDet
from benchmark.speed import DEFAULT_CANDIDATES, DEFAULT_IOU_THRESHOLD, DEFAULT_THRESHOLD, benchmark, set_weights
from efficientdet.loss import DetectionLoss
from utils.training.guard import FiniteGuard
from utils.training.parts import ModelWithLoss
from utils.training.step import amp_dtype, optimizer_step

REPO = Path(__file__).resolve().parent.parent
# Row label -> inference mode (utils.inference.modes); fp16 needs CUDA.
MODES: Dict[str, str] = {"fp32 eager": "eager", "fp16 eager": "fp16", "fp32 fastest": "fastest",
                         "fp16 fastest": "fastest+fp16"}


@dataclass
class Row:
    """One line of the report. ``per_s``: images per second (inference: FPS with post-processing)."""

    name: str
    setting: str = ""
    ms: Optional[float] = None
    per_s: Optional[float] = None
    memory_mib: Optional[float] = None
    note: str = ""
    ok: bool = True
    data: Dict[str, object] = field(default_factory=dict)


def markdown(rows: Sequence[Row], memory_label: str) -> List[str]:
    """The rows as one markdown table."""
    def number(value: Optional[float], digits: int) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    lines = [f"| row | setting | ms | images/s | {memory_label} | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.setting} | {number(r.ms, 2)} | {number(r.per_s, 1)} | {number(r.memory_mib, 0)} "
              f"| {r.note}{'' if r.ok else ' **FAILED**'} |" for r in rows]
    return lines


def as_json(rows: Sequence[Row]) -> List[Dict[str, object]]:
    return [asdict(r) for r in rows]


def marked_tests(paths: Sequence[str], marker: str = "cuda", timeout_s: float = 300.0) -> Row:
    """``pytest -m marker`` over ``paths`` in a fresh process: its summary line (exit 5, nothing collected,
    counts as passing)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider", *paths]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    lines = [line.strip("= ") for line in result.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else f"exit {result.returncode}"
    return Row(f"pytest -m {marker}", " ".join(paths), ms=1000.0 * (time.perf_counter() - start), note=summary,
               ok=result.returncode in (0, 5), data={"output": result.stdout[-4000:] + result.stderr[-2000:]})


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def inference_rows(compound_coef: int, labels: Sequence[str], batch_size: int, size: Optional[int],
                   device: torch.device, runs: int, rounds: int = 1, seed: int = 0, prefix: str = "") -> List[Row]:
    """D{c} (90 classes, random weights with a calibrated class bias: about 20 candidates pass the threshold, as
    a confident model) timed per mode of ``labels`` (:data:`MODES`) at ``batch_size``; a mode that fails or
    does not apply to the device is a row saying why."""
    torch.manual_seed(seed)
    base = EfficientDet(num_classes=90, compound_coef=compound_coef).eval().to(device)
    size = size or base.config.input_size
    set_weights(base, None, size, device, seed, DEFAULT_THRESHOLD, DEFAULT_CANDIDATES)
    rows = []
    for label in labels:
        row = Row(f"{prefix}{base.config.name} {label}", f"{size}px, batch {batch_size}")
        if "fp16" in MODES[label] and device.type != "cuda":
            row.note = "fp16 needs CUDA"
        else:
            try:
                result = benchmark(base, [MODES[label]], batch_size, size, device, runs, DEFAULT_THRESHOLD,
                                   DEFAULT_IOU_THRESHOLD, seed, torch.get_num_threads(), rounds=rounds)[0]
                row.ms, row.per_s, row.memory_mib = result.median_ms, result.images_per_s, result.memory_mib
                row.note = f"{result.detections} detections, post-processing {100 * result.post_share:.0f} %"
                row.data = result.summary(None)
            except (RuntimeError, ValueError) as exc:  # e.g. out of memory: this row fails, the report goes on
                row.note, row.ok = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}", False
        rows.append(row)
        _free(device)
    del base
    _free(device)
    return rows


def synthetic_batch(batch_size: int, size: int, device: torch.device, seed: int = 0):
    """Seeded noise images and three boxes per image (x1, y1, x2, y2, class) in input pixels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn((batch_size, 3, size, size), generator=generator)
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5, 0], [0.5, 0.4, 0.9, 0.8, 1], [0.3, 0.6, 0.5, 0.9, 2]])
    annotations = (boxes * torch.tensor([size, size, size, size, 1.0])).repeat(batch_size, 1, 1)
    return images.to(device), annotations.to(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # the process's peak RSS


def train_row(compound_coef: int, batch_size: int, size: int, steps: int, device: torch.device,
              checkpointing: bool = False, lr: float = 1e-4, seed: int = 0) -> Row:
    """``steps`` training steps with --amp (float16 and a GradScaler on CUDA, bfloat16 elsewhere) of D{c}
    (90 classes, AdamW, published loss) on one synthetic batch: ms per step (median after the first), peak
    memory, the loss from first to last; fails unless every loss is finite and, from 20 steps, the mean of the
    last tenth is below that of the first tenth."""
    label = f"train D{compound_coef} amp" + (" + checkpointing" if checkpointing else "")
    row = Row(label, f"{size}px, batch {batch_size}, {steps} steps")
    torch.manual_seed(seed)
    model = EfficientDet(num_classes=90, compound_coef=compound_coef).train().to(device)
    if checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            row.note = "no activation checkpointing in this version"
            return row
        model.set_grad_checkpointing(True)
    net = ModelWithLoss(model, DetectionLoss("yaep", from_logits=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr)
    guard = FiniteGuard(model, optimizer)
    dtype = amp_dtype(device, log=lambda message: None)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    images, annotations = synthetic_batch(batch_size, size, device, seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, verdicts, times = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        verdict, cls_loss, reg_loss, _ = optimizer_step(net, optimizer, guard, images, annotations, dtype, scaler)
        losses.append(float(cls_loss) + float(reg_loss))  # float() waits for the device
        times.append(time.perf_counter() - start)
        verdicts.append(verdict)
    tenth = max(1, steps // 10)
    first, last = statistics.fmean(losses[:tenth]), statistics.fmean(losses[-tenth:])
    finite = all(math.isfinite(v) for v in losses)
    decreasing = last < first
    row.ms = 1000.0 * statistics.median(times[1:] or times)
    row.per_s, row.memory_mib = 1000.0 * batch_size / row.ms, _peak_mib(device)
    skipped = sum(v != "ok" for v in verdicts)
    row.note = (f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {'finite' if finite else 'NOT FINITE'}, "
                f"{'decreasing' if decreasing else 'not decreasing'}, {dtype}, {skipped} steps skipped")
    row.ok = finite and (decreasing or steps < 20)
    row.data = {"losses": losses, "verdicts": verdicts, "dtype": str(dtype)}
    del model, net, optimizer, guard
    _free(device)
    return row
