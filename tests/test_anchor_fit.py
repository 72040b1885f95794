"""Anchor fit: exact best IoU per box, best-possible recall, fitted anchors, the tool and the training warning."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from efficientdet.anchor_fit import (AnchorGrid, anchor_fit_warning, anchor_grid, best_anchor_iou, dataset_boxes,
                                     fit_anchors, fitness, measure_anchors, yaml_lines)
from efficientdet.anchors import DEFAULT_RATIOS, DEFAULT_SCALES, Anchors
from efficientdet.config import get_model_config
from efficientdet.dataset import CocoDataset, Resizer
from tests.conftest import REPO
from tools.fit_anchors import main as fit_main, parse_args as fit_parse_args
from efficientdet.synthetic import make_shape_dataset
from utils.config.project import load_project

D0 = get_model_config(0)


def boxes_xyxy(centres: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)


def elongated_boxes(count: int, side: int = 512, seed: int = 0) -> np.ndarray:
    """Lying and standing boxes 5 to 8 times longer than wide, inside a ``side`` canvas."""
    rng = np.random.default_rng(seed)
    short = rng.uniform(8, 24, count)
    long = short * rng.uniform(5, 8, count)
    lying = rng.random(count) < 0.5
    sizes = np.stack([np.where(lying, long, short), np.where(lying, short, long)], axis=1)
    centres = rng.uniform(sizes / 2, side - sizes / 2)
    return boxes_xyxy(centres, sizes)


def brute_force_best_iou(boxes: np.ndarray, grid: AnchorGrid) -> np.ndarray:
    anchors = Anchors(grid.anchor_scale, [int(np.log2(s)) for s in grid.strides], grid.scales,
                      grid.ratios).generate(grid.height, grid.width).numpy()[:, [1, 0, 3, 2]]
    iw = np.clip(np.minimum(boxes[:, None, 2], anchors[None, :, 2]) - np.maximum(boxes[:, None, 0], anchors[None, :, 0]),
                 0, None)
    ih = np.clip(np.minimum(boxes[:, None, 3], anchors[None, :, 3]) - np.maximum(boxes[:, None, 1], anchors[None, :, 1]),
                 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    anchor_area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    return (iw * ih / (area[:, None] + anchor_area[None] - iw * ih)).max(axis=1)


def test_best_iou_is_the_maximum_over_every_anchor():
    """The nearest-centre shortcut equals the maximum IoU over all anchors Anchors generates (D0, 256 px)."""
    rng = np.random.default_rng(1)
    sizes = np.exp(rng.uniform(np.log(3), np.log(300), (400, 2)))
    boxes = np.clip(boxes_xyxy(rng.uniform(0, 256, (400, 2)), sizes), 0, 256)
    boxes = boxes[(boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)]
    for ratios in (DEFAULT_RATIOS, ((2.5, 0.4), (1.0, 1.0), (0.4, 2.5))):
        grid = anchor_grid(D0, DEFAULT_SCALES, ratios, 256)
        np.testing.assert_allclose(best_anchor_iou(boxes, grid), brute_force_best_iou(boxes, grid), atol=1e-12)


def test_hand_made_boxes_have_known_best_iou():
    # One level, stride 8, anchors 32 x 32 centred at 4 + 8k on a 64 x 64 input.
    grid = AnchorGrid(4.0, (8,), (1.0,), ((1.0, 1.0),), 64, 64)
    boxes = np.array([[4, 4, 36, 36],      # an anchor exactly: 1
                      [12, 12, 28, 28],    # same centre, a quarter of the area: 0.25
                      [0, 0, 32, 32],      # centre 16, nearest anchor centres 12 / 20: 28² / (2·32² − 28²)
                      [4, 12, 36, 28]],    # half the anchor: exactly the positive IoU
                     dtype=np.float64)
    expected = [1.0, 0.25, 28 ** 2 / (2 * 32 ** 2 - 28 ** 2), 0.5]
    np.testing.assert_allclose(best_anchor_iou(boxes, grid), expected, atol=1e-12)
    report = measure_anchors(boxes, np.array([0, 0, 1, 1]), ["a", "b"], grid)
    assert report.recall == 0.75  # IoU 0.5 counts: positives are IoU >= 0.5
    assert report.per_class == {"a": (2, 0.5, pytest.approx(0.625)),
                                "b": (2, 1.0, pytest.approx((expected[2] + expected[3]) / 2))}
    assert report.too_small == 1 and report.too_large == 0  # the 16 x 16 box: smaller than any anchor


def test_default_anchors_miss_elongated_boxes_and_fitted_ones_cover_them():
    boxes = elongated_boxes(1500)
    default = anchor_grid(D0, DEFAULT_SCALES, DEFAULT_RATIOS, 512)
    before = measure_anchors(boxes, np.zeros(len(boxes), np.int64), ["bar"], default)
    assert before.recall < 0.2
    fitted = fit_anchors(boxes, default)
    assert (len(fitted.scales), len(fitted.ratios)) == (3, 3)  # the published head shape
    after = measure_anchors(boxes, np.zeros(len(boxes), np.int64), ["bar"], fitted)
    assert after.recall >= 0.95 and after.mean_iou > before.mean_iou
    assert max(r[1] / r[0] for r in fitted.ratios) > 3 and min(r[1] / r[0] for r in fitted.ratios) < 1 / 3


def test_fit_is_never_worse_than_the_current_anchors():
    rng = np.random.default_rng(2)
    sizes = rng.uniform(20, 200, (600, 2))
    boxes = boxes_xyxy(rng.uniform(sizes / 2, 512 - sizes / 2), sizes)
    default = anchor_grid(D0, DEFAULT_SCALES, DEFAULT_RATIOS, 512)
    fitted = fit_anchors(boxes, default)
    before, after = best_anchor_iou(boxes, default), best_anchor_iou(boxes, fitted)
    assert fitness(after) >= fitness(before) and np.mean(after >= 0.5) >= np.mean(before >= 0.5)
    assert list(fitted.scales) == sorted(fitted.scales)
    with pytest.raises(ValueError, match="no boxes"):
        fit_anchors(np.zeros((0, 4)), default)


@pytest.fixture(scope="module")
def elongated_project(tmp_path_factory) -> Path:
    """A small elongated shape set (aspect 5-8, 128 px) and a project YAML for it (comments included)."""
    root = tmp_path_factory.mktemp("anchors")
    make_shape_dataset(root / "datasets" / "bars", num_train=40, num_val=4, size=128, seed=5, max_shapes=4,
                       aspect=(5.0, 8.0))
    text = (REPO / "projects" / "shape.yml").read_text().replace("project_name: shape", "project_name: bars")
    text = text.replace("['rectangle', 'circle']", "['rectangle', 'ellipse']")
    (root / "bars.yml").write_text(text)
    return root


def test_dataset_boxes_are_the_loader_boxes(elongated_project):
    project = load_project(elongated_project / "bars.yml")
    plain = CocoDataset(elongated_project / "datasets" / "bars", "train", project)
    resized = CocoDataset(elongated_project / "datasets" / "bars", "train", project, transform=Resizer(256))
    boxes, labels = dataset_boxes(plain, 256)
    loader = np.concatenate([resized[i]["annot"] for i in range(len(resized)) if len(resized[i]["annot"])])
    np.testing.assert_allclose(boxes, loader[:, :4], rtol=1e-6)
    np.testing.assert_array_equal(labels, loader[:, 4])


def test_tool_reports_proposes_and_writes_the_project(elongated_project, capsys):
    yaml_path = elongated_project / "bars.yml"
    original = yaml_path.read_text()
    args = fit_parse_args(["-c", "0", "-p", str(yaml_path), "--data_path", str(elongated_project / "datasets"),
                           "--input_size", "256", "--write"])
    assert fit_main(args) == 0
    out = capsys.readouterr().out
    recalls = [float(line.split("):")[1].split()[0]) for line in out.splitlines() if "best-possible recall" in line]
    assert len(recalls) == 2 and recalls[0] < 0.5 and recalls[1] >= 0.95
    assert "anchors_scales: '[" in out and "anchors_ratios: '[(" in out
    written = yaml_path.read_text()
    assert [l for l in written.splitlines() if l.startswith("#")] == [l for l in original.splitlines() if l.startswith("#")]
    project = load_project(yaml_path)
    assert project.anchors_ratios != tuple(DEFAULT_RATIOS)
    dataset = CocoDataset(elongated_project / "datasets" / "bars", "train", project)
    boxes, _ = dataset_boxes(dataset, 256)
    grid = anchor_grid(D0, project.anchors_scales, project.anchors_ratios, 256)
    assert np.mean(best_anchor_iou(boxes, grid) >= 0.5) == pytest.approx(recalls[1], abs=1e-3)  # 4 decimals kept
    yaml_path.write_text(original)


def test_tool_errors_are_one_line(elongated_project, capsys):
    broken = elongated_project / "broken.yml"
    broken.write_text("\n".join(l for l in (elongated_project / "bars.yml").read_text().splitlines()
                                if not l.startswith("anchors_ratios")))
    assert fit_main(fit_parse_args(["-p", str(broken), "--data_path", str(elongated_project / "datasets")])) == 1
    assert "anchors_ratios" in capsys.readouterr().err


def test_training_warns_with_the_figure_and_the_command(elongated_project):
    project = load_project(elongated_project / "bars.yml")
    dataset = CocoDataset(elongated_project / "datasets" / "bars", "train", project)
    warning = anchor_fit_warning(dataset, D0, DEFAULT_SCALES, DEFAULT_RATIOS, 256, "python tools/fit_anchors.py -p bars")
    assert warning is not None and "python tools/fit_anchors.py -p bars" in warning
    assert "best-possible recall 0." in warning and "< 0.95" in warning
    fitted = fit_anchors(dataset_boxes(dataset, 256)[0], anchor_grid(D0, DEFAULT_SCALES, DEFAULT_RATIOS, 256))
    assert anchor_fit_warning(dataset, D0, fitted.scales, fitted.ratios, 256, "cmd") is None


def test_yaml_lines_parse_back_to_the_anchors():
    grid = anchor_grid(D0, (0.75, 1.0, 1.5), ((2.0, 0.5), (1.0, 1.0), (0.5, 2.0)))
    scales_line, ratios_line = yaml_lines(grid)
    assert scales_line == "anchors_scales: '[0.7500, 1.0000, 1.5000]'"
    assert ratios_line == "anchors_ratios: '[(2.0000, 0.5000), (1.0000, 1.0000), (0.5000, 2.0000)]'"


def test_make_shape_dataset_elongated_option(elongated_project):
    data = json.loads((elongated_project / "datasets" / "bars" / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["rectangle", "ellipse"]
    sides = np.array([a["bbox"][2:] for a in data["annotations"]])
    aspect = sides.max(axis=1) / sides.min(axis=1)
    assert aspect.min() >= 4.0 and aspect.max() <= 8.5 and len(sides) > 40
    with pytest.raises(ValueError, match="aspect"):
        make_shape_dataset(elongated_project / "x", 1, 1, size=64, aspect=(5.0, 20.0))


def test_tool_refuses_an_input_size_the_network_cannot_take(elongated_project, capsys):
    args = fit_parse_args(["-p", str(elongated_project / "bars.yml"), "--data_path",
                           str(elongated_project / "datasets"), "--input_size", "200"])
    assert fit_main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "multiples of 128" in err
