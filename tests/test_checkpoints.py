"""utils/weights/checkpoints.py and the atomic writer of utils/weights/loading.py: published-format files, the training
state beside them, the ``last`` pointer, disk full, killed saves, file modes."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
import utils.training.runfolder
import utils.weights.loading
from tests.test_train import base_args, ckpt_dir, latest_state, read_log, write_tiny_project
from utils.weights.checkpoints import (find_resume_point, pointer_path, read_state, save_checkpoint,
                               state_path, step_from_name)
from utils.weights.loading import atomic_save, first_non_finite, remove_stale_temp_files


def small_state_dict(value: float = 1.0):
    return {"a.weight": torch.full((2, 2), value), "a.num_batches_tracked": torch.tensor(3)}


def test_step_from_name_reads_the_published_names():
    assert step_from_name("logs/shape/efficientdet-d0_49_1400.pth") == 1400
    assert step_from_name("efficientdet-d0_best.pth") is None
    assert step_from_name("weights/efficientdet-d0.pth") is None


def test_first_non_finite_walks_nested_state():
    assert first_non_finite({"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}}, "best": float("inf")}) is None
    bad = {"optimizer": {"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")])}}}}
    assert first_non_finite(bad) == "optimizer.state.0.exp_avg"


def test_pair_pointer_and_refusal_of_non_finite(tmp_path):
    path = save_checkpoint(tmp_path, "efficientdet-d0_0_1.pth", small_state_dict(), {"run": {"step": 1}}, 0)
    assert torch.load(path, weights_only=True).keys() == small_state_dict().keys()  # plain state_dict
    assert read_state(path)["run"]["step"] == 1
    assert find_resume_point(tmp_path, 0).weights == path

    with pytest.raises(ValueError, match=r"refusing to write .*efficientdet-d0_0_2.pth: 'a.weight'"):
        save_checkpoint(tmp_path, "efficientdet-d0_0_2.pth", small_state_dict(float("nan")), {}, 0)
    with pytest.raises(ValueError, match=r"efficientdet-d0_0_3.state.pt: 'optimizer.m'"):
        save_checkpoint(tmp_path, "efficientdet-d0_0_3.pth", small_state_dict(),
                        {"optimizer": {"m": torch.tensor([float("inf")])}}, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "efficientdet-d0_0_1.pth", "efficientdet-d0_0_1.state.pt", "efficientdet-d0_last.json"]


def test_the_pointer_records_epoch_and_step_of_the_save(tmp_path):
    save_checkpoint(tmp_path, "efficientdet-d0_2_7.pth", small_state_dict(), {"run": {"epoch": 3, "step": 7}}, 0)
    assert json.loads(pointer_path(tmp_path, 0).read_text()) == {
        "weights": "efficientdet-d0_2_7.pth", "state": "efficientdet-d0_2_7.state.pt", "epoch": 3, "step": 7}


def test_a_replaced_weights_file_is_not_resumed_with_its_old_state(tmp_path):
    path = save_checkpoint(tmp_path, "efficientdet-d0_0_1.pth", small_state_dict(), {"run": {"step": 1}}, 0)
    torch.save(small_state_dict(2.0), path)
    with pytest.raises(ValueError, match="does not belong to efficientdet-d0_0_1.pth"):
        read_state(path)


def test_save_killed_between_files_resumes_the_previous_pair(tmp_path):
    """The pointer is replaced last: a state file written without its weights (killed in between) is ignored."""
    first = save_checkpoint(tmp_path, "efficientdet-d0_0_1.pth", small_state_dict(), {"run": {"step": 1}}, 0)
    atomic_save({"run": {"step": 2}}, state_path(tmp_path / "efficientdet-d0_0_2.pth"))
    assert find_resume_point(tmp_path, 0).weights == first
    assert json.loads(pointer_path(tmp_path, 0).read_text())["weights"] == first.name


def test_disk_full_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "w.pth"
    atomic_save(small_state_dict(1.0), target)
    before = target.read_bytes()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.weights.loading.os, "write", full)
    with pytest.raises(OSError, match=r"^\[Errno 28\] cannot write .*w.pth: No space left on device$"):
        atomic_save(small_state_dict(2.0), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]  # no temporary file left


def test_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write .*file/w.pth"):
        atomic_save(small_state_dict(), blocker / "w.pth")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_file_modes_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_save(small_state_dict(), tmp_path / "w.pth")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".efficientdet-d0_0_1.pth.{dead_pid}.abcd1234.tmp"
    stale.write_bytes(b"x" * 100)
    live = tmp_path / f".efficientdet-d0_0_2.pth.{os.getppid()}.abcd1234.tmp"  # a running process's save
    live.write_bytes(b"y")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


# --------------------------------------------------------------------------------------------------
# In train.py


def test_train_disk_full_exits_non_zero_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    yaml_path = write_tiny_project(tmp_path)
    args = base_args(tmp_path, yaml_path, "d") + ["--batch_size", "2", "--save_interval", "1", "--val_interval", "0"]
    assert train.main(train.parse_args(args + ["--max_steps", "1"])) == 0
    folder = ckpt_dir(tmp_path, "d")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.weights.loading.os, "write", full)
    # Full before the start: the probe of the folder stops the run before step 1.
    assert train.main(train.parse_args(args + ["-w", "last", "--max_steps", "2"])) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: [Errno 28] cannot write checkpoints to") and "No space left" in err[-1]
    assert not read_log(tmp_path, "d").get(2)
    # Full once training runs (the probe passed): the save fails in one line.
    monkeypatch.setattr(utils.training.runfolder, "check_writable", lambda folder: folder)
    assert train.main(train.parse_args(args + ["-w", "last", "--max_steps", "2"])) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: [Errno 28] cannot write") and "No space left on device" in err[-1]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # intact, and no temporary file
    monkeypatch.undo()
    assert train.main(train.parse_args(args + ["-w", "last", "--max_steps", "2"])) == 0
    assert sorted(read_log(tmp_path, "d")) == [1, 2]


def test_train_after_kill_during_save_cleans_up_and_resumes(tmp_path):
    """kill -9 while the training process writes a checkpoint: its temporary file is removed at the next
    start and -w last resumes from the last complete save."""
    yaml_path = write_tiny_project(tmp_path)
    args = base_args(tmp_path, yaml_path, "k") + ["--batch_size", "2", "--save_interval", "1", "--val_interval", "0"]
    assert train.main(train.parse_args(args + ["--max_steps", "1"])) == 0
    folder = ckpt_dir(tmp_path, "k")
    # A real process killed with SIGKILL in the middle of writing (after the temporary file is created).
    script = (f"import os, signal, sys; sys.path.insert(0, {str(Path(train.__file__).parent)!r}); import utils.weights.loading as w\n"
              "real = os.write\n"
              "def write(fd, data):\n    real(fd, bytes(data[:1000])); os.kill(os.getpid(), signal.SIGKILL)\n"
              "w.os.write = write\n"
              f"w.atomic_save({{'x': __import__('torch').zeros(100000)}}, {str(folder / 'efficientdet-d0_0_2.pth')!r})\n")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert killed.returncode == -9
    assert list(folder.glob(".*.tmp")) and not (folder / "efficientdet-d0_0_2.pth").exists()
    assert train.main(train.parse_args(args + ["-w", "last", "--max_steps", "2"])) == 0
    assert not list(folder.glob(".*.tmp"))
    assert sorted(read_log(tmp_path, "k")) == [1, 2] and latest_state(tmp_path, "k")["run"]["step"] == 2


def test_num_gpus_starts_the_processes_itself(tmp_path):
    """num_gpus: 2 in the YAML trains with 2 processes without torchrun (gloo on the CPU here);
    --batch_size 4 is the total, 2 per process: 8 images give 2 steps per epoch."""
    yaml_path = write_tiny_project(tmp_path, num_train=8)
    yaml_path.write_text(yaml_path.read_text().replace("num_gpus: 1", "num_gpus: 2"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(train.__file__))] + base_args(tmp_path, yaml_path, "ng") + [
        "--num_epochs", "1", "--save_interval", "0", "--val_interval", "1"]
    result = subprocess.run(cmd + ["--batch_size", "4"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "starting 2 training processes" in result.stdout and "2 images each" in result.stdout
    assert sorted(p.name for p in ckpt_dir(tmp_path, "ng").glob("efficientdet-d0_*_*.pth")) == ["efficientdet-d0_0_2.pth"]
    assert sorted(read_log(tmp_path, "ng")) == [1, 2]

    odd = subprocess.run(cmd + ["--batch_size", "3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert odd.returncode == 1 and "--batch_size 3 is the total over 2 processes" in odd.stderr
