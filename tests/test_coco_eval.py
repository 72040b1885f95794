"""coco_eval.py end to end: a D0 checkpoint made here, 3 shape val images at input size 256."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest

pytest.importorskip("utils.inference.detector")  # the shared inference path (utils/inference/detector.py)

import torch  # noqa: E402

import coco_eval  # noqa: E402
from backbone import EfficientDet  # noqa: E402
from utils.config.device import resolve_published_device  # noqa: E402
from utils.evaluation import STAT_NAMES, evaluation_provenance, provenance_path, save_results  # noqa: E402
from utils.config.project import load_project  # noqa: E402
from tests.conftest import REPO, project_yaml  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_IMAGES = 3
PROJECT_YAML = project_yaml("shape", ["rectangle", "circle"])


def make_checkpoint(path: Path, num_classes: int = 2) -> Path:
    """A D0 state_dict whose class scores come only from P7 (2x2 positions at input 256), so a
    handful of boxes pass the 0.05 threshold whatever the image: P3–P6 features are zeroed by
    their last class-head BN, P7's are a constant, and the output layer turns that constant into
    logits between -2 and 2 (per anchor and class), leaving -10 at the other levels."""
    torch.manual_seed(0)
    model = EfficientDet(num_classes=num_classes, compound_coef=0)
    state = model.state_dict()
    last = model.config.head_repeats - 1
    for level in range(5):
        state[f"classifier.bn_list.{level}.{last}.weight"].zero_()
        state[f"classifier.bn_list.{level}.{last}.bias"].fill_(2.0 if level == 4 else -20.0)
    header = "classifier.header."
    state[header + "depthwise_conv.conv.weight"].fill_(0.25)  # a 2x2 map: each position sees 4 taps
    constant = 4 * 0.25 * 2.0 * torch.sigmoid(torch.tensor(2.0))  # swish(2) through the depthwise conv
    channels = state[header + "pointwise_conv.conv.bias"].shape[0]
    targets = torch.linspace(-2.0, 2.0, channels)
    state[header + "pointwise_conv.conv.bias"].fill_(-10.0)
    weight = state[header + "pointwise_conv.conv.weight"]
    weight.zero_()
    weight[:, :, 0, 0] = ((targets + 10.0) / (constant * weight.shape[1]))[:, None]
    torch.save(state, path)
    return path


def make_silent_checkpoint(path: Path, source: Path) -> Path:
    """``source`` with every class logit at -20: no box passes any threshold (mAP 0)."""
    state = torch.load(source, weights_only=True)
    state["classifier.header.pointwise_conv.conv.weight"].zero_()
    state["classifier.header.pointwise_conv.conv.bias"].fill_(-20.0)
    torch.save(state, path)
    return path


@pytest.fixture()
def setup(shared_dir, tmp_path):
    """tmp data_path/shape/{val, annotations} with NUM_IMAGES images, a project YAML, a checkpoint."""
    shape = shared_dir / "data" / "shape"
    data = json.loads((shape / "annotations" / "instances_val.json").read_text())
    data["images"] = data["images"][:NUM_IMAGES]
    keep = {image["id"] for image in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    root = tmp_path / "datasets"
    (root / "shape" / "val").mkdir(parents=True)
    (root / "shape" / "annotations").mkdir()
    for image in data["images"]:
        shutil.copy(shape / "val" / image["file_name"], root / "shape" / "val" / image["file_name"])
    ann_file = root / "shape" / "annotations" / "instances_val.json"
    ann_file.write_text(json.dumps(data))
    project = tmp_path / "shape.yml"
    project.write_text(PROJECT_YAML)
    weights = make_checkpoint(tmp_path / "d0-shape.pth")
    return {"root": root, "project": project, "weights": weights, "ann_file": ann_file, "data": data,
            "out": tmp_path / "out", "tmp": tmp_path}


def argv(setup, *extra: str):
    return ["-c", "0", "-p", str(setup["project"]), "-w", str(setup["weights"]), "--data_path", str(setup["root"]),
            "--input_size", "256", "--output", str(setup["out"]), "--device", "cpu", "--no_progress", *extra]


def test_end_to_end_results_json_and_printed_metrics(setup, capsys):
    metrics_file = setup["tmp"] / "metrics.json"
    assert coco_eval.main(coco_eval.parse_args(argv(setup, "--batch_size", "2", "--save_json",
                                                    str(metrics_file)))) == 0
    out = capsys.readouterr().out

    results_file = setup["out"] / "val_bbox_results.json"
    results = json.loads(results_file.read_text())
    assert results, "the checkpoint is built to give detections"
    image_ids = {image["id"] for image in setup["data"]["images"]}
    sizes = {image["id"]: (image["width"], image["height"]) for image in setup["data"]["images"]}
    for record in results:
        assert set(record) == {"image_id", "category_id", "bbox", "score"}
        assert record["image_id"] in image_ids
        assert record["category_id"] in (1, 2)
        assert 0.05 < record["score"] <= 1.0
        x, y, w, h = record["bbox"]
        width, height = sizes[record["image_id"]]
        # xywh in original (512 px) image coordinates, not (x1, y1, x2, y2) and not the 256 px input
        assert w >= 0 and h >= 0 and x >= 0 and y >= 0
        assert x + w <= width + 1e-3 and y + h <= height + 1e-3
    assert max(r["bbox"][0] + r["bbox"][2] for r in results) > 256  # mapped back from the 256 px input

    assert out.count("Average Precision  (AP) @[") == 6 and out.count("Average Recall     (AR) @[") == 6
    assert "rectangle" in out and "circle" in out
    saved = json.loads(metrics_file.read_text())
    assert set(STAT_NAMES) <= set(saved) and saved["empty"] is False
    assert saved["num_images"] == NUM_IMAGES and saved["num_detections"] == len(results)
    for name in STAT_NAMES:
        assert f"= {saved[name]:0.3f}" in out

    assert saved["reused_results"] is False
    record = json.loads(provenance_path(results_file).read_text())
    assert record["compound_coef"] == 0 and record["obj_list"] == ["rectangle", "circle"]
    assert record["input_size"] == 256 and record["threshold"] == 0.05 and record["nms"] == "hard"
    assert record["clip_boxes"] is False
    assert len(record["weights_sha256"]) == 64 and len(record["annotations_sha256"]) == 64

    # without the weights nothing can be proven: a clear error, even with --override False
    setup["weights"].unlink()
    assert coco_eval.main(coco_eval.parse_args(argv(setup, "--override", "False"))) == 1
    assert "weights file not found" in capsys.readouterr().err


def test_missing_annotations_is_one_line(setup, capsys):
    setup["ann_file"].unlink()
    assert coco_eval.main(coco_eval.parse_args(argv(setup))) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "annotation file not found" in err and "instances_val.json" in err
    assert not (setup["out"] / "val_bbox_results.json").exists()


def test_weights_for_another_class_count_fail(setup, capsys):
    other = make_checkpoint(setup["tmp"] / "d0-3classes.pth", num_classes=3)
    args = argv(setup)
    args[args.index("-w") + 1] = str(other)
    assert coco_eval.main(coco_eval.parse_args(args)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "checkpoint has 3 classes, model has 2" in err and "Traceback" not in err


def test_empty_result_prints_zero_map(setup, capsys):
    assert coco_eval.main(coco_eval.parse_args(argv(setup, "--threshold", "0.99"))) == 0
    out = capsys.readouterr().out
    assert "mAP = 0" in out and "no detections" in out
    assert json.loads((setup["out"] / "val_bbox_results.json").read_text()) == []


def test_reused_results_are_validated_too(setup, capsys, monkeypatch):
    """A results file with a valid provenance record is still checked: unknown image ids are one line."""
    args = coco_eval.parse_args(argv(setup, "--override", "False"))
    provenance = evaluation_provenance(setup["weights"], setup["ann_file"], load_project(setup["project"]), 0, 256,
                                       threshold=args.threshold, nms_threshold=args.nms_threshold, nms=args.nms,
                                       max_images=args.max_images, mode=args.mode, float16=False, clip_boxes=False)
    save_results(setup["out"] / "val_bbox_results.json",
                 [{"image_id": 4242, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}], provenance)
    monkeypatch.setattr(coco_eval, "compute_results", model_must_not_run)
    assert coco_eval.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "4242" in err


def test_bad_input_size_is_rejected(setup, capsys):
    assert coco_eval.main(coco_eval.parse_args(argv(setup, "--input_size", "200"))) == 1
    assert "multiples of 128" in capsys.readouterr().err


def test_missing_image_folder_is_one_line(setup, capsys):
    shutil.rmtree(setup["root"] / "shape" / "val")
    assert coco_eval.main(coco_eval.parse_args(argv(setup))) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image folder not found" in err


# --------------------------------------------------------------------------------------------------
# The published evaluation, written out (tests/test_published_api.py: published_pipeline), against ours.


@pytest.fixture()
def published_setup(tmp_path, d0_weights):
    """``datasets/coco/val2017`` with views of test/img.jpg (a 425 x 425 square, whose side truncates at 256,
    480 x 640, 500 x 300), their annotation file (one box each) and the conformance D0 weights as a .pth."""
    import cv2

    from tests.test_published_api import pipeline_images

    root = tmp_path / "datasets"
    image_dir = root / "coco" / "val2017"
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for image_id, path in enumerate(pipeline_images(image_dir), start=1):
        height, width = cv2.imread(path).shape[:2]
        images.append({"id": image_id, "file_name": Path(path).name, "height": height, "width": width})
        box = [10.0, 20.0, width / 3, height / 3]
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 64, "bbox": box,
                            "area": box[2] * box[3], "iscrowd": 0})
    (root / "coco" / "annotations").mkdir()
    (root / "coco" / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 64, "name": "potted plant"}]}))
    weights = tmp_path / "efficientdet-d0.pth"
    torch.save(d0_weights, weights)
    return {"root": root, "images": images, "image_dir": image_dir, "weights": weights, "out": tmp_path / "out"}


def published_argv(setup, *extra: str):
    from tests.test_published_api import CONFORMANCE_THRESHOLD

    return ["-c", "0", "-p", str(REPO / "projects" / "coco.yml"), "-w", str(setup["weights"]), "--data_path",
            str(setup["root"]), "--input_size", "256", "--threshold", str(CONFORMANCE_THRESHOLD), "--output",
            str(setup["out"]), "--device", "cpu", "--no_progress", *extra]


def published_results(setup, model, clip: bool = False):
    """The published coco_eval.py records for the set, written out (NMS IoU 0.5, its default): published
    pipeline, then [clipped to the image,] xyxy -> xywh in float32, ``box.tolist()``, ``float(score)``,
    ``label + 1``. Classes whose obj_list entry is '' are left out (ours leaves them out: never scored). The
    network input is made contiguous, as the evaluator's (mode eager) is: the same values; the published
    permuted one rounds differently by ~3e-8, enough to reorder this model's nearly tied scores."""
    from tests.test_published_api import CONFORMANCE_THRESHOLD, published_pipeline

    obj_list = load_project(REPO / "projects" / "coco.yml").obj_list
    records = []
    for image in setup["images"]:
        rois, class_ids, scores = published_pipeline(model, str(setup["image_dir"] / image["file_name"]), 256,
                                                     CONFORMANCE_THRESHOLD, 0.5, contiguous=True)
        if clip:
            rois[:, [0, 2]] = np.clip(rois[:, [0, 2]], 0, image["width"] - 1)
            rois[:, [1, 3]] = np.clip(rois[:, [1, 3]], 0, image["height"] - 1)
        rois[:, 2] -= rois[:, 0]
        rois[:, 3] -= rois[:, 1]
        records += [{"image_id": image["id"], "category_id": int(label) + 1, "score": float(score),
                     "bbox": box.tolist()} for box, label, score in zip(rois, class_ids, scores) if obj_list[label]]
    return records


def assert_same_records(got, want):
    assert len(got) == len(want) > 0
    for ours, theirs in zip(got, want):
        assert (ours["image_id"], ours["category_id"]) == (theirs["image_id"], theirs["category_id"])
        np.testing.assert_allclose(ours["bbox"], theirs["bbox"], rtol=0, atol=1e-3)
        assert abs(ours["score"] - theirs["score"]) <= 1e-5


def test_default_evaluation_is_the_published_one(published_setup, d0_model, capsys):
    """coco_eval.py's records equal the published evaluation's steps written out (same count, classes, boxes
    within 1e-3 px, scores within 1e-5) on a truncating square and non-square images; --clip_boxes clips to
    the image, is recorded in the provenance record, and a results file of one setting is not re-scored for
    the other."""
    results_file = published_setup["out"] / "val2017_bbox_results.json"
    assert coco_eval.main(coco_eval.parse_args(published_argv(published_setup))) == 0
    published = published_results(published_setup, d0_model)
    assert_same_records(json.loads(results_file.read_text()), published)
    widths = {image["id"]: image["width"] for image in published_setup["images"]}
    assert max(r["bbox"][0] + r["bbox"][2] - widths[r["image_id"]] for r in published) > 1  # past the image
    assert json.loads(provenance_path(results_file).read_text())["clip_boxes"] is False
    capsys.readouterr()

    assert coco_eval.main(coco_eval.parse_args(published_argv(published_setup, "--override", "False",
                                                              "--clip_boxes"))) == 0
    assert "clip_boxes differs" in capsys.readouterr().out  # the model ran again
    clipped = json.loads(results_file.read_text())
    assert_same_records(clipped, published_results(published_setup, d0_model, clip=True))
    assert all(r["bbox"][0] + r["bbox"][2] <= widths[r["image_id"]] - 1 for r in clipped)
    assert json.loads(provenance_path(results_file).read_text())["clip_boxes"] is True
    assert coco_eval.main(coco_eval.parse_args(published_argv(published_setup, "--override", "False",
                                                              "--clip_boxes", "True"))) == 0
    assert "re-scoring" in capsys.readouterr().out
    assert coco_eval.main(coco_eval.parse_args(published_argv(published_setup, "--override", "False"))) == 0
    assert "clip_boxes differs" in capsys.readouterr().out


def test_parse_args_defaults():
    args = coco_eval.parse_args(["-p", "shape"])
    assert (args.compound_coef, args.threshold, args.nms_threshold, args.batch_size) == (0, 0.05, 0.5, 1)
    assert args.data_path == "datasets/" and args.output == "." and args.override is True and not args.float16
    assert args.cuda is True and args.device is None  # published defaults: run the model, use CUDA
    assert args.max_images is None and args.input_size is None and not math.isnan(args.threshold)
    assert args.clip_boxes is False  # as published: boxes clipped to the network input only


def test_official_soft_nms_option(setup, capsys):
    """--nms soft: the official post-processing (at most 100 boxes per image, thresholds ignored)."""
    assert coco_eval.main(coco_eval.parse_args(argv(setup, "--nms", "soft", "--override"))) == 0
    assert "Average Precision" in capsys.readouterr().out
    results = json.loads((setup["out"] / "val_bbox_results.json").read_text())
    per_image = {}
    for record in results:
        per_image[record["image_id"]] = per_image.get(record["image_id"], 0) + 1
    assert per_image and max(per_image.values()) <= 100
    # Soft-NMS keeps decayed scores below the hard path's 0.05 threshold.
    assert min(r["score"] for r in results) < 0.05


def model_must_not_run(*args, **kwargs):
    raise AssertionError("the model ran although the results file was to be re-scored")


def count_model_runs(monkeypatch) -> list:
    """Wrap coco_eval.compute_results; the returned list gets one entry per model run."""
    runs: list = []
    real = coco_eval.compute_results

    def counted(*args, **kwargs):
        runs.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(coco_eval, "compute_results", counted)
    return runs


def test_weights_b_after_weights_a_gives_bs_numbers(setup, capsys):
    """Default flags run the model: a results file left by other weights is never re-scored."""
    results_file = setup["out"] / "val_bbox_results.json"
    metrics_file = setup["tmp"] / "metrics.json"
    assert coco_eval.main(coco_eval.parse_args(argv(setup, "--save_json", str(metrics_file)))) == 0
    capsys.readouterr()
    a_metrics = json.loads(metrics_file.read_text())
    assert a_metrics["num_detections"] > 0 and json.loads(results_file.read_text())

    weights_b = make_silent_checkpoint(setup["tmp"] / "d0-silent.pth", setup["weights"])
    args = argv(setup, "--save_json", str(metrics_file))
    args[args.index("-w") + 1] = str(weights_b)
    assert coco_eval.main(coco_eval.parse_args(args)) == 0
    out = capsys.readouterr().out
    assert "re-scoring" not in out and "mAP = 0" in out
    b_metrics = json.loads(metrics_file.read_text())
    assert b_metrics["num_detections"] == 0 and b_metrics["AP"] == 0.0 and b_metrics["reused_results"] is False
    assert b_metrics["weights_sha256"] != a_metrics["weights_sha256"]
    assert json.loads(results_file.read_text()) == []


def test_override_false_reuses_only_matching_provenance(setup, capsys, monkeypatch):
    metrics_file = setup["tmp"] / "metrics.json"
    assert coco_eval.main(coco_eval.parse_args(argv(setup, "--save_json", str(metrics_file)))) == 0
    capsys.readouterr()
    first = json.loads(metrics_file.read_text())

    # same weights and settings: re-scored, the model is neither built nor run
    monkeypatch.setattr(coco_eval, "compute_results", model_must_not_run)
    monkeypatch.setattr(coco_eval.Detector, "from_checkpoint", model_must_not_run)
    assert coco_eval.main(coco_eval.parse_args(argv(setup, "--override", "False", "--save_json",
                                                    str(metrics_file)))) == 0
    out = capsys.readouterr().out
    assert "re-scoring" in out and "without running the model" in out
    again = json.loads(metrics_file.read_text())
    assert again["reused_results"] is True
    assert [again[name] for name in STAT_NAMES] == [first[name] for name in STAT_NAMES]
    monkeypatch.undo()

    # another threshold: the model runs, and one line says why
    runs = count_model_runs(monkeypatch)
    assert coco_eval.main(coco_eval.parse_args(argv(setup, "--override", "False", "--threshold", "0.3"))) == 0
    out = capsys.readouterr().out
    reason = [line for line in out.splitlines() if line.startswith("running the model")]
    assert len(runs) == 1 and len(reason) == 1 and "threshold differs" in reason[0] and "now 0.3" in reason[0]

    # other weights under the same file name: the hash tells them apart
    make_silent_checkpoint(setup["weights"], setup["weights"])
    assert coco_eval.main(coco_eval.parse_args(argv(setup, "--override", "False", "--threshold", "0.3"))) == 0
    out = capsys.readouterr().out
    assert len(runs) == 2 and "weights_sha256 differs" in out and "mAP = 0" in out

    # another compound coefficient's record (edited here) is not reused either
    meta = provenance_path(setup["out"] / "val_bbox_results.json")
    meta.write_text(meta.read_text().replace('"compound_coef": 0', '"compound_coef": 1'))
    assert coco_eval.main(coco_eval.parse_args(argv(setup, "--override", "False", "--threshold", "0.3"))) == 0
    assert len(runs) == 3 and "compound_coef differs" in capsys.readouterr().out


def test_published_boolean_forms(setup, capsys, monkeypatch):
    args = coco_eval.parse_args(["-p", "shape", "--override", "True", "--cuda", "False", "--float16", "False"])
    assert (args.override, args.cuda, args.float16) == (True, False, False)
    args = coco_eval.parse_args(["-p", "shape", "--override", "false", "--cuda", "0", "--float16", "1", "--device", "1"])
    assert (args.override, args.cuda, args.float16, args.device) == (False, False, True, "1")
    assert coco_eval.parse_args(["--override", "--cuda"]).override is True
    with pytest.raises(SystemExit):
        coco_eval.parse_args(["--override", "maybe"])

    devices = []
    real = coco_eval.Detector.from_checkpoint

    def record_device(*a, **kw):
        devices.append(kw["device"])
        return real(*a, **kw)

    monkeypatch.setattr(coco_eval.Detector, "from_checkpoint", record_device)
    published = [a for a in argv(setup) if a not in ("--device", "cpu")]
    assert coco_eval.main(coco_eval.parse_args(published + ["--override", "True", "--cuda", "False",
                                                            "--float16", "False"])) == 0
    out = capsys.readouterr().out
    assert devices == [torch.device("cpu")] and "note:" not in out and "Average Precision" in out

    # --cuda True (the default) on a machine without CUDA: the CPU, with a note
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert coco_eval.main(coco_eval.parse_args(published + ["--cuda", "True", "--device", "0"])) == 0
    out = capsys.readouterr().out
    assert devices[-1] == torch.device("cpu") and "note: no CUDA device on this machine" in out


def test_cuda_and_device_options_resolve_as_published(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_published_device(True, None) == (torch.device("cuda"), None)
    assert resolve_published_device(True, "1") == (torch.device("cuda:1"), None)
    assert resolve_published_device(True, "cpu") == (torch.device("cpu"), None)
    assert resolve_published_device(False, "1") == (torch.device("cpu"), None)  # the index needs --cuda True
    with pytest.raises(ValueError, match="--cuda False asks for the CPU, but --device cuda:1"):
        resolve_published_device(False, "cuda:1")
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        resolve_published_device(True, "5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, note = resolve_published_device(True, "0")
    assert device == torch.device("cpu") and note.startswith("note: no CUDA device")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_published_device(True, "cuda:0")  # asked for by name: no silent fallback


def nan_checkpoint(setup) -> Tuple[Path, str]:
    """The test checkpoint with a NaN in an early tensor and an inf in a later one: (path, early key)."""
    state = torch.load(setup["weights"], weights_only=True)
    keys = [k for k, v in state.items() if v.is_floating_point()]
    first, later = keys[10], keys[-3]
    state[later].view(-1)[0] = float("inf")
    state[first].view(-1)[-1] = float("nan")
    path = setup["tmp"] / "diverged.pth"
    torch.save(state, path)
    return path, first


def test_non_finite_weights_are_refused(setup, capsys):
    path, first = nan_checkpoint(setup)
    args = argv(setup)
    args[args.index("-w") + 1] = str(path)
    assert coco_eval.main(coco_eval.parse_args(args)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert "diverged.pth" in err and repr(first) in err and "non-finite" in err
    assert not (setup["out"] / "val_bbox_results.json").exists()
