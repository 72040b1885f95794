"""benchmark/benchmark.py: runs in-process, reports every mode against eager, emulates a confident model."""
from __future__ import annotations

import json

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
