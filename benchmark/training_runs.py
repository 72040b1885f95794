"""Training benchmarks run ``train.py`` and ``coco_eval.py`` as a user runs them: the runs, their logs, the
failures (with the tail of the log), the calibration of a training budget in minutes, and the rows of
``benchmark/recipes.py``. Used by ``benchmark/anchor_fit.py`` and ``benchmark/recipes.py``."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from utils.training.recipes import recipe_file
from utils.weights.checkpoints import find_resume_point

REPO = Path(__file__).resolve().parent.parent
#: train.py settings a benchmark sets for every row (a row's ``--flags`` may not).
BENCHMARK_SETTINGS = ("compound_coef", "project", "data_path", "input_size", "device", "seed", "max_steps",
                      "num_epochs", "val_interval", "save_interval", "saved_path", "log_path")


class ScriptFailed(ChildProcessError):
    """A ``train.py`` / ``coco_eval.py`` run exited non-zero; the message names the log and ends with its tail
    (an OSError: :func:`utils.config.cli.run_script` reports it as one ``error:`` line followed by the tail)."""


def log_tail(log: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of ``log`` (progress-bar redraws split at carriage returns), or '' if unreadable."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "\n").rstrip().splitlines()[-lines:])


def check_exit(cmd: Sequence[str], returncode: int, log: Path) -> None:
    """Raise :class:`ScriptFailed` (the script ``cmd[1]``, its exit status, the log and its last lines) for a
    non-zero ``returncode``."""
    if returncode != 0:
        raise ScriptFailed(f"{Path(cmd[1]).name} exited with status {returncode} (log: {log}); last lines:\n"
                           f"{log_tail(log)}")


def run_logged(cmd: Sequence[str], log: Path, env: Optional[Mapping[str, str]] = None) -> float:
    """Run ``cmd`` with stdout and stderr to ``log``; returns its wall seconds. Raises :class:`ScriptFailed`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        returncode = subprocess.run(list(cmd), stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    check_exit(cmd, returncode, log)
    return time.perf_counter() - start


def train_command(run: Path, common: Sequence[str], train_flags: Sequence[str]) -> List[str]:
    """``python train.py COMMON TRAIN_FLAGS --saved_path run/ckpt --log_path run/logs``."""
    return [sys.executable, str(REPO / "train.py"), *common, *train_flags, "--saved_path", str(run / "ckpt"),
            "--log_path", str(run / "logs")]


def train_and_evaluate(run: Path, common: Sequence[str], train_flags: Sequence[str], project_name: str,
                       compound_coef: int = 0, env: Optional[Mapping[str, str]] = None) -> Dict[str, float]:
    """``train.py COMMON TRAIN_FLAGS`` into ``run/ckpt`` and ``run/logs``, then ``coco_eval.py COMMON`` of the
    weights it saved last on the val set; output in ``run/train.log`` and ``run/eval.log``. ``common``: the
    flags both scripts take (``-c -p --data_path --input_size --device``). Returns the COCO mAP@[.5:.95]
    (``mAP``), mAP@.5 (``AP50``; None where pycocotools gives NaN) and the seconds ``train.py`` ran
    (``train_s``). Raises :class:`ScriptFailed`."""
    seconds = run_logged(train_command(run, common, train_flags), run / "train.log", env)
    weights = find_resume_point(run / "ckpt" / project_name, compound_coef).weights
    metrics_file = run / "metrics.json"
    run_logged([sys.executable, str(REPO / "coco_eval.py"), *common, "-w", str(weights), "--output", str(run),
                "--save_json", str(metrics_file), "--no_progress"], run / "eval.log", env)
    metrics = json.loads(metrics_file.read_text())
    return {"mAP": metrics["AP"], "AP50": metrics["AP50"], "train_s": seconds}


def child_env(threads: Optional[int]) -> Optional[Dict[str, str]]:
    """The scripts' environment: this one with OMP_NUM_THREADS / MKL_NUM_THREADS = ``threads`` (torch's
    intra-op threads; ``train.py`` has no thread flag), or None (inherited) for None."""
    if threads is None:
        return None
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def seconds_per_step(times: Sequence[float]) -> float:
    """Seconds per step from ``times[i]``, the time the (i+1)-th step's record appeared in ``train_log.jsonl``:
    the mean interval after the first record (the first step carries one-off costs)."""
    if len(times) < 2:
        raise ValueError(f"calibration: {len(times)} training step(s) logged, need at least 2")
    return (times[-1] - times[0]) / (len(times) - 1)


def budget_steps(minutes: float, step_seconds: float) -> int:
    """``--max_steps`` for ``minutes`` of training at ``step_seconds`` per step (at least 1)."""
    return max(1, int(minutes * 60 // step_seconds))


def calibrate(cmd: Sequence[str], log: Path, train_log: Path, env: Optional[Mapping[str, str]] = None,
              poll_s: float = 0.02) -> float:
    """Run the training ``cmd`` (output to ``log``), noting when each step's line reaches ``train_log``; returns
    :func:`seconds_per_step`. Raises :class:`ScriptFailed`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    times: List[float] = []
    size = 0
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen(list(cmd), stdout=handle, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                finished = process.poll() is not None
                now = time.perf_counter()
                current = train_log.stat().st_size if train_log.is_file() else 0
                if current != size:
                    size = current
                    records = train_log.read_text(encoding="utf-8").count("\n")
                    times.extend([now] * (records - len(times)))
                if finished:
                    break
                time.sleep(poll_s)
        except BaseException:
            process.kill()
            process.wait()
            raise
    check_exit(cmd, process.returncode, log)
    return seconds_per_step(times)


@dataclass
class Row:
    """One line of a comparison: ``recipe`` (``--recipe`` SPEC) or ``flags`` (raw train.py flags)."""

    label: str
    recipe: Optional[str] = None
    flags: List[str] = field(default_factory=list)

    @property
    def row_flags(self) -> List[str]:
        """The row's own train.py flags."""
        return ["--recipe", self.recipe] if self.recipe is not None else list(self.flags)

    def folder(self, index: int) -> str:
        """``NN-label``, the label reduced to letters, digits, ``.``, ``_`` and ``-`` (at most 40)."""
        return f"{index:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', self.label).strip('_-')[:40]}"


def build_rows(recipes: Sequence[str], flag_rows: Sequence[str]) -> List[Row]:
    """The rows, recipes first; each recipe is resolved (an unknown name or a missing file raises here, before
    any training) and each flags row must parse as train.py flags and leave :data:`BENCHMARK_SETTINGS` alone."""
    import train  # the script's own parser

    rows = []
    for spec in recipes:
        recipe_file(spec)
        rows.append(Row(label=spec, recipe=spec))
    untouched = vars(train.parse_args([]))
    for text in flag_rows:
        tokens = shlex.split(text)
        try:
            given = vars(train.parse_args(tokens))
        except SystemExit:
            raise ValueError(f"--flags {text!r}: not valid train.py flags (see the message above)") from None
        fixed = [key for key in BENCHMARK_SETTINGS if given[key] != untouched[key]]
        if fixed:
            raise ValueError(f"--flags {text!r}: {', '.join('--' + k for k in fixed)} is set by the benchmark for "
                             f"every row (use its own options)")
        rows.append(Row(label=" ".join(tokens), flags=tokens))
    if not rows:
        raise ValueError("no rows: give --recipes NAME ... and/or --flags \"...\"")
    return rows


def print_table(heading: str, results: Sequence[Mapping[str, Any]]) -> None:
    """``heading``, then one line per result: row, steps, training minutes, mAP, mAP50 ('-' for None)."""
    def fmt(value: Optional[float]) -> str:
        return "     -" if value is None else f"{value:6.3f}"

    width = max(len("row"), *(len(r["row"]) for r in results))
    print(heading)
    print(f"{'row':{width}s} {'steps':>6s} {'train min':>9s} {'mAP':>6s} {'mAP50':>6s}")
    for r in results:
        print(f"{r['row']:{width}s} {r['steps']:6d} {r['train_s'] / 60:9.1f} {fmt(r['mAP'])} {fmt(r['AP50'])}")
