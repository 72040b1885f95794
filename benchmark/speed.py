"""The timing machinery of ``benchmark/benchmark.py`` (the published method): the same input for every mode, one
warm-up then consecutive timed runs of forward + post-processing, in rounds with the modes taking turns; the
runner of each mode is the inference path of every script (:class:`utils.inference.modes.InferenceModel`,
:func:`utils.inference.postprocess.postprocess`)."""
from __future__ import annotations

import copy
import math
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from backbone import EfficientDet
from utils.inference.modes import InferenceModel, bf16_supported, mode_name, parse_mode
from utils.inference.postprocess import Detections, postprocess
from utils.weights.loading import load_weights

DEFAULT_RUNS = 10  # the published method: one warm-up, then 10 timed runs
DEFAULT_ROUNDS = 3
DEFAULT_THRESHOLD = 0.2
DEFAULT_IOU_THRESHOLD = 0.2
DEFAULT_CANDIDATES = 20
CPU_MODES = ("eager", "fused", "channels_last", "fused+channels_last", "fused+channels_last+trace",
             "fused+channels_last+trace+bf16")
CUDA_MODES = ("eager", "fused", "fused+channels_last", "fused+channels_last+trace",
              "fused+channels_last+trace+fp16", "fused+channels_last+trace+bf16")



@dataclass
class Result:
    """Timings of one mode at one batch size (milliseconds per batch)."""

    mode: str
    batch_size: int
    times_ms: List[float] = field(default_factory=list)
    post_ms: List[float] = field(default_factory=list)
    setup_s: float = 0.0
    memory_mib: float = 0.0
    detections: int = 0
    differing_images: int = 0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def images_per_s(self) -> float:
        return 1000.0 * self.batch_size / self.median_ms

    @property
    def post_share(self) -> float:
        return statistics.median(self.post_ms) / self.median_ms

    def summary(self, eager_ms: Optional[float]) -> Dict[str, object]:
        return {"mode": self.mode, "batch_size": self.batch_size, "median_ms": self.median_ms,
                "mean_ms": statistics.fmean(self.times_ms),  # the published figures are means
                "min_ms": min(self.times_ms), "max_ms": max(self.times_ms), "images_per_s": self.images_per_s,
                "memory_mib": self.memory_mib, "detections": self.detections,
                "differing_images": self.differing_images,
                "ratio_vs_eager": self.median_ms / eager_ms if eager_ms else None,
                "post_share": self.post_share, "setup_s": self.setup_s, "times_ms": self.times_ms}


def _rss_mib() -> float:
    """Current resident set size in MiB (Linux /proc; falls back to the peak from ``resource``)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        pages = int(statm.read_text().split()[1])
        return pages * resource.getpagesize() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Spread of the class logits that calibrate_class_bias gives the random-weight model (standard deviation).
CALIBRATED_LOGIT_STD = 4.0


@torch.no_grad()
def calibrate_class_bias(model: EfficientDet, images: torch.Tensor, threshold: float, candidates: int) -> None:
    """Emulate a confident model: spread the class logits of ``images`` to a standard deviation of
    :data:`CALIBRATED_LOGIT_STD` (random weights give logits bunched within a fraction of a unit, which bf16
    rounding would push across the threshold by the thousand), then shift the class output bias so that about
    ``candidates`` (anchor, class) scores exceed ``threshold`` (the threshold midway between the k-th and
    k+1-th logits). The output conv is linear: scaling its weight and bias scales the logits."""
    _, _, classification, _ = model(images)
    logits = torch.logit(classification.double().flatten(), eps=1e-12)
    output = model.classifier.header.pointwise_conv.conv
    gain = max(1.0, CALIBRATED_LOGIT_STD / max(float(logits.std()), 1e-6))
    output.weight.mul_(gain)
    output.bias.mul_(gain)
    logits = logits * gain
    k = max(1, min(candidates, logits.numel() - 1))
    top = torch.topk(logits, k + 1).values
    target = math.log(threshold / (1.0 - threshold))
    shift = float((top[k - 1] + top[k]) / 2) - target
    output.bias.sub_(shift)


def same_detections(a: Detections, b: Detections, box_atol: float = 1e-3) -> bool:
    """Same count, same classes in the same order, boxes within ``box_atol`` pixels."""
    return (len(a) == len(b) and np.array_equal(a.class_ids, b.class_ids)
            and bool(np.all(np.abs(a.boxes - b.boxes) <= box_atol)))


def _runner_for(mode: str, base: EfficientDet, device: torch.device,
                onnx_path: Optional[str], threads: int) -> Callable[[torch.Tensor], Tuple[torch.Tensor, ...]]:
    """images -> (regression, classification, anchors float32) for a mode (``onnx``: ONNX Runtime)."""
    if mode == "onnx":
        session = _onnx_session(onnx_path, threads)
        anchors = base.anchors

        def run_onnx(images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
            regression, classification = session.run(None, {"images": images.cpu().numpy()})
            return torch.from_numpy(regression), torch.from_numpy(classification), anchors(images.float())
        return run_onnx
    return InferenceModel(copy.deepcopy(base), mode, device=device)


def _onnx_session(path: Optional[str], threads: int):
    try:
        import onnxruntime
    except ImportError as exc:
        raise ValueError(f"--onnx needs onnxruntime (pip install -r requirements-dev.txt): {exc}") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # ONNX Runtime's worker threads spin after each run by default, taking the cores from the PyTorch mode
    # timed after it (it made eager ~40 % slower): no spinning, so that the ratios stay fair.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def benchmark(base: EfficientDet, modes: Sequence[str], batch_size: int, size: int, device: torch.device,
              runs: int, threshold: float, iou_threshold: float, seed: int, threads: int,
              onnx_path: Optional[str] = None, rounds: int = DEFAULT_ROUNDS) -> List[Result]:
    """Time every mode on the same (batch_size, 3, size, size) tensor; the first mode is the reference.

    Per round and mode: one warm-up inference, then ``runs`` consecutive timed runs (as published): every mode is
    timed in its steady state, as when a script runs it over many images."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn((batch_size, 3, size, size), generator=generator).to(device)
    hw = (size, size)
    runners, results, reference = {}, {}, None
    for mode in modes:
        # Setup and first inference one mode at a time (memory measured here), timed rounds below.
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = _rss_mib()
        start = time.perf_counter()
        runner = _runner_for(mode, base, device, onnx_path, threads)
        with torch.inference_mode():
            regression, classification, anchors = runner(images)  # first run (traces where the mode does)
            dets = postprocess(hw, anchors, regression, classification, threshold, iou_threshold)
        _synchronize(device)
        result = Result(mode, batch_size, setup_s=time.perf_counter() - start)
        result.memory_mib = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
                             else _rss_mib() - rss_before)
        result.detections = sum(len(d) for d in dets)
        if reference is None:
            reference = dets
        result.differing_images = sum(not same_detections(a, b) for a, b in zip(dets, reference))
        runners[mode], results[mode] = runner, result
    with torch.inference_mode():
        for _ in range(rounds):
            for mode in modes:
                regression, classification, anchors = runners[mode](images)  # warm-up
                postprocess(hw, anchors, regression, classification, threshold, iou_threshold)
                for _ in range(runs):
                    _synchronize(device)
                    start = time.perf_counter()
                    regression, classification, anchors = runners[mode](images)
                    _synchronize(device)
                    middle = time.perf_counter()
                    postprocess(hw, anchors, regression, classification, threshold, iou_threshold)
                    end = time.perf_counter()  # postprocess returns numpy: the device work is finished
                    results[mode].times_ms.append(1000.0 * (end - start))
                    results[mode].post_ms.append(1000.0 * (end - middle))
    return [results[mode] for mode in modes]


def format_table(results: Sequence[Result]) -> List[str]:
    """One line per result; ratio against the first (eager) result of the same batch size."""
    lines = [f"{'mode':34s} {'B':>2s} {'median ms':>9s} {'min':>7s} {'max':>7s} {'img/s':>7s} {'mem MiB':>7s} "
             f"{'dets':>5s} {'differ':>6s} {'x eager':>7s} {'post %':>6s} {'setup s':>7s}"]
    eager: Dict[int, float] = {}
    for r in results:
        eager.setdefault(r.batch_size, r.median_ms)
        lines.append(f"{r.mode:34s} {r.batch_size:2d} {r.median_ms:9.1f} {min(r.times_ms):7.1f} {max(r.times_ms):7.1f} "
                     f"{r.images_per_s:7.2f} {r.memory_mib:7.1f} {r.detections:5d} {r.differing_images:6d} "
                     f"{r.median_ms / eager[r.batch_size]:7.3f} {100.0 * r.post_share:6.1f} {r.setup_s:7.2f}")
    return lines


def select_modes(requested: Optional[Sequence[str]], device: torch.device) -> List[str]:
    """The modes to time, ``eager`` (the reference) first: ``requested`` or the device's defaults."""
    if requested:
        modes = [mode_name(m) for m in requested]
    else:
        modes = list(CUDA_MODES if device.type == "cuda" else CPU_MODES)
        if not bf16_supported(device):
            modes = [m for m in modes if "bf16" not in parse_mode(m)]
    return ["eager"] + [m for m in dict.fromkeys(modes) if m != "eager"]


def set_weights(base: EfficientDet, weights: Optional[str], size: int, device: torch.device, seed: int,
                threshold: float, candidates: int) -> str:
    """Load ``weights`` into ``base``, or calibrate its random class bias (:func:`calibrate_class_bias`);
    returns where the weights came from."""
    if weights:
        load_weights(base, weights, strict_classes=True)
        return f"weights {weights}"
    calibration = torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(seed)).to(device)
    calibrate_class_bias(base, calibration, threshold, candidates)
    return f"random weights (seed {seed}), class bias set for ~{candidates} candidates"


def export_onnx_model(base: EfficientDet, onnx: bool, size: int,
                       device: torch.device) -> Tuple[Optional[tempfile.TemporaryDirectory], Optional[str]]:
    """With ``--onnx``, ``base`` exported to a temporary folder: (folder, model path); else (None, None)."""
    if not onnx:
        return None, None
    if device.type != "cpu":
        raise ValueError("--onnx times the CPU execution provider: use --device cpu")
    from utils.inference.onnx_export import export_onnx

    onnx_dir = tempfile.TemporaryDirectory()
    onnx_path = str(Path(onnx_dir.name) / "model.onnx")
    export_onnx(base, onnx_path, (size, size), dynamic_batch=True)
    return onnx_dir, onnx_path


def batch_ratio_lines(results: Sequence[Result], batch_sizes: Sequence[int], modes: Sequence[str]) -> List[str]:
    """Per mode: images/s at the largest batch size over images/s at the smallest."""
    first, last = min(batch_sizes), max(batch_sizes)
    per_mode = {(r.mode, r.batch_size): r for r in results}
    return [f"images/s batch {last} / batch {first}: "
            f"{per_mode[(mode, last)].images_per_s / per_mode[(mode, first)].images_per_s:.2f} ({mode})"
            for mode in modes]
