"""Stopping and resuming train.py: signals in every phase (to the process group, DataLoader workers included),
the printed resume command, the settings a resume keeps, runs with nothing to do, missing or damaged checkpoint
files, the checkpoint folder's probe and lock, and the schedule of a fine-tune that continues a step count."""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

import train
from backbone import EfficientDet
from tests.conftest import REPO
from tests.test_train import base_args, ckpt_dir, latest_state, read_log, run_train, write_tiny_project
from utils.training.runfolder import LOCK_NAME
from utils.training.settings import DEFAULTS
from utils.weights.checkpoints import save_checkpoint, state_path


def _train_subprocess(cwd: Path, argv: List[str], signal_at: str = "") -> Tuple[int, str]:
    """train.py in its own session (a signal to its process group reaches nothing else), one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", EFFDET_SIGNAL_AT=signal_at)
    result = subprocess.run([sys.executable, str(REPO / "train.py")] + argv, cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600, start_new_session=True)
    return result.returncode, result.stdout + result.stderr


def _printed_resume(output: str) -> List[str]:
    """The arguments of the ``resume with: python train.py ...`` line, as printed."""
    line = [ln for ln in output.splitlines() if "resume with: " in ln][-1]
    words = shlex.split(line.split("resume with: ")[1])
    assert words[:2] == ["python", "train.py"], line
    return words[2:]


def _records(root: Path, run: str) -> List[tuple]:
    path = root / run / "logs" / "tiny" / "train_log.jsonl"
    return [(r["kind"], r["step"], r["epoch"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def _pairs(root: Path, run: str) -> List[str]:
    return sorted(p.name for p in ckpt_dir(root, run).glob("efficientdet-d0_*_*.pth"))


EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


@pytest.mark.slow
@pytest.mark.parametrize("at_train, at_save, at_val", [("SIGTERM", "SIGINT", "SIGTERM"),
                                                        ("SIGINT", "SIGTERM", "SIGINT")])
def test_stops_in_every_phase_by_group_signals_resume_exactly_with_the_printed_command(tmp_path, at_train, at_save,
                                                                                       at_val):
    """SIGTERM / SIGINT to the whole process group (2 DataLoader workers) during a training step, a save and a
    validation (each signal in each phase over the two cases): each exits 130 / 143 with one checkpoint pair for
    the point reached (none new when a save holds it), and the printed command alone continues the run exactly:
    the log equals the uninterrupted run's."""
    yaml_path = write_tiny_project(tmp_path, num_train=4, num_val=4)  # 2 steps and 2 val batches per epoch
    settings = ["--batch_size", "2", "-n", "2", "--num_epochs", "3", "--save_interval", "0", "--seed", "3"]
    assert _train_subprocess(tmp_path, base_args(tmp_path, yaml_path, "ref") + settings)[0] == 0
    reference = _records(tmp_path, "ref")
    assert [r[:2] for r in reference] == [("train", 1), ("train", 2), ("val", 2), ("train", 3), ("train", 4),
                                          ("val", 4), ("train", 5), ("train", 6), ("val", 6)]

    code, out = _train_subprocess(tmp_path, base_args(tmp_path, yaml_path, "run") + settings, f"train:3:{at_train}:group")
    assert code == EXIT_CODES[at_train], out
    assert "checkpoint saved to" in out and "DataLoader worker" not in out
    assert _pairs(tmp_path, "run") == ["efficientdet-d0_0_2.pth", "efficientdet-d0_1_3.pth"]  # epoch end, stop
    resume = _printed_resume(out)
    assert resume[:4] == ["-c", "0", "-p", str(yaml_path)] and "-w" in resume and len(resume) == 8  # + saved_path

    code, out = _train_subprocess(tmp_path, resume, f"save:1:{at_save}:group")  # the epoch-end save at step 4
    assert code == EXIT_CODES[at_save], out
    assert "efficientdet-d0_1_4.pth holds this point" in out
    code, out = _train_subprocess(tmp_path, _printed_resume(out), f"val:1:{at_val}:group")  # its pending validation
    assert code == EXIT_CODES[at_val], out
    assert "efficientdet-d0_1_4.pth holds this point" in out
    assert _pairs(tmp_path, "run") == ["efficientdet-d0_0_2.pth", "efficientdet-d0_1_3.pth", "efficientdet-d0_1_4.pth"]
    code, out = _train_subprocess(tmp_path, _printed_resume(out))
    assert code == 0, out
    assert _records(tmp_path, "run") == reference


def test_resume_keeps_every_setting_and_an_explicit_flag_wins(tmp_path, monkeypatch, capsys):
    """A run at 256 px, batch 4, no workers, stopped by a signal: ``-w last`` alone keeps them (reported);
    ``-w last --batch_size 2`` changes that one only (reported)."""
    yaml_path = write_tiny_project(tmp_path, num_train=8)
    saved_path = str(tmp_path / "s" / "ckpt")
    first = base_args(tmp_path, yaml_path, "s") + ["--input_size", "256", "--batch_size", "4", "-n", "0",
                                                   "--num_epochs", "3", "--val_interval", "0", "--ema"]
    monkeypatch.setenv("EFFDET_SIGNAL_AT", "train:1:SIGINT")  # this process: stop after the next step
    assert train.main(train.parse_args(first)) == 130
    resume = _printed_resume(capsys.readouterr().out)
    assert resume == ["-c", "0", "-p", str(yaml_path), "-w", "last", "--saved_path", saved_path]

    assert train.main(train.parse_args(resume)) == 130
    out = capsys.readouterr().out
    kept = [line for line in out.splitlines() if line.startswith("settings of the resumed run:")]
    assert len(kept) == 1 and all(f in kept[0] for f in ("--input_size 256", "--batch_size 4", "-n 0", "--ema True"))
    assert "replaces" not in out
    state = latest_state(tmp_path, "s")
    assert state["run"]["step"] == 2 and state["input_size"] == 256 and state["ema"] is not None
    assert {k: state["config"][k] for k in ("input_size", "batch_size", "num_workers", "val_interval")} == {
        "input_size": 256, "batch_size": 4, "num_workers": 0, "val_interval": 0}

    assert train.main(train.parse_args(resume + ["--batch_size", "2"])) == 130
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "replaces" in line] == ["--batch_size 2 replaces the resumed run's 4"]
    state = latest_state(tmp_path, "s")
    assert state["run"]["step"] == 3 and state["config"]["batch_size"] == 2 and state["config"]["input_size"] == 256
    assert sorted(read_log(tmp_path, "s")) == [1, 2, 3]


def test_parser_marks_what_was_given(capsys):
    """Every setting a resume keeps parses to None unless given; --help shows the real defaults."""
    args = train.parse_args(["-p", "x"])
    assert all(getattr(args, key) is None for key in DEFAULTS)
    given = train.parse_args(["--batch_size", "4", "--ema", "--no_flip", "False", "-n", "0"])
    assert (given.batch_size, given.ema, given.no_flip, given.num_workers, given.lr) == (4, True, False, 0, None)
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 12)" in text and "(default: 0.0001)" in text and "(default: 500)" in text


def test_a_run_with_nothing_to_do_says_so(tmp_path, capsys):
    """A fine-tune whose continued step count is past --num_epochs, and a resume already at --max_steps:
    one line with the numbers, exit 0, nothing trained or written."""
    yaml_path = write_tiny_project(tmp_path)  # 2 images, batch 2: 1 step per epoch
    weights = tmp_path / "efficientdet-d0_0_4.pth"
    torch.save(EfficientDet(num_classes=2, compound_coef=0).state_dict(), weights)
    assert run_train(tmp_path, yaml_path, "n", "--batch_size", "2", "-w", str(weights), "--num_epochs", "1") == 0
    out = capsys.readouterr().out
    assert ("nothing to train: the run is at step 4 (epoch 5, 0 of its 1 steps done), and --num_epochs 1 ends it "
            "there; give a larger --num_epochs to train on") in out
    assert not read_log(tmp_path, "n") and not _pairs(tmp_path, "n")

    common = ["--batch_size", "2", "--val_interval", "0", "--save_interval", "0"]
    assert run_train(tmp_path, yaml_path, "m", *common, "--max_steps", "1") == 0
    assert run_train(tmp_path, yaml_path, "m", "-w", "last") == 0
    assert "nothing to train: the run is at step 1 (epoch 1, 1 of its 1 steps done), and --max_steps 1 ends it" \
           in capsys.readouterr().out
    assert sorted(read_log(tmp_path, "m")) == [1] and _pairs(tmp_path, "m") == ["efficientdet-d0_0_1.pth"]


def test_fine_tune_schedule_spans_the_steps_left(tmp_path, capsys):
    """-w efficientdet-d0_3_5.pth continues at step 5; --num_epochs 9 at 1 step per epoch ends at step 9: warm-up
    (1 step) and cosine run over steps 6-9, from lr/10 at the first to 0 at the last."""
    yaml_path = write_tiny_project(tmp_path)
    weights = tmp_path / "efficientdet-d0_3_5.pth"
    torch.save(EfficientDet(num_classes=2, compound_coef=0).state_dict(), weights)
    lr, steps, warmup = 1e-3, 4, 1
    assert run_train(tmp_path, yaml_path, "c", "--batch_size", "2", "-w", str(weights), "--lr", str(lr),
                     "--lr_schedule", "cosine", "--warmup_epochs", "1", "--num_epochs", "9", "--val_interval", "0",
                     "--save_interval", "0") == 0
    out = capsys.readouterr().out
    assert "lr schedule: steps 6-9: linear warm-up over 1 steps from 0.0001 to 0.001, then cosine to 0 at step 9" in out

    def official(k: int) -> float:  # k: steps of this run done before the step
        if k < warmup:
            return lr * (0.1 + 0.9 * k / warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - 1 - warmup)))

    log = read_log(tmp_path, "c")
    assert sorted(log) == [6, 7, 8, 9]
    assert log[6]["lr"] == pytest.approx(lr / 10, rel=1e-9) and log[9]["lr"] == pytest.approx(0.0, abs=1e-15)
    for k, step in enumerate(range(6, 10)):
        assert log[step]["lr"] == pytest.approx(official(k), rel=1e-9, abs=1e-15), step


def _pair(folder: Path) -> Path:
    """A checkpoint pair named by the ``last`` pointer, and an older one beside it."""
    save_checkpoint(folder, "efficientdet-d0_0_1.pth", {"w": torch.ones(2)}, {"run": {"step": 1}}, 0)
    return save_checkpoint(folder, "efficientdet-d0_0_2.pth", {"w": torch.ones(3)}, {"run": {"step": 2}}, 0)


@pytest.mark.parametrize("damage, expected", [
    ("state missing", "{state}: missing, so efficientdet-d0_0_2.pth cannot be resumed exactly (-w last needs its "
                      "training state); to fine-tune from its weights instead: -w {weights}"),
    ("state damaged", "{state}: not a readable PyTorch checkpoint"),
    ("weights missing", "{weights}: the weights of the last save are missing (its efficientdet-d0_0_2.state.pt "
                        "is there): nothing to resume; fine-tune from another checkpoint's weights with -w FILE.pth "
                        "(e.g. {older})"),
    ("weights damaged", "{weights}: not a readable PyTorch checkpoint"),
])
def test_last_with_a_missing_or_damaged_file_stops_in_one_line(tmp_path, capsys, damage, expected):
    yaml_path = write_tiny_project(tmp_path)
    folder = ckpt_dir(tmp_path, "x")
    weights = _pair(folder)
    target = state_path(weights) if damage.startswith("state") else weights
    if damage.endswith("missing"):
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:100])
    assert run_train(tmp_path, yaml_path, "x", "-w", "last") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and err[-1].startswith("error: ")
    assert expected.format(state=state_path(weights), weights=weights, older=folder / "efficientdet-d0_0_1.pth") \
        in err[-1]
    if damage == "state damaged":
        assert err[-1].endswith(f"the training state of efficientdet-d0_0_2.pth is damaged; to fine-tune from its "
                                f"weights instead: -w {weights}")
    if damage == "weights damaged":
        assert "the weights file is damaged, its training state efficientdet-d0_0_2.state.pt is of no use" in err[-1]
    assert not (tmp_path / "x" / "logs").exists()  # stopped before training


def test_an_unwritable_save_folder_stops_before_the_first_step(tmp_path, capsys):
    yaml_path = write_tiny_project(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = base_args(tmp_path, yaml_path, "u") + ["--batch_size", "2", "--saved_path", str(blocker / "ckpt")]
    assert train.main(train.parse_args(argv)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: [Errno") and f"cannot write checkpoints to {blocker / 'ckpt' / 'tiny'}" in err[-1]
    assert not read_log(tmp_path, "u")


def test_a_second_run_on_a_locked_folder_stops_naming_the_first(tmp_path, capsys, caplog):
    """A lock of a live process stops the run in one line (pid, start time); one of a process that is gone is
    taken over, and the run releases its own lock at exit."""
    import socket

    yaml_path = write_tiny_project(tmp_path)
    folder = ckpt_dir(tmp_path, "l")
    folder.mkdir(parents=True)
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": first.pid, "host": socket.gethostname(), "started": "2030-01-02 03:04:05"}
        (folder / LOCK_NAME).write_text(json.dumps(lock))
        argv = ["--batch_size", "2", "--num_epochs", "0"]
        assert run_train(tmp_path, yaml_path, "l", *argv) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"another training run (pid {first.pid} on {lock['host']}, started 2030-01-02 03:04:05)" in err
        assert str(folder) in err
    finally:
        first.kill()
        first.wait()
    assert run_train(tmp_path, yaml_path, "l", *argv) == 0  # the lock of a process that is gone: taken over
    assert "taking over the lock" in caplog.text and "nothing to train" in capsys.readouterr().out
    assert not (folder / LOCK_NAME).exists()
