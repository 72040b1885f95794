"""efficientdet/dataset.py: loading, validation of broken data, augmentation geometry, batching, loaders."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from efficientdet.dataset import (CocoDataset, Compose, HorizontalFlip, Normalizer, RandomScaleCrop, Resizer,
                                  build_transform, collater, create_dataloaders, letterbox_size)
from tools.make_shape_dataset import make_shape_dataset, parse_args as make_shape_parse_args, main as make_shape_main
from utils.project import load_project

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RED_BGR = (0, 0, 255)
BLUE_BGR = (255, 0, 0)


# ---- helpers ---------------------------------------------------------------------------------------

def _write_set(root: Path, images: List[dict], annotations: List[dict], set_name: str = "val",
               draw: bool = True, categories: Optional[List[dict]] = None) -> Path:
    """A COCO set under ``root``: a blue PNG per image (unless ``draw`` is False) and the json."""
    (root / set_name).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    if draw:
        for image in images:
            canvas = np.zeros((image["height"], image["width"], 3), np.uint8)
            canvas[:] = BLUE_BGR
            cv2.imwrite(str(root / set_name / image["file_name"]), canvas)
    data = {"images": images, "annotations": annotations,
            "categories": categories if categories is not None else [{"id": 1, "name": "rectangle"},
                                                                    {"id": 2, "name": "circle"}]}
    path = root / "annotations" / f"instances_{set_name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _image(image_id: int, width: int = 64, height: int = 48) -> dict:
    return {"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height}


def _ann(ann_id: int, image_id: int, bbox, category_id: int = 1, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox), "iscrowd": iscrowd}


def _rgb01(image: np.ndarray) -> np.ndarray:
    """Undo the normalisation: ``np.ndarray[H, W, 3]`` RGB in [0, 1]."""
    return image * np.asarray(STD, np.float32) + np.asarray(MEAN, np.float32)


def _red_mask(image01: np.ndarray) -> np.ndarray:
    return (image01[..., 0] > 0.5) & (image01[..., 1] < 0.3) & (image01[..., 2] < 0.5)


def _assert_box_covers_red(image: np.ndarray, box: np.ndarray, tol: float = 1.0) -> None:
    """Every red pixel lies inside ``box`` (x1, y1, x2, y2) ± tol, and the box interior is red."""
    red = _red_mask(_rgb01(image))
    ys, xs = np.nonzero(red)
    assert len(xs) > 0
    # pixel (x, y) spans [x, x + 1): it must lie in the box up to the interpolation blur
    assert xs.min() >= box[0] - tol and xs.max() + 1 <= box[2] + tol
    assert ys.min() >= box[1] - tol and ys.max() + 1 <= box[3] + tol
    inner = red[int(np.ceil(box[1] + tol)):int(np.floor(box[3] - tol)),
                int(np.ceil(box[0] + tol)):int(np.floor(box[2] - tol))]
    if inner.size:
        assert inner.all()


@pytest.fixture(scope="module")
def red_box_set(tmp_path_factory) -> Path:
    """One 200x100 image (blue) with a red rectangle covering pixels x 30..109, y 20..69, box [30, 20, 80, 50]."""
    root = tmp_path_factory.mktemp("redbox")
    _write_set(root, [_image(0, 200, 100)], [_ann(1, 0, [30, 20, 80, 50])])
    canvas = np.zeros((100, 200, 3), np.uint8)
    canvas[:] = BLUE_BGR
    canvas[20:70, 30:110] = RED_BGR
    cv2.imwrite(str(root / "val" / "0.png"), canvas)
    return root


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """``<tmp>/shape``: 8 train + 4 val images of 128 px from tools/make_shape_dataset.py."""
    root = tmp_path_factory.mktemp("data") / "shape"
    make_shape_dataset(root, num_train=8, num_val=4, size=128, seed=3, max_shapes=3)
    return root


# ---- real data ------------------------------------------------------------------------------------

def test_shared_shape_val(shared_dir):
    root = shared_dir / "data" / "shape"
    project = load_project("shape")
    raw = CocoDataset(root, "val", project)
    data = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert len(raw) == 100 and raw.image_ids[0] == 0
    assert sum(len(raw.load_annotations(i)) for i in range(len(raw))) == len(data["annotations"])
    # shapes cut by the image border (many circles here) keep their visible part: clipped, not skipped
    crossing = [a for a in data["annotations"]
                if a["bbox"][0] + a["bbox"][2] > 513 or a["bbox"][1] + a["bbox"][3] > 513]
    assert len(crossing) > 0 and raw.clipped == len(crossing) and sum(raw.skipped.values()) == 0
    image_id = crossing[0]["image_id"]
    index = raw.image_ids.index(image_id)
    anns = [a for a in data["annotations"] if a["image_id"] == image_id]
    expected = np.array([[x, y, min(x + w, 512), min(y + h, 512), c - 1] for x, y, w, h, c in
                         ([*a["bbox"], a["category_id"]] for a in anns)], np.float32)
    np.testing.assert_allclose(raw.load_annotations(index), expected)
    sample = raw[0]
    assert sample["img"].shape == (512, 512, 3) and sample["img"].dtype == np.float32
    assert 0.0 <= sample["img"].min() and sample["img"].max() <= 1.0

    val = CocoDataset(root, "val", project, transform=build_transform(256, project.mean, project.std, train=False))
    sample = val[index]
    assert sample["img"].shape == (256, 256, 3) and sample["scale"] == 0.5
    np.testing.assert_allclose(sample["annot"][:, :4], expected[:, :4] * 0.5)
    np.testing.assert_array_equal(sample["annot"][:, 4], expected[:, 4])


def test_coco_tiny_crowd_and_labels(shared_dir):
    root = shared_dir / "data" / "coco_tiny"
    project = load_project("coco")
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    for category in data["categories"]:                  # coco.yml: obj_list[id - 1] is the COCO name
        assert project.obj_list[category["id"] - 1] == category["name"]
    used = {c["id"] for c in data["categories"]}
    assert all(project.obj_list[i - 1] == "" for i in range(1, 91) if i not in used)

    dataset = CocoDataset(root, "val2017", project)
    crowd = [a for a in data["annotations"] if a["iscrowd"]]
    assert len(crowd) > 0 and dataset.skipped["crowd"] == len(crowd)
    assert dataset.skipped["degenerate"] == dataset.skipped["outside"] == 0
    assert len(dataset) == len(data["images"])
    for index, image_id in enumerate(dataset.image_ids):
        anns = [a for a in data["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        got = dataset.load_annotations(index)
        assert len(got) == len(anns)
        np.testing.assert_array_equal(got[:, 4], [a["category_id"] - 1 for a in anns])
        if anns:
            np.testing.assert_allclose(got[:, :4], [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                                       rtol=1e-6)
    negatives = [i for i in range(len(dataset)) if len(dataset.load_annotations(i)) == 0]
    assert len(negatives) == len(data["images"]) - len({a["image_id"] for a in data["annotations"]})


# ---- synthetic data and the tool --------------------------------------------------------------------

def test_make_shape_dataset_boxes_cover_drawn_pixels(synthetic_root):
    data = json.loads((synthetic_root / "annotations" / "instances_train.json").read_text())
    assert [im["id"] for im in data["images"]] == list(range(8))
    assert {c["id"]: c["name"] for c in data["categories"]} == {1: "rectangle", 2: "circle"}
    val = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    assert val["images"][0]["id"] == 0 and val["images"][0]["file_name"] == "8.jpg"
    rectangles = [a for a in data["annotations"] if a["category_id"] == 1]
    assert rectangles
    for ann in rectangles:
        image = cv2.imread(str(synthetic_root / "train" / f"{ann['image_id']}.jpg"))
        x, y, w, h = (int(v) for v in ann["bbox"])
        background = image[0:2, 0:2].reshape(-1, 3).mean(0)
        centre = image[y + h // 2, x + w // 2].astype(float)
        assert np.abs(centre - background).max() > 20        # something is drawn inside the box


def test_make_shape_dataset_script(tmp_path):
    args = make_shape_parse_args(["--out", str(tmp_path / "s"), "--num-train", "3", "--num-val", "2", "--size", "64"])
    assert make_shape_main(args) == 0
    assert len(list((tmp_path / "s" / "train").glob("*.jpg"))) == 3
    assert make_shape_main(make_shape_parse_args(["--out", str(tmp_path / "t"), "--size", "8"])) == 1


def test_synthetic_loaders(synthetic_root):
    project = load_project("shape")
    bundle = create_dataloaders(project, synthetic_root.parent, input_size=128, batch_size=3, seed=0)
    assert len(bundle.train_set) == 8 and len(bundle.val_set) == 4
    assert len(bundle.train_loader) == 2 and len(bundle.val_loader) == 2      # train drops the last 2
    batch = next(iter(bundle.val_loader))
    assert batch["img"].shape == (3, 3, 128, 128) and batch["img"].dtype == torch.float32
    assert batch["annot"].shape[0] == 3 and batch["annot"].shape[2] == 5
    assert batch["image_id"] == [0, 1, 2] and batch["scale"] == [1.0, 1.0, 1.0]
    expected = bundle.val_set.load_annotations(0)
    np.testing.assert_allclose(batch["annot"][0, :len(expected)].numpy(), expected)

    again = create_dataloaders(project, synthetic_root.parent, 128, 3, seed=0)
    first, second = next(iter(bundle.train_loader)), next(iter(again.train_loader))
    assert first["image_id"] == second["image_id"]
    assert torch.equal(first["img"], second["img"]) and torch.equal(first["annot"], second["annot"])

    distributed = create_dataloaders(project, synthetic_root.parent, 128, 2,
                                     sampler=lambda ds, train: DistributedSampler(ds, num_replicas=2, rank=1,
                                                                                  shuffle=train, seed=0))
    assert isinstance(distributed.train_loader.sampler, DistributedSampler)
    assert len(distributed.train_loader) == 2 and len(distributed.val_loader) == 1
    assert next(iter(distributed.val_loader))["image_id"] == [1, 3]

    with pytest.raises(ValueError, match="fewer than one batch"):
        create_dataloaders(project, synthetic_root.parent, 128, 9)


def test_augmentation_is_deterministic_and_worker_safe(synthetic_root):
    project = load_project("shape")
    transform = build_transform(128, project.mean, project.std, train=True, scale_jitter=True)
    dataset = CocoDataset(synthetic_root, "train", project, transform=transform, seed=7)
    a, b = dataset[3], dataset[3]
    assert np.array_equal(a["img"], b["img"]) and np.array_equal(a["annot"], b["annot"])
    scales = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        scales.append(dataset[3]["scale"])
    assert len(set(scales)) == 4                  # a new augmentation each epoch

    dataset.set_epoch(0)
    loader_args = dict(batch_size=4, collate_fn=collater, shuffle=False)
    single = [b["img"] for b in torch.utils.data.DataLoader(dataset, num_workers=0, **loader_args)]
    workers = [b["img"] for b in torch.utils.data.DataLoader(dataset, num_workers=2, **loader_args)]
    assert all(torch.equal(x, y) for x, y in zip(single, workers))


# ---- geometry ---------------------------------------------------------------------------------------

def test_letterbox_size():
    assert letterbox_size(100, 200, 128) == (64, 128, 0.64)
    assert letterbox_size(300, 100, 512) == (512, 170, 512 / 300)
    assert letterbox_size(512, 512, 256) == (256, 256, 0.5)
    with pytest.raises(ValueError):
        letterbox_size(0, 10, 128)


def test_resize_geometry(red_box_set):
    dataset = CocoDataset(red_box_set, "val", ["rectangle"], transform=Compose([Normalizer(MEAN, STD), Resizer(128)]))
    sample = dataset[0]
    assert sample["scale"] == pytest.approx(0.64) and sample["img"].shape == (128, 128, 3)
    np.testing.assert_allclose(sample["annot"], [[30 * 0.64, 20 * 0.64, 110 * 0.64, 70 * 0.64, 0]], rtol=1e-6)
    _assert_box_covers_red(sample["img"], sample["annot"][0])
    assert np.all(sample["img"][64:] == 0.0)                 # zero padding below the 64-row image
    assert not np.any(np.all(sample["img"][:64] == 0.0, axis=-1))


def test_flip_geometry(red_box_set):
    flip = Compose([Normalizer(MEAN, STD), HorizontalFlip(p=1.0)])
    sample = CocoDataset(red_box_set, "val", ["rectangle"], transform=flip)[0]
    np.testing.assert_allclose(sample["annot"], [[200 - 110, 20, 200 - 30, 70, 0]])
    _assert_box_covers_red(sample["img"], sample["annot"][0], tol=0.0)
    never = CocoDataset(red_box_set, "val", ["rectangle"], transform=Compose([Normalizer(MEAN, STD),
                                                                              HorizontalFlip(p=0.0)]))[0]
    np.testing.assert_allclose(never["annot"], [[30, 20, 110, 70, 0]])
    _assert_box_covers_red(never["img"], never["annot"][0], tol=0.0)
    flips = CocoDataset(red_box_set, "val", ["rectangle"], transform=HorizontalFlip(p=0.5), seed=1)
    flipped = []
    for epoch in range(40):
        flips.set_epoch(epoch)
        flipped.append(flips[0]["annot"][0, 0] == 90)
    assert 8 <= sum(flipped) <= 32                         # about half


def test_scale_jitter_crop_geometry(red_box_set):
    size = 128
    jitter = Compose([Normalizer(MEAN, STD), RandomScaleCrop(size, (0.1, 2.0))])
    dataset = CocoDataset(red_box_set, "val", ["rectangle"], transform=jitter, seed=0)
    seen_up = seen_down = seen_cut = False
    for epoch in range(40):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        image, annot, scale = sample["img"], sample["annot"], sample["scale"]
        assert image.shape == (size, size, 3) and image.dtype == np.float32
        assert 0.1 * size / 200 - 0.01 <= scale <= 2.0 * size / 200 + 0.01
        seen_up |= scale > size / 200
        seen_down |= scale < size / 200
        red = _red_mask(_rgb01(image))
        if len(annot) == 0:
            assert red.sum() <= 2 * size                  # the box left the crop (or shrank below 1 px)
            continue
        assert len(annot) == 1 and annot[0, 4] == 0
        assert np.all(annot[0, :4] >= 0) and np.all(annot[0, :4] <= size)
        full = np.array([30, 20, 110, 70]) * scale
        seen_cut |= bool((annot[0, 2] - annot[0, 0]) < full[2] - full[0] - 1)
        _assert_box_covers_red(image, annot[0], tol=1.0)
    assert seen_up and seen_down and seen_cut


def test_scale_jitter_at_factor_one_equals_resize(red_box_set):
    resize = CocoDataset(red_box_set, "val", ["rectangle"], transform=Resizer(128))[0]
    crop = CocoDataset(red_box_set, "val", ["rectangle"], transform=RandomScaleCrop(128, (1.0, 1.0)))[0]
    np.testing.assert_array_equal(resize["img"], crop["img"])
    np.testing.assert_allclose(resize["annot"], crop["annot"])


def test_build_transform_switches():
    train = build_transform(256, MEAN, STD, train=True, flip=True, scale_jitter=True)
    assert [type(t) for t in train.transforms] == [Normalizer, HorizontalFlip, RandomScaleCrop]
    plain = build_transform(256, MEAN, STD, train=True, flip=False, scale_jitter=False)
    assert [type(t) for t in plain.transforms] == [Normalizer, Resizer]
    val = build_transform(256, MEAN, STD, train=False, flip=True, scale_jitter=True)
    assert [type(t) for t in val.transforms] == [Normalizer, Resizer]


# ---- collate ----------------------------------------------------------------------------------------

def test_collater_pads_with_minus_one():
    rng = np.random.default_rng(0)
    samples = [{"img": rng.random((32, 32, 3), dtype=np.float32), "annot": np.zeros((n, 5), np.float32) + n,
                "scale": 0.5, "image_id": i} for i, n in enumerate((0, 2, 3))]
    batch = collater(samples)
    assert batch["img"].shape == (3, 3, 32, 32)
    assert torch.equal(batch["img"][1, 2], torch.from_numpy(samples[1]["img"][..., 2]))   # NCHW
    assert batch["annot"].shape == (3, 3, 5)
    assert torch.all(batch["annot"][0] == -1)
    assert torch.all(batch["annot"][1, :2] == 2) and torch.all(batch["annot"][1, 2] == -1)
    assert torch.all(batch["annot"][2] == 3)
    assert batch["scale"] == [0.5] * 3 and batch["image_id"] == [0, 1, 2]

    empty = collater([{"img": s["img"], "annot": np.zeros((0, 5), np.float32), "scale": 1.0} for s in samples[:2]])
    assert empty["annot"].shape == (2, 1, 5) and torch.all(empty["annot"] == -1)
    with pytest.raises(ValueError, match="different sizes"):
        collater([samples[0], {"img": np.zeros((16, 32, 3), np.float32), "annot": np.zeros((0, 5))}])


# ---- broken data --------------------------------------------------------------------------------------

def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances_val\.json"):
        CocoDataset(tmp_path, "val", ["rectangle"])


def test_malformed_json(tmp_path):
    path = _write_set(tmp_path, [_image(0)], [])
    path.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(ValueError, match=r"instances_val\.json: malformed JSON .* line 1"):
        CocoDataset(tmp_path, "val", ["rectangle"])


@pytest.mark.parametrize("where, key, pattern", [
    ("top", "annotations", r"instances_val\.json: missing key 'annotations'"),
    ("top", "images", r"instances_val\.json: missing key 'images'"),
    ("image", "file_name", r"instances_val\.json: image id 0 .*missing key 'file_name'"),
    ("image", "width", r"image id 0 .*missing key 'width'"),
    ("annotation", "bbox", r"instances_val\.json: annotation id 5 .*missing key 'bbox'"),
    ("annotation", "category_id", r"annotation id 5 .*missing key 'category_id'"),
    ("annotation", "image_id", r"annotation id 5 .*missing key 'image_id'"),
])
def test_missing_key(tmp_path, where, key, pattern):
    images, annotations = [_image(0)], [_ann(5, 0, [1, 1, 10, 10])]
    _write_set(tmp_path, images, annotations)
    path = tmp_path / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    target = {"top": data, "image": data["images"][0], "annotation": data["annotations"][0]}[where]
    del target[key]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=pattern):
        CocoDataset(tmp_path, "val", ["rectangle"])


def test_bad_values(tmp_path):
    _write_set(tmp_path, [_image(0)], [_ann(5, 0, [1, 1, "ten", 10])])
    with pytest.raises(ValueError, match=r"annotation id 5: key 'bbox'"):
        CocoDataset(tmp_path, "val", ["rectangle"])
    _write_set(tmp_path, [_image(0)], [_ann(6, 3, [1, 1, 10, 10])])
    with pytest.raises(ValueError, match=r"annotation id 6: image_id 3 is not in 'images'"):
        CocoDataset(tmp_path, "val", ["rectangle"])
    _write_set(tmp_path, [_image(0), _image(0)], [])
    with pytest.raises(ValueError, match=r"image id 0: duplicate id"):
        CocoDataset(tmp_path, "val", ["rectangle"])


def test_unknown_category(tmp_path):
    _write_set(tmp_path, [_image(0)], [_ann(0, 0, [1, 1, 10, 10]), _ann(7, 0, [1, 1, 10, 10], category_id=3)])
    with pytest.raises(ValueError, match=r"instances_val\.json: annotation id 7: category_id 3 has no class"):
        CocoDataset(tmp_path, "val", load_project("shape"))
    # an unused COCO id ('' in coco.yml) is an error too
    _write_set(tmp_path, [_image(0)], [_ann(8, 0, [1, 1, 10, 10], category_id=12)],
               categories=[{"id": 12, "name": "street sign"}])
    with pytest.raises(ValueError, match=r"annotation id 8: category_id 12 has no class"):
        CocoDataset(tmp_path, "val", load_project("coco"))


@pytest.mark.parametrize("bbox, reason", [
    ([70, 10, 20, 10], "outside"),          # the image is 64 x 48
    ([-30, 10, 20, 10], "outside"),
    ([10, 60, 10, 10], "outside"),
    ([63.5, 10, 10, 10], "outside"),        # half a pixel inside
    ([10, 10, 0, 10], "degenerate"),
    ([10, 10, 10, 0.5], "degenerate"),
    ([10, 10, -5, 10], "degenerate"),
    ([63.5, 10, 1.2, 10], "degenerate"),    # inside the tolerance, under 1 px once clipped
])
def test_bad_box_skipped_and_counted(tmp_path, caplog, bbox, reason):
    _write_set(tmp_path, [_image(0), _image(1)], [_ann(3, 0, [5, 5, 10, 10]), _ann(9, 1, bbox)])
    with caplog.at_level(logging.WARNING, logger="efficientdet.dataset"):
        dataset = CocoDataset(tmp_path, "val", ["rectangle"])
    assert dataset.skipped[reason] == 1 and sum(dataset.skipped.values()) == 1
    assert len(dataset) == 2                                 # the image stays, as a negative
    assert dataset.load_annotations(1).shape == (0, 5)
    np.testing.assert_allclose(dataset.load_annotations(0), [[5, 5, 15, 15, 0]])
    warnings = [r.getMessage() for r in caplog.records]
    assert any("annotation id 9" in m and "1.png" in m for m in warnings)
    assert sum(f"skipped: {reason} 1" in m for m in warnings) == 1         # the summary, once


def test_boxes_crossing_the_border_are_clipped(tmp_path, caplog):
    _write_set(tmp_path, [_image(0)], [_ann(1, 0, [-0.5, 0, 64.8, 48.5]), _ann(2, 0, [50, -5, 20, 10]),
                                       _ann(3, 0, [10, 40, 10, 30])])
    with caplog.at_level(logging.INFO, logger="efficientdet.dataset"):
        dataset = CocoDataset(tmp_path, "val", ["rectangle"])
    np.testing.assert_allclose(dataset.load_annotations(0), [[0, 0, 64, 48, 0], [50, 0, 64, 5, 0], [10, 40, 20, 48, 0]])
    assert sum(dataset.skipped.values()) == 0 and dataset.clipped == 2      # the first is within the 1 px tolerance
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("2 clipped" in r.getMessage() for r in caplog.records)


def test_crowd_skipped(tmp_path):
    _write_set(tmp_path, [_image(0)], [_ann(1, 0, [1, 1, 10, 10], iscrowd=1), _ann(2, 0, [2, 2, 10, 10])])
    dataset = CocoDataset(tmp_path, "val", ["rectangle"])
    assert dataset.skipped["crowd"] == 1
    np.testing.assert_allclose(dataset.load_annotations(0), [[2, 2, 12, 12, 0]])


def test_missing_image(tmp_path, caplog):
    _write_set(tmp_path, [_image(0), _image(1), _image(2)], [_ann(1, 1, [1, 1, 10, 10])])
    (tmp_path / "val" / "1.png").unlink()
    with pytest.raises(ValueError, match=r"image file not found: .*val/1\.png \(image id 1"):
        CocoDataset(tmp_path, "val", ["rectangle"])
    with caplog.at_level(logging.WARNING, logger="efficientdet.dataset"):
        dataset = CocoDataset(tmp_path, "val", ["rectangle"], skip_missing=True)
    assert dataset.image_ids == [0, 2] and dataset.skipped["missing_image"] == 1
    assert any("1.png" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content", [b"\xff\xd8\xff garbage bytes, not a JPEG" * 4, b""])
def test_corrupt_image(tmp_path, content):
    images = [_image(0), {"id": 1, "file_name": "broken.jpg", "width": 64, "height": 48}]
    _write_set(tmp_path, images[:1], [])
    (tmp_path / "val" / "broken.jpg").write_bytes(content)
    _write_set(tmp_path, images, [], draw=False)
    dataset = CocoDataset(tmp_path, "val", ["rectangle"])            # existence is checked, content at load
    assert dataset[0]["img"].shape == (48, 64, 3)
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg \(image id 1\)"):
        dataset[1]


def test_obj_list_argument_checked(tmp_path):
    _write_set(tmp_path, [_image(0)], [])
    with pytest.raises(ValueError, match="obj_list"):
        CocoDataset(tmp_path, "val", "rectangle")
