"""Training recipes against each other: validation COCO mAP after the same training budget.

    python benchmark/recipes.py                                        # scratch, published, official on shape
    python benchmark/recipes.py --recipes scratch --flags "--lr 2e-3 --lr_schedule cosine --loss official"
    python benchmark/recipes.py --input_size 256 --minutes 30 --json recipes.json
    python benchmark/recipes.py --dataset longthin --steps 600         # the anchor_fit set, fitted anchors

One row per recipe (``--recipes``: ``train.py --recipe NAME|FILE.yml``) and per ``--flags "..."`` (raw train.py
flags). Every row trains with ``train.py`` from the same seed, data order, batch size and input size for the
same budget (``--steps N``, or ``--minutes M`` turned into steps by a calibration run of the row), then
``coco_eval.py`` evaluates its last weights on the val set; each row in ``WORK/NN-ROW/``. The method is in
benchmark/README.md, "Training recipes".
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmark import anchor_fit  # noqa: E402
from benchmark.training_runs import (Row, budget_steps, build_rows, calibrate, child_env, print_table,  # noqa: E402
                                     train_and_evaluate, train_command)
from utils.config.cli import run_script  # noqa: E402
from utils.config.project import ProjectConfig, load_project  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="*", default=["scratch", "published", "official"], metavar="NAME|FILE.yml",
                   help="recipe rows (default: %(default)s; --recipes alone: none)")
    p.add_argument("--flags", action="append", default=[], metavar='"FLAGS"',
                   help='a row of raw train.py flags, e.g. "--lr 2e-3 --lr_schedule cosine" (repeatable)')
    data = p.add_mutually_exclusive_group()
    data.add_argument("--dataset", choices=("shape", "longthin"), default="shape",
                      help="shape (under --data_path) or longthin (anchor_fit.py's set, fitted anchors, written "
                           "under WORK/longthin); default %(default)s")
    data.add_argument("-p", "--project", default=None, help="any project (NAME or YAML) under --data_path instead")
    p.add_argument("--data_path", default="datasets/", help="root of the datasets (default %(default)s)")
    p.add_argument("-c", "--compound_coef", type=int, default=0, help="EfficientDet D0..D7x (default 0)")
    p.add_argument("--input_size", type=int, default=None, help="default: the model's; 256 for longthin")
    p.add_argument("--batch_size", type=int, default=8, help="every row's (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="every row's (default %(default)s)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="training steps per row (default 250)")
    budget.add_argument("--minutes", type=float, default=None, help="training minutes per row (calibrated)")
    p.add_argument("--calibration_steps", type=int, default=10, help="steps timed per calibration (default 10)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL_NUM_THREADS of the scripts (default: ours)")
    p.add_argument("-n", "--num_workers", type=int, default=0, help="train.py loader workers (default 0)")
    p.add_argument("--device", default="cpu", help="the scripts' --device (default %(default)s)")
    p.add_argument("--work", type=Path, default=Path("/tmp/effdet_recipes"), help="work folder (default %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the settings and rows as JSON")
    return p.parse_args(argv)


def longthin_project(work: Path, input_size: int) -> Path:
    """``benchmark/anchor_fit.py``'s set (its defaults, images of ``input_size`` px) and its project with the
    fitted anchors under ``work/longthin``, written once per set of parameters (``dataset.json``)."""
    fit = anchor_fit.parse_args(["--size", str(input_size)])
    folder, project = work / "longthin", work / "longthin" / "bars_fitted.yml"
    stamp = {"size": fit.size, "num_train": fit.num_train, "num_val": fit.num_val, "aspect": list(fit.aspect),
             "seed": fit.seed}
    stamp_file = folder / "dataset.json"
    if not (project.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp):
        print(f"writing the longthin set under {folder}", flush=True)
        anchor_fit.write_bars(folder, fit.size, fit.num_train, fit.num_val, tuple(fit.aspect), fit.seed)
        stamp_file.write_text(json.dumps(stamp))
    return project


def dataset(args: argparse.Namespace) -> Tuple[str, str, Optional[int], ProjectConfig]:
    """(project, data path, input size, its config) of ``--dataset`` / ``-p``; FileNotFoundError without data."""
    project, data_path, input_size = args.project or "shape", args.data_path, args.input_size
    if args.project is None and args.dataset == "longthin":
        input_size = input_size or anchor_fit.parse_args([]).size
        project, data_path = str(longthin_project(args.work, input_size)), str(args.work / "longthin" / "datasets")
    config = load_project(project)
    for split in (config.train_set, config.val_set):
        annotations = Path(data_path) / config.project_name / "annotations" / f"instances_{split}.json"
        if not annotations.is_file():
            raise FileNotFoundError(f"{annotations} not found (--data_path {data_path}; the shape set: "
                                    f"python tools/make_shape_dataset.py --out DATA_PATH/shape)")
    return project, data_path, input_size, config


def train_flags(args: argparse.Namespace, row: Row, steps: int) -> List[str]:
    """``row``'s train.py flags after the common ones: batch size and workers (the row's flags may change them),
    the row's own, then the seed and the budget (``--num_epochs`` = steps: ``--max_steps`` ends the run and its
    schedule), no validation and no intermediate checkpoints."""
    return ["--batch_size", str(args.batch_size), "-n", str(args.num_workers), *row.row_flags, "--seed",
            str(args.seed), "--num_epochs", str(steps), "--max_steps", str(steps), "--val_interval", "0",
            "--save_interval", "0"]


def run(args: argparse.Namespace) -> int:
    counts = [value for value in (args.steps, args.calibration_steps, args.threads) if value is not None]
    if min(counts) < 1 or args.minutes is not None and args.minutes <= 0:
        raise ValueError(f"--steps, --calibration_steps and --threads must be >= 1 and --minutes > 0, got "
                         f"{args.steps}, {args.calibration_steps}, {args.threads}, {args.minutes}")
    steps = args.steps or 250
    rows = build_rows(args.recipes, args.flags)
    project, data_path, input_size, config = dataset(args)
    common = ["-c", str(args.compound_coef), "-p", project, "--data_path", data_path, "--device", args.device]
    common += ["--input_size", str(input_size)] if input_size else []
    env = child_env(args.threads)
    heading = (f"D{args.compound_coef} on {config.project_name} (--data_path {data_path}), input "
               f"{input_size or 'the model default'}, batch {args.batch_size}, seed {args.seed}, "
               f"{f'{args.minutes:g} training minutes' if args.minutes else f'{steps} steps'} per row, "
               f"threads {args.threads or 'inherited'}, device {args.device}")
    print(heading, flush=True)
    results: List[Dict[str, Any]] = []
    for index, row in enumerate(rows):
        folder, step_seconds = args.work / row.folder(index), None
        shutil.rmtree(folder, ignore_errors=True)
        if args.minutes:
            cal = folder / "calibrate"
            step_seconds = calibrate(train_command(cal, common, train_flags(args, row, args.calibration_steps + 1)),
                                     cal / "train.log", cal / "logs" / config.project_name / "train_log.jsonl", env)
            steps = budget_steps(args.minutes, step_seconds)
            print(f"{row.label}: {step_seconds:.3f} s/step over {args.calibration_steps} steps -> --max_steps "
                  f"{steps} for {args.minutes:g} minutes", flush=True)
        print(f"{row.label}: training {steps} steps, log {folder / 'train.log'}", flush=True)
        flags = train_flags(args, row, steps)
        metrics = train_and_evaluate(folder, common, flags, config.project_name, args.compound_coef, env)
        results.append({"row": row.label, "recipe": row.recipe, "flags": row.flags or None, "steps": steps,
                        "s_per_step": step_seconds, **metrics, "folder": str(folder), "train_args": [*common, *flags]})
    print_table(heading, results)
    if args.json:
        settings = {**vars(args), "dataset": None if args.project else args.dataset, "work": str(args.work),
                    "project": project, "data_path": data_path, "input_size": input_size}
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": results}, indent=2))
    return 0


def main(args: argparse.Namespace) -> int:
    """:func:`run` with one ``error:`` line (and a failed script's last lines) instead of a traceback."""
    return run_script(run, args, keep_memory=False)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
