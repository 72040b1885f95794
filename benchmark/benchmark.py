"""Inference speed of EfficientDet D0–D7x per inference mode, post-processing included (the published method).

    python benchmark/benchmark.py -c 0                                  # D0, 512x512, batch 1, 2 threads
    python benchmark/benchmark.py -c 0 --batch_sizes 1 8 --modes eager fastest   # images/s batch 8 vs 1
    python benchmark/benchmark.py -c 0 --modes eager fastest --batch_size 1 --json out.json
    python benchmark/benchmark.py -c 0 --onnx                           # also an ONNX Runtime session

Method (the published one): the same random (B, 3, S, S) tensor for every run; per mode one warm-up inference,
then ``--runs`` consecutive timed runs of forward + post-processing (:func:`utils.inference.postprocess.postprocess`,
numpy detections out, so CUDA work is finished). This is repeated in ``--rounds`` rounds, the modes taking
turns within each round, so that load from other processes spreads evenly over the modes; statistics are
over the timed runs of all rounds. Ratios are against ``eager`` (plain float32) of the same model measured
in the same run. See benchmark/README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from backbone import build_model
from benchmark.speed import (CPU_MODES, DEFAULT_CANDIDATES, DEFAULT_IOU_THRESHOLD, DEFAULT_ROUNDS, DEFAULT_RUNS,
                             DEFAULT_THRESHOLD, Result, batch_ratio_lines, benchmark, export_onnx_model, format_table,
                             select_modes, set_weights)
from utils.config.cli import add_bool_arg, add_model_args, keep_freed_memory, run_script
from utils.config.device import select_device
from utils.config.project import load_project


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, weights_help="checkpoint to load (default: random weights with a calibrated class bias)")
    parser.add_argument("--input_size", type=int, default=None, help="input side S (default: the model's)")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--batch_size", type=int, default=None, help="one batch size B")
    sizes.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                       help="batch sizes to compare, e.g. 1 8 (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    parser.add_argument("--modes", nargs="+", default=None,
                        help=f"inference modes (default on CPU: {' '.join(CPU_MODES)}; bf16 only where supported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"consecutive timed runs per mode and round, after one warm-up (default {DEFAULT_RUNS})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"rounds, the modes taking turns in each (default {DEFAULT_ROUNDS})")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="score threshold (default 0.2)")
    parser.add_argument("--iou_threshold", type=float, default=DEFAULT_IOU_THRESHOLD, help="NMS IoU (default 0.2)")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                        help="random weights: shift the class bias so that about this many anchors pass the "
                             f"threshold in eager fp32 (a confident model; default {DEFAULT_CANDIDATES})")
    add_bool_arg(parser, "--onnx", help="also time an ONNX Runtime session (CPU provider)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and input (default 0)")
    parser.add_argument("--keep_memory", action=argparse.BooleanOptionalAction, default=True,
                        help="glibc: keep freed memory in the heap (mallopt: no mmap, no trim) so that large "
                             "activations are not page-faulted in again every run, as the scripts do "
                             "(Linux only; --no-keep_memory measures the allocator's default)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.threads < 1 or args.runs < 1 or args.rounds < 1:
        raise ValueError(f"--threads, --runs and --rounds must be at least 1, got {args.threads}, {args.runs} "
                         f"and {args.rounds}")
    torch.set_num_threads(args.threads)
    if args.keep_memory and not keep_freed_memory():
        logging.getLogger(__name__).warning("glibc mallopt not available: memory is not kept between runs")
    device = select_device(args.device)
    batch_sizes = [args.batch_size] if args.batch_size is not None else (args.batch_sizes or [1])
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be at least 1, got {batch_sizes}")
    project = load_project(args.project)
    torch.manual_seed(args.seed)
    base = build_model(args.compound_coef, project).eval().to(device)
    size = args.input_size if args.input_size is not None else base.config.input_size
    base.check_input_size(size, size)
    modes = select_modes(args.modes, device)
    origin = set_weights(base, args.weights, size, device, args.seed, args.threshold, args.candidates)
    onnx_dir, onnx_path = export_onnx_model(base, args.onnx, size, device)
    if onnx_dir is not None:
        modes.append("onnx")
    name = base.config.name
    print(f"{name}, input {size}x{size}, {device}, {args.threads} threads, torch {torch.__version__}, "
          f"{origin}{', mallopt keep memory' if args.keep_memory else ''}; "
          f"{args.rounds} rounds of one warm-up and {args.runs} timed runs per mode, "
          f"post-processing included")
    all_results: List[Result] = []
    for batch_size in batch_sizes:
        all_results += benchmark(base, modes, batch_size, size, device, args.runs, args.threshold,
                                 args.iou_threshold, args.seed, args.threads, onnx_path, args.rounds)
    print("\n".join(format_table(all_results)))
    if len(batch_sizes) > 1:
        print("\n".join(batch_ratio_lines(all_results, batch_sizes, modes)))
    if onnx_dir is not None:
        onnx_dir.cleanup()
    if args.json:
        eager = {r.batch_size: r.median_ms for r in all_results if r.mode == "eager"}
        payload = {"model": name, "input_size": size, "device": str(device), "threads": args.threads,
                   "runs": args.runs, "rounds": args.rounds, "weights": origin, "torch": torch.__version__,
                   "results": [r.summary(eager.get(r.batch_size)) for r in all_results]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


def main(args: argparse.Namespace) -> int:
    return run_script(run, args, log_level=logging.WARNING, keep_memory=False)  # --keep_memory decides


if __name__ == "__main__":
    sys.exit(main(parse_args()))
