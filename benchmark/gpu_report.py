"""One command for the GPU figures of this implementation (one GPU, about 8 minutes)::

    python benchmark/gpu_report.py                          # cuda; writes gpu_report.json
    python benchmark/gpu_report.py --device cpu --quick     # the same code on tiny sizes (seconds; the test suite)

Runs, in order: the tests that need CUDA (``pytest -m cuda``); D0-D7x at batch 1, each at its own input size,
fp32 and fp16, eager and ``fastest``, timed as ``benchmark/benchmark.py`` does (one warm-up, then ``--runs``
timed runs of forward plus post-processing; the images/s column is FPS); D0 at batch 32; 100 training steps of
D0 with --amp (float16 and a GradScaler) on one synthetic batch, with and without activation checkpointing, with
peak memory and the loss (it must stay finite and fall). Prints one markdown table and writes it as JSON. Models
left when ``--max_minutes`` has passed are rows saying so; the exit status is 1 when a row failed.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmark.gpu import MODES, Row, as_json, inference_rows, markdown, marked_tests, train_row
from efficientdet.config import MODEL_CONFIGS
from utils.config.cli import run_script
from utils.config.device import select_device

QUICK = {"coefs": [0], "size": 128, "big_batch": 2, "train_steps": 3, "train_batch": 2, "train_size": 128,
         "runs": 2, "tests": ["tests/test_cuda.py"]}
FULL = {"coefs": list(range(len(MODEL_CONFIGS))), "size": None, "big_batch": 32, "train_steps": 100,
        "train_batch": 16, "train_size": 512, "runs": 10, "tests": ["tests"]}
BIG_BATCH_MODES = ("fp32 eager", "fp16 fastest")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: D0 only at 128 px, batch 2, 3 training steps, tests/test_cuda.py only")
    parser.add_argument("--json", default="gpu_report.json", metavar="PATH", help="where the JSON goes")
    parser.add_argument("--max_minutes", type=float, default=8.0,
                        help="no new model is timed after this many minutes (default 8)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per mode (default 10; --quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--no_tests", action="store_true", help="leave out the pytest run")
    return parser.parse_args(argv)


def environment(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        where = f"{name} ({memory:.0f} GiB), CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{where}, torch {torch.__version__}, Python {platform.python_version()}"


def collect(args: argparse.Namespace, device: torch.device, plan: dict) -> List[Row]:
    """Every row of the report, in the order printed."""
    deadline = time.monotonic() + 60.0 * args.max_minutes
    runs = args.runs or plan["runs"]
    rows: List[Row] = []
    if not args.no_tests:
        rows.append(marked_tests(plan["tests"]))
    for coef in plan["coefs"]:
        if time.monotonic() > deadline:
            rows += [Row(f"{MODEL_CONFIGS[coef].name} {label}", note="left out: over --max_minutes", ok=False)
                     for label in MODES]
            continue
        rows += inference_rows(coef, list(MODES), 1, plan["size"], device, runs)
    rows += inference_rows(0, BIG_BATCH_MODES, plan["big_batch"], plan["size"], device, runs,
                           prefix=f"batch {plan['big_batch']} ")
    for checkpointing in (False, True):
        rows.append(train_row(0, plan["train_batch"], plan["train_size"], plan["train_steps"], device,
                              checkpointing=checkpointing))
    return rows


def run(args: argparse.Namespace) -> int:
    if args.max_minutes <= 0 or any(n is not None and n < 1 for n in (args.runs, args.threads)):
        raise ValueError(f"--max_minutes must be > 0, --runs and --threads >= 1, got {args.max_minutes}, "
                         f"{args.runs} and {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    plan = QUICK if args.quick else FULL
    start = time.monotonic()
    where = environment(device)
    rows = collect(args, device, plan)
    memory = "peak MiB (CUDA allocated)" if device.type == "cuda" else "MiB (RSS)"
    lines = [f"GPU report: {where}; {'quick' if args.quick else 'full'} plan, {time.monotonic() - start:.0f} s", ""]
    lines += markdown(rows, memory)
    print("\n".join(lines))
    payload = {"environment": where, "device": str(device), "quick": args.quick, "seconds": time.monotonic() - start,
               "rows": as_json(rows)}
    Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwritten to {args.json}")
    failed = [r.name for r in rows if not r.ok]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(args: argparse.Namespace) -> int:
    return run_script(run, args, keep_memory=False)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
