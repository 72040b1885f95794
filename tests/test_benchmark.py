"""benchmark/benchmark.py: runs in-process, reports every mode against eager, emulates a confident model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backbone import EfficientDet
from benchmark import benchmark, speed
from utils.inference.postprocess import Detections


def test_benchmark_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = benchmark.main(benchmark.parse_args(["-c", "0", "--input_size", "128", "--runs", "2", "--rounds", "2",
                                              "--batch_sizes", "1", "2", "--modes", "eager", "fused+trace",
                                              "--json", str(out)]))
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out.read_text())
    results = {(r["mode"], r["batch_size"]): r for r in data["results"]}
    assert set(results) == {("eager", 1), ("fused+trace", 1), ("eager", 2), ("fused+trace", 2)}
    for (mode, batch), r in results.items():
        assert len(r["times_ms"]) == 4  # 2 rounds of 2 timed runs
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["min_ms"] <= r["mean_ms"] <= r["max_ms"]
        assert 0 < r["post_share"] < 1
        assert r["differing_images"] == 0  # fp32 modes: the same detections as eager
        assert r["detections"] == results[("eager", batch)]["detections"]
    assert results[("eager", 1)]["ratio_vs_eager"] == 1.0
    assert "x eager" in printed and "images/s batch 2 / batch 1" in printed


def test_each_round_warms_up_then_times_consecutive_runs_per_mode(monkeypatch):
    # The published method per mode: one warm-up, then the timed runs back to back (not interleaved with other modes).
    calls = []
    real_runner_for = speed._runner_for

    def recording_runner_for(mode, *args, **kwargs):
        runner = real_runner_for(mode, *args, **kwargs)

        def run(images):
            calls.append(mode)
            return runner(images)
        return run

    monkeypatch.setattr(speed, "_runner_for", recording_runner_for)
    torch.manual_seed(0)
    model = EfficientDet(num_classes=90, compound_coef=0).eval()
    results = speed.benchmark(model, ["eager", "fused"], 1, 128, torch.device("cpu"), runs=3, threshold=0.2,
                                  iou_threshold=0.2, seed=0, threads=2, rounds=2)
    # Setup runs (one per mode), then per round and mode: warm-up + 3 timed runs.
    round_calls = ["eager"] * 4 + ["fused"] * 4
    assert calls == ["eager", "fused"] + round_calls * 2
    assert [len(r.times_ms) for r in results] == [6, 6]


def test_calibrated_bias_gives_the_requested_candidates():
    torch.manual_seed(0)
    model = EfficientDet(num_classes=90, compound_coef=0).eval()
    images = torch.randn(1, 3, 128, 128)
    speed.calibrate_class_bias(model, images, threshold=0.2, candidates=7)
    with torch.no_grad():
        _, _, classification, _ = model(images)
    assert int((classification > 0.2).sum()) == 7
    # Logits spread to the calibrated standard deviation (random weights bunch them within a fraction of a unit).
    spread = torch.logit(classification.double(), eps=1e-12).std().item()
    assert spread == pytest.approx(speed.CALIBRATED_LOGIT_STD, rel=1e-3)


def test_same_detections():
    a = Detections(np.zeros((1, 4), np.float32), np.array([3]), np.array([0.9], np.float32), ["x"])
    b = Detections(np.full((1, 4), 5e-4, np.float32), np.array([3]), np.array([0.8], np.float32), ["x"])
    assert speed.same_detections(a, b)
    assert not speed.same_detections(a, Detections.empty())
    b.class_ids = np.array([4])
    assert not speed.same_detections(a, b)


def test_unknown_mode_is_one_line_error(capsys):
    rc = benchmark.main(benchmark.parse_args(["-c", "0", "--input_size", "128", "--modes", "warp"]))
    err = capsys.readouterr().err
    assert rc == 1 and "'warp'" in err and len(err.strip().splitlines()) == 1


def test_dataset_check_reports_the_check_against_loading_and_training(tmp_path, capsys):
    from benchmark import dataset_check
    from tests.test_train import write_tiny_project

    yaml_path = write_tiny_project(tmp_path, num_train=4)
    rc = dataset_check.main(dataset_check.parse_args(
        ["-p", str(yaml_path), "--data_path", str(tmp_path / "datasets"), "--input_size", "128",
         "--batch_size", "2", "--repeats", "2", "--train_steps", "1", "--threads", "1", "--json"]))
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["check"]["images"] == 4 and result["check"]["problems"] == 0
    assert result["loading"] == {**result["loading"], "batches": 2, "images": 4}
    assert 0 < result["check"]["median_s"] < result["loading"]["seconds"] + result["estimated_epoch_s"]
    assert result["check_share_of_epoch"] == pytest.approx(result["check"]["median_s"] / result["estimated_epoch_s"])


def test_recipes_calibration_arithmetic():
    from benchmark.training_runs import budget_steps, seconds_per_step

    # Records at 10.0 (first step, excluded), 10.5, 11.5, 12.5: 2.5 s over the 3 steps after the first.
    assert seconds_per_step([10.0, 10.5, 11.5, 12.5]) == pytest.approx(2.5 / 3)
    assert budget_steps(30, 1.2) == 1500  # 1800 s / 1.2 s
    assert budget_steps(1, 0.7) == 85  # floor(60 / 0.7 = 85.7)
    assert budget_steps(0.001, 5.0) == 1
    with pytest.raises(ValueError, match="1 training step"):
        seconds_per_step([3.0])


def test_recipes_calibration_times_the_records_of_a_running_script(tmp_path):
    from benchmark.training_runs import calibrate

    log = tmp_path / "train_log.jsonl"
    script = tmp_path / "fake_train.py"  # a step record every 0.25 s after a slow first one
    script.write_text("import sys, time\nfor i in range(4):\n    time.sleep(0.5 if i == 0 else 0.25)\n"
                      f"    open({str(log)!r}, 'a').write('{{}}\\n')\n")
    seconds = calibrate([sys.executable, str(script)], tmp_path / "out.log", log, None)
    assert 0.25 - 0.03 <= seconds < 0.5
    script.write_text("import sys\nprint('the failing line')\nsys.exit(3)\n")
    with pytest.raises(OSError, match="status 3") as failure:
        calibrate([sys.executable, str(script)], tmp_path / "out.log", tmp_path / "none.jsonl", None)
    assert str(failure.value).endswith("the failing line")


def test_recipes_refuses_a_flags_row_that_sets_the_budget(tmp_path, capsys):
    from benchmark import recipes

    rc = recipes.main(recipes.parse_args(["--recipes", "published", "--flags", "--lr 1e-3 --max_steps 5",
                                          "--work", str(tmp_path)]))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "--max_steps is set by the benchmark" in err
    assert recipes.main(recipes.parse_args(["--recipes", "nonexistent", "--work", str(tmp_path)])) == 1
    assert "unknown recipe 'nonexistent'" in capsys.readouterr().err


def test_recipes_trains_and_evaluates_each_row(tmp_path, capsys):
    # Four subprocesses (train.py and coco_eval.py per row, one thread each): about 15 s.
    from benchmark import recipes
    from tests.test_train import write_tiny_project

    yaml_path = write_tiny_project(tmp_path, num_train=4)
    out = tmp_path / "recipes.json"
    rc = recipes.main(recipes.parse_args(
        ["--recipes", "published", "--flags", "--lr 1e-3", "-p", str(yaml_path), "--data_path",
         str(tmp_path / "datasets"), "--input_size", "128", "--batch_size", "2", "--steps", "2", "--threads", "1",
         "--work", str(tmp_path / "work"), "--json", str(out)]))
    printed = capsys.readouterr().out
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["published", "--lr 1e-3"]
    for r in rows:
        assert r["steps"] == 2 and 0.0 <= r["mAP"] <= 1.0 and 0.0 <= r["AP50"] <= 1.0 and r["train_s"] > 0
        assert r["train_args"][-10:] == ["--seed", "0", "--num_epochs", "2", "--max_steps", "2", "--val_interval",
                                         "0", "--save_interval", "0"]
        # train.py stopped at the budget: its log has one record per step.
        logs = list(Path(r["folder"]).glob("logs/*/train_log.jsonl"))
        assert len(logs) == 1 and [json.loads(l)["step"] for l in logs[0].read_text().splitlines()] == [1, 2]
    assert rows[0]["train_args"][rows[0]["train_args"].index("--recipe") + 1] == "published"
    table = printed.splitlines()[-3:]
    assert table[0].split() == ["row", "steps", "train", "min", "mAP", "mAP50"]
    assert table[1].split()[:2] == ["published", "2"] and table[2].split()[:3] == ["--lr", "1e-3", "2"]
