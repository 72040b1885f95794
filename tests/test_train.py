"""train.py end to end on a tiny synthetic project: learning, interrupt + exact resume, DDP on CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import pytest
import torch

import train
from tests.conftest import REPO, project_yaml

# Two layouts of large shapes (category, (x1, y1, x2, y2)) in a 128 x 128 image.
LAYOUTS = [
    [(1, (10, 12, 60, 50)), (2, (70, 60, 118, 108))],
    [(2, (20, 60, 84, 124)), (1, (64, 8, 120, 48))],
]
PROJECT_YAML = project_yaml("tiny", ["rectangle", "circle"])


def write_tiny_project(root: Path, num_train: int = 2, num_val: int = 2, size: int = 128) -> Path:
    """A two-class COCO project under ``root`` (images, annotations, YAML); returns the YAML path."""
    data = root / "datasets" / "tiny"
    for split, count in (("train", num_train), ("val", num_val)):
        (data / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image = np.full((size, size, 3), 30, np.uint8)
            for category, (x1, y1, x2, y2) in LAYOUTS[i % len(LAYOUTS)]:
                if category == 1:
                    cv2.rectangle(image, (x1, y1), (x2 - 1, y2 - 1), (0, 200, 255), -1)
                else:
                    cv2.ellipse(image, ((x1 + x2) // 2, (y1 + y2) // 2), ((x2 - x1) // 2, (y2 - y1) // 2),
                                0, 0, 360, (255, 128, 0), -1)
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": category,
                                    "iscrowd": 0, "area": (x2 - x1) * (y2 - y1), "bbox": [x1, y1, x2 - x1, y2 - y1]})
            cv2.imwrite(str(data / split / f"{i}.jpg"), image)
            images.append({"id": i, "file_name": f"{i}.jpg", "width": size, "height": size})
        (data / "annotations").mkdir(exist_ok=True)
        (data / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations,
             "categories": [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "circle"}]}))
    yaml_path = root / "tiny.yml"
    yaml_path.write_text(PROJECT_YAML)
    return yaml_path


def base_args(root: Path, yaml_path: Path, run: str) -> List[str]:
    return ["-c", "0", "-p", str(yaml_path), "--data_path", str(root / "datasets"), "--input_size", "128",
            "-n", "0", "--saved_path", str(root / run / "ckpt"), "--log_path", str(root / run / "logs"),
            "--device", "cpu"]


def read_log(root: Path, run: str, kind: str = "train") -> Dict[int, dict]:
    path = root / run / "logs" / "tiny" / "train_log.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records if r["kind"] == kind}


def test_interrupt_and_resume_continue_exactly(tmp_path):
    yaml_path = write_tiny_project(tmp_path, num_train=4)
    common = ["--batch_size", "2", "--lr", "1e-3", "--lr_schedule", "cosine", "--warmup_epochs", "1",
              "--num_epochs", "5", "--max_steps", "8", "--save_interval", "0", "--val_interval", "0", "--seed", "7"]

    # The uninterrupted reference run.
    assert train.main(train.parse_args(base_args(tmp_path, yaml_path, "ref") + common)) == 0
    reference = read_log(tmp_path, "ref")
    assert sorted(reference) == list(range(1, 9))

    # The same run, interrupted by SIGINT (as Ctrl+C) once a few steps are logged.
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "train.py")] + base_args(tmp_path, yaml_path, "run") + common
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(read_log(tmp_path, "run")) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "checkpoint saved" in output and "resume with -w last" in output
    done = max(read_log(tmp_path, "run"))
    assert 3 <= done < 8
    saved = list((tmp_path / "run" / "ckpt" / "tiny").glob("efficientdet-d0_*_*.pth"))
    assert [p.name for p in saved if p.name.endswith(f"_{done}.pth")], [p.name for p in saved]

    # Resume with -w last: the step counter, the learning rate and the losses continue exactly.
    assert train.main(train.parse_args(base_args(tmp_path, yaml_path, "run") + common + ["-w", "last"])) == 0
    resumed = read_log(tmp_path, "run")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(done + 1, 9):
        assert resumed[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-9), step
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5, abs=1e-6), step
    assert resumed[done + 1]["epoch"] == reference[done + 1]["epoch"]


def test_checkpoints_are_complete_and_atomic(tmp_path):
    yaml_path = write_tiny_project(tmp_path)
    args = base_args(tmp_path, yaml_path, "a") + ["--batch_size", "2", "--num_epochs", "2", "--save_interval", "1",
                                                  "--ema"]
    assert train.main(train.parse_args(args)) == 0
    folder = tmp_path / "a" / "ckpt" / "tiny"
    names = sorted(p.name for p in folder.iterdir())
    assert "efficientdet-d0_best.pth" in names
    assert "efficientdet-d0_0_1.pth" in names and "efficientdet-d0_1_2.pth" in names
    assert not [n for n in names if n.endswith(".tmp")]
    ckpt = torch.load(folder / "efficientdet-d0_1_2.pth", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "ema", "epoch", "step", "config"):
        assert key in ckpt, key
    assert ckpt["step"] == 2 and ckpt["epoch"] == 2
    assert ckpt["config"]["project"] == str(yaml_path)
    scalars = read_log(tmp_path, "a", "val")
    assert scalars and all(np.isfinite(r["loss"]) for r in scalars.values())
    assert (tmp_path / "a" / "logs" / "tiny" / "tensorboard").is_dir()


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    yaml_path = write_tiny_project(tmp_path)
    assert train.main(train.parse_args(base_args(tmp_path, yaml_path, "b") + ["--input_size", "100"])) != 0
    assert "multiple of 128" in capsys.readouterr().err
    assert train.main(train.parse_args(base_args(tmp_path, yaml_path, "b") + ["--batch_size", "1"])) != 0
    assert "BatchNorm needs more than one value" in capsys.readouterr().err
    assert train.main(train.parse_args(base_args(tmp_path, yaml_path, "b") + ["-w", "last"])) != 0
    assert "no checkpoint" in capsys.readouterr().err
    assert train.main(train.parse_args(base_args(tmp_path, yaml_path, "b") + ["-w", str(tmp_path / "x.pth")])) != 0
    assert "x.pth" in capsys.readouterr().err
    missing = tmp_path / "missing.yml"
    assert train.main(train.parse_args(["-p", str(missing)])) != 0
    assert "missing.yml" in capsys.readouterr().err


def test_torchrun_two_processes_on_cpu(tmp_path):
    yaml_path = write_tiny_project(tmp_path, num_train=8)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(29500 + os.getpid() % 1000), str(REPO / "train.py")]
    cmd += base_args(tmp_path, yaml_path, "ddp") + ["--batch_size", "2", "--num_epochs", "1", "--save_interval", "0",
                                                    "--val_interval", "1"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    folder = tmp_path / "ddp" / "ckpt" / "tiny"
    # 8 images, 2 ranks, batch 2: 2 steps per epoch; rank 0 alone writes.
    assert sorted(p.name for p in folder.glob("efficientdet-d0_*_*.pth")) == ["efficientdet-d0_0_2.pth"]
    assert sorted(read_log(tmp_path, "ddp")) == [1, 2]


def test_overfits_two_images_and_detects_their_boxes(tmp_path, monkeypatch):
    """Loss falls clearly, and the trained model finds every box of its training images (IoU > 0.5,
    right class). Also exercises --val_map (best by mAP), --debug images and the loss-curve PNG.

    From scratch, BN running statistics with the official momentum (0.01) need thousands of steps
    before eval mode matches train mode; --bn_momentum 0.1 lets 80 steps suffice."""
    from utils.inference import Detector

    yaml_path = write_tiny_project(tmp_path)
    monkeypatch.chdir(tmp_path)  # --debug writes to ./test/
    args = base_args(tmp_path, yaml_path, "fit") + [
        "--batch_size", "2", "--lr", "1e-3", "--no_flip", "--num_epochs", "80", "--save_interval", "0",
        "--val_interval", "40", "--val_map", "--seed", "0", "--bn_momentum", "0.1"]
    assert train.main(train.parse_args(args + ["--max_steps", "2", "--debug"])) == 0
    assert sorted(p.name for p in (tmp_path / "test").glob("debug_*.jpg")) == ["debug_e0_s1.jpg", "debug_e1_s2.jpg"]
    assert train.main(train.parse_args(args + ["-w", "last"])) == 0

    log = read_log(tmp_path, "fit")
    first = np.mean([log[s]["loss"] for s in (1, 2, 3)])
    last = np.mean([log[s]["loss"] for s in (78, 79, 80)])
    assert last < 0.2 * first, (first, last)
    val = read_log(tmp_path, "fit", "val")
    assert [r["step"] for r in val.values()] == [40, 80] and val[80]["mAP"] > 0.5
    assert (tmp_path / "fit" / "logs" / "tiny" / "loss_curves.png").stat().st_size > 1000

    best = tmp_path / "fit" / "ckpt" / "tiny" / "efficientdet-d0_best.pth"
    detector = Detector.from_checkpoint(0, best, yaml_path, input_size=128, device="cpu", threshold=0.3)
    images = [str(tmp_path / "datasets" / "tiny" / "train" / f"{i}.jpg") for i in range(2)]
    for layout, dets in zip(LAYOUTS, detector.detect(images)):
        for category, box in layout:
            ious = [_iou(box, found) for found, cls in zip(dets.boxes, dets.class_ids) if cls == category - 1]
            assert ious and max(ious) > 0.5, (category, box, dets)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
