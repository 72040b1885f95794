"""Refused checkpoints: a file that would run code when unpickled is refused by every script, with one line
that names what it held, and nothing runs; an exact resume refuses other anchor or class counts."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

import coco_eval
import efficientdet_test
import train
from tests.conftest import project_yaml
from tests.test_train import base_args, write_tiny_project
from utils.weights.loading import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


class RunsCommand:
    """Unpickling calls ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class CallsPrint:
    def __reduce__(self):
        return print, ("unpickled",)


class Custom:
    pass


def pickled_code(path: Path, marker: Path) -> Path:
    """A .pth whose state_dict-like dict also holds an object that runs ``touch marker`` when unpickled."""
    torch.save({"bifpn.0.p6_w1": torch.ones(2), "payload": RunsCommand(f"touch {marker}")}, path)
    return path


def refused(path: Path, held: str) -> str:
    return (f"{path}: refused: loading this file would run code (it holds {held}); a weights file holds only "
            "tensors, as torch.save(model.state_dict(), path) writes")


@pytest.mark.parametrize("payload, held", [
    (RunsCommand("true"), f"{os.system.__module__}.system"),
    (CallsPrint(), "builtins.print"),
    (Custom(), f"{Custom.__module__}.Custom"),
    (torch.nn.Linear(1, 1), "torch.nn.modules.linear.Linear"),  # a whole pickled module, not its state_dict
])
def test_pickled_objects_are_refused_by_name(payload, held, tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"weights": torch.zeros(1), "extra": payload}, path)
    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert message == refused(path, held)
    assert "weights_only" not in message and "False" not in message and "trust" not in message


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err[len("error: "):]


def test_scripts_refuse_pickled_code_and_run_nothing(tmp_path, capsys):
    yaml_path = write_tiny_project(tmp_path)
    marker = tmp_path / "MARKER"
    evil = pickled_code(tmp_path / "evil.pth", marker)
    held = f"{os.system.__module__}.system"
    control = tmp_path / "CONTROL"
    torch.load(pickled_code(tmp_path / "control.pth", control), weights_only=False)
    assert control.exists()  # the payload does run when the file is loaded unchecked

    assert train.main(train.parse_args(base_args(tmp_path, yaml_path, "t") + ["-w", str(evil)])) != 0
    assert one_error_line(capsys) == refused(evil, held)

    datasets = tmp_path / "datasets"
    assert coco_eval.main(coco_eval.parse_args([
        "-c", "0", "-p", str(yaml_path), "-w", str(evil), "--data_path", str(datasets), "--input_size", "128",
        "--output", str(tmp_path / "eval"), "--device", "cpu", "--no_progress"])) != 0
    assert one_error_line(capsys) == refused(evil, held)

    assert efficientdet_test.main(efficientdet_test.parse_args([
        "-c", "0", "-p", str(yaml_path), "-w", str(evil), "--images", str(datasets / "tiny" / "val" / "0.jpg"),
        "--output", str(tmp_path / "out"), "--device", "cpu", "--input_size", "128"])) != 0
    assert one_error_line(capsys) == refused(evil, held)
    assert not marker.exists()


def test_exact_resume_refuses_another_class_count(tmp_path, capsys, caplog):
    yaml_path = write_tiny_project(tmp_path)
    short = ["--batch_size", "2", "--max_steps", "1", "--val_interval", "0"]
    assert train.main(train.parse_args(base_args(tmp_path, yaml_path, "r") + short)) == 0
    capsys.readouterr()
    yaml_path.write_text(project_yaml("tiny", ["rectangle", "circle", "triangle"]))
    with caplog.at_level(logging.INFO):
        assert train.main(train.parse_args(base_args(tmp_path, yaml_path, "r") + short + ["-w", "last"])) != 0
    message = one_error_line(capsys)
    assert message.endswith(": checkpoint has 2 classes, model has 3: cannot resume exactly; pass the file "
                            "with -w FILE to fine-tune")
    assert Path(message.split(": ")[0]).name.startswith("efficientdet-d0_")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "re-initialised" in r.getMessage()]
