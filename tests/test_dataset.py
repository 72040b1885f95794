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

from efficientdet.dataset import (TAIL_BYTES, Augmenter, BadImageError, CocoDataset, Compose, HorizontalFlip,
                                  Normalizer, RandomScaleCrop, Resizer, build_transform, collater,
                                  create_dataloaders, inspect_image_file, letterbox_size, read_image, takes_rng,
                                  verify_image_files, verify_images)
from efficientdet.synthetic import make_shape_dataset
from tools.make_shape_dataset import main as make_shape_main, parse_args as make_shape_parse_args
from utils.config.project import load_project

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
    for verify in (True, False):                           # existence is checked either way
        with pytest.raises(ValueError, match=r"val/1\.png \(image id 1\): image file not found; 1 of 3 image files"):
            CocoDataset(tmp_path, "val", ["rectangle"], verify_images=verify)
    for option in ("skip_missing", "skip_bad_images"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="efficientdet.dataset"):
            dataset = CocoDataset(tmp_path, "val", ["rectangle"], **{option: True})
        assert dataset.image_ids == [0, 2] and dataset.skipped["missing_image"] == 1
        assert [(p.image_id, p.kind) for p in dataset.bad_images] == [(1, "missing")]
        assert any("1.png" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content, reason", [
    (b"\xff\xd8\xff garbage bytes, not a JPEG" * 4, "corrupt JPEG header: no marker FF 20"),
    (b"", "empty file"),
])
def test_corrupt_image(tmp_path, content, reason):
    images = [_image(0), {"id": 1, "file_name": "broken.jpg", "width": 64, "height": 48}]
    _write_set(tmp_path, images[:1], [])
    (tmp_path / "val" / "broken.jpg").write_bytes(content)
    _write_set(tmp_path, images, [], draw=False)
    with pytest.raises(ValueError, match=rf"broken\.jpg \(image id 1\): {reason}"):
        CocoDataset(tmp_path, "val", ["rectangle"])
    dataset = CocoDataset(tmp_path, "val", ["rectangle"], verify_images=False)   # existence only, content at load
    assert dataset[0]["img"].shape == (48, 64, 3)
    with pytest.raises(ValueError, match=rf"cannot read image .*broken\.jpg \(image id 1\): {reason}"):
        dataset[1]


# ---- image checks before training ----------------------------------------------------------------------

def _noise_image(seed: int, width: int = 96, height: int = 64) -> np.ndarray:
    """A BGR uint8 image that compresses poorly (JPEG of several KiB)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_jpeg_set(root: Path, count: int = 6, set_name: str = "train") -> List[Path]:
    """``count`` 96x64 noise JPEGs ``<id>.jpg`` with one box each; their paths."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 96, "height": 64} for i in range(count)]
    _write_set(root, images, [_ann(10 + i, i, [4 + i, 5, 20, 30]) for i in range(count)], set_name, draw=False)
    paths = [root / set_name / f"{i}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        cv2.imwrite(str(path), _noise_image(i))
    return paths


def _cut(path: Path, fraction: float = 1 / 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


@pytest.fixture()
def no_decoding(monkeypatch):
    """Fail the test if any image is decoded (the construction-time check must read headers only)."""
    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded")
    monkeypatch.setattr(cv2, "imdecode", refuse)
    monkeypatch.setattr(cv2, "imread", refuse)


def test_empty_and_truncated_images_found_at_construction(tmp_path, caplog, no_decoding):
    paths = _write_jpeg_set(tmp_path)
    paths[2].write_bytes(b"")
    _cut(paths[4])
    with pytest.raises(ValueError, match=r"train/2\.jpg \(image id 2\): empty file \(0 bytes\); 2 of 6 image files "
                                         r".*instances_train\.json are bad \(pass skip_bad_images=True"):
        CocoDataset(tmp_path, "train", ["rectangle"])
    with caplog.at_level(logging.WARNING, logger="efficientdet.dataset"):
        dataset = CocoDataset(tmp_path, "train", ["rectangle"], skip_bad_images=True)
    assert dataset.image_ids == [0, 1, 3, 5] and dataset.skipped["bad_image"] == 2
    assert [(p.image_id, p.kind) for p in dataset.bad_images] == [(2, "empty"), (4, "truncated")]
    assert "no JPEG end marker (FF D9)" in dataset.bad_images[1].reason
    messages = [r.getMessage() for r in caplog.records]
    assert any("2.jpg (image id 2): empty file" in m for m in messages)
    assert any("4.jpg (image id 4): no JPEG end marker" in m for m in messages)
    assert any("4 of 6 images" in m and "bad_image 2" in m for m in messages)       # the summary
    np.testing.assert_allclose(dataset.load_annotations(2), [[7, 5, 27, 35, 0]])      # image 3's box

    # the truncated file alone (first bad file named, count 1)
    paths[2].write_bytes(cv2.imencode(".jpg", _noise_image(2))[1].tobytes())
    with pytest.raises(ValueError, match=r"4\.jpg \(image id 4\): no JPEG end marker .*truncated; 1 of 6"):
        CocoDataset(tmp_path, "train", ["rectangle"])


def test_create_dataloaders_checks_images(tmp_path, no_decoding):
    _write_jpeg_set(tmp_path / "shape", 6, "train")
    val = _write_jpeg_set(tmp_path / "shape", 4, "val")
    val[1].write_bytes(b"")
    project = load_project("shape")
    with pytest.raises(ValueError, match=r"val/1\.jpg \(image id 1\): empty file"):
        create_dataloaders(project, tmp_path, 64, 2)
    bundle = create_dataloaders(project, tmp_path, 64, 2, skip_bad_images=True)
    assert len(bundle.train_set) == 6 and bundle.val_set.image_ids == [0, 2, 3]
    assert bundle.val_set.skipped["bad_image"] == 1
    unchecked = create_dataloaders(project, tmp_path, 64, 2, verify_images=False)   # no check: found at load
    assert len(unchecked.val_set) == 4


def test_good_images_pass(synthetic_root, shared_dir, no_decoding):
    project = load_project("shape")
    dataset = CocoDataset(synthetic_root, "train", project)
    assert len(dataset) == 8 and dataset.bad_images == [] and verify_images(dataset) == []
    info = inspect_image_file(dataset.image_path(0))
    assert (info.format, info.width, info.height) == ("jpeg", 128, 128)
    info = inspect_image_file(shared_dir / "data" / "coco_tiny" / "val2017" /
                              sorted(p.name for p in (shared_dir / "data" / "coco_tiny" / "val2017").iterdir())[0])
    assert info.format == "jpeg" and info.width > 0 and info.height > 0


@pytest.mark.parametrize("ext, fmt, sized, checks_tail", [
    (".jpg", "jpeg", True, True), (".png", "png", True, True), (".bmp", "bmp", True, True),
    (".webp", "webp", True, True), (".gif", "gif", True, True), (".tiff", "tiff", False, False),
    (".ppm", "pnm", False, False),
])
def test_formats_and_truncation(tmp_path, ext, fmt, sized, checks_tail):
    image = _noise_image(0)
    path = tmp_path / f"a{ext}"
    try:
        path.write_bytes(cv2.imencode(ext, image)[1].tobytes())
    except cv2.error:
        pytest.skip(f"this OpenCV cannot write {ext}")
    info = inspect_image_file(path, 7)
    assert info.format == fmt and info.size == path.stat().st_size
    assert (info.width, info.height) == ((96, 64) if sized else (None, None))
    assert read_image(path).shape == (64, 96, 3)
    if checks_tail:
        _cut(path)
        with pytest.raises(BadImageError, match=rf"a{ext} \(image id 7\): .*truncated") as caught:
            inspect_image_file(path, 7)
        assert caught.value.kind == "truncated" and caught.value.image_id == 7
        with pytest.raises(ValueError, match=rf"cannot read image .*a{ext}: .*truncated"):
            read_image(path)


def test_truncated_png_found_at_construction(tmp_path, no_decoding):
    images = [_image(0), _image(1)]
    _write_set(tmp_path, images, [])
    _cut(tmp_path / "val" / "1.png")
    with pytest.raises(ValueError, match=r"1\.png \(image id 1\): no PNG IEND chunk at the end of the file: truncated"):
        CocoDataset(tmp_path, "val", ["rectangle"])


def test_image_check_details(tmp_path):
    path = tmp_path / "pad.jpg"
    data = cv2.imencode(".jpg", _noise_image(1))[1].tobytes()
    path.write_bytes(data + b"\x00" * 300)                   # trailing padding after the end marker is fine
    assert inspect_image_file(path).format == "jpeg" and read_image(path).shape == (64, 96, 3)
    path.write_bytes(data + b"\x00" * (TAIL_BYTES + 10))    # the end marker must lie in the tail read
    with pytest.raises(BadImageError, match="no JPEG end marker"):
        inspect_image_file(path)
    path.write_bytes(data[:-2])                               # only the end marker missing
    with pytest.raises(BadImageError, match="no JPEG end marker"):
        inspect_image_file(path)
    path.write_bytes(data[:200])                              # cut inside the header
    with pytest.raises(BadImageError, match="truncated") as caught:
        inspect_image_file(path)
    assert caught.value.kind == "truncated"
    path.write_text("this is not an image, " * 10)
    with pytest.raises(BadImageError, match=r"not an image of a known format \(first bytes: 74 68 69 73"):
        inspect_image_file(path)
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*nothing\.jpg \(image id 3\)"):
        inspect_image_file(tmp_path / "nothing.jpg", 3)
    with pytest.raises(BadImageError, match=r"cannot read the file") as caught:
        inspect_image_file(tmp_path)                          # a folder
    assert caught.value.kind == "unreadable"
    problems = verify_image_files([(1, tmp_path / "nothing.jpg"), (2, path)], progress=False)
    assert [(p.image_id, p.kind) for p in problems] == [(1, "missing"), (2, "unknown_format")]
    assert str(problems[0]).endswith("nothing.jpg (image id 1): image file not found")


def test_size_mismatch_is_a_warning(tmp_path, caplog):
    _write_set(tmp_path, [_image(0, 64, 48)], [])
    cv2.imwrite(str(tmp_path / "val" / "0.png"), np.zeros((40, 50, 3), np.uint8))
    with caplog.at_level(logging.WARNING, logger="efficientdet.dataset"):
        dataset = CocoDataset(tmp_path, "val", ["rectangle"])
    assert len(dataset) == 1 and dataset.bad_images == []
    assert any("1 of 1 images differ in size" in r.getMessage() and "is 50x40, listed as 64x48" in r.getMessage()
               for r in caplog.records)


def test_decode_time_errors_name_the_file(tmp_path):
    paths = _write_jpeg_set(tmp_path)
    dataset = CocoDataset(tmp_path, "train", ["rectangle"])
    _cut(paths[3])                                            # broken after the check
    with pytest.raises(ValueError, match=r"cannot read image .*train/3\.jpg \(image id 3\): no JPEG end marker"):
        dataset[3]
    # a PNG whose header and IEND are intact but whose pixel data is corrupt: OpenCV's decode fails
    _write_set(tmp_path, [_image(0), _image(1)], [])
    png = bytearray(cv2.imencode(".png", _noise_image(5, 64, 48))[1].tobytes())
    png[len(png) // 2:len(png) // 2 + 64] = bytes(64)
    (tmp_path / "val" / "1.png").write_bytes(bytes(png))
    dataset = CocoDataset(tmp_path, "val", ["rectangle"])    # passes the cheap check
    with pytest.raises(BadImageError, match=r"1\.png \(image id 1\): OpenCV cannot decode it") as caught:
        dataset[1]
    assert caught.value.kind == "decode_failed"
    dataset = CocoDataset(tmp_path, "train", ["rectangle"], verify_images=False)
    paths[4].unlink()                                         # gone after the check
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*train/4\.jpg \(image id 4\)"):
        dataset[4]


def test_decode_failure_with_skip_bad_images_is_replaced(tmp_path, caplog):
    paths = _write_jpeg_set(tmp_path)
    transform = build_transform(64, MEAN, STD, train=True, scale_jitter=True)
    dataset = CocoDataset(tmp_path, "train", ["rectangle"], transform=transform, seed=3, skip_bad_images=True)
    reference = CocoDataset(tmp_path, "train", ["rectangle"], seed=3)
    _cut(paths[2])
    _cut(paths[5])                                            # the last one: its replacement wraps around to 0
    with caplog.at_level(logging.WARNING, logger="efficientdet.dataset"):
        sample = dataset[2]
    assert sample["image_id"] == 3 and dataset.decode_failures == 1
    assert any("2.jpg (image id 2): no JPEG end marker" in r.getMessage() and "skip_bad_images" in r.getMessage()
               for r in caplog.records)
    # image 3 with sample 2's augmentation stream, deterministic
    expected = transform({"img": reference.load_image(3), "annot": reference.load_annotations(3), "scale": 1.0},
                         dataset.rng(2))
    again = dataset[2]
    np.testing.assert_array_equal(sample["img"], expected["img"])
    np.testing.assert_array_equal(again["img"], expected["img"])
    np.testing.assert_array_equal(sample["annot"], expected["annot"])
    assert dataset[5]["image_id"] == 0 and dataset.decode_failures == 2
    assert dataset[3]["image_id"] == 3                        # good samples are untouched

    # found in DataLoader workers, counted here (shared memory)
    fresh = CocoDataset(tmp_path, "train", ["rectangle"], transform=transform, seed=3, skip_bad_images=True,
                        verify_images=False)
    loader = torch.utils.data.DataLoader(fresh, batch_size=3, num_workers=2, collate_fn=collater)
    ids = [i for batch in loader for i in batch["image_id"]]
    assert ids == [0, 1, 3, 3, 4, 0] and fresh.decode_failures == 2

    for path in paths:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 6 images loads"):
        fresh[0]


# ---- the published API ------------------------------------------------------------------------------------

class _TorchvisionCompose:
    """``torchvision.transforms.Compose`` (not installed here): one-argument calls, as its ``__call__``."""

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


def _assert_same_or_mirrored(image: np.ndarray, annot: np.ndarray, reference: dict) -> bool:
    """``image``/``annot`` equal ``reference``'s, or its horizontal flip (before the resize); True if flipped."""
    if np.array_equal(image, reference["img"]):
        np.testing.assert_allclose(annot, reference["annot"], rtol=1e-6)
        return False
    width = round(96 * reference["scale"])                  # the content's width on the canvas
    np.testing.assert_allclose(image[:, :width], reference["img"][:, :width][:, ::-1], atol=1e-5)
    mirrored = reference["annot"].copy()
    mirrored[:, [0, 2]] = width - reference["annot"][:, [2, 0]]
    np.testing.assert_allclose(annot, mirrored, rtol=1e-5, atol=1e-4)
    return True


def test_published_training_snippet(tmp_path):
    _write_jpeg_set(tmp_path / "shape", 8, "train")
    root = str(tmp_path / "shape")
    # the published train.py, verbatim but for the paths and the size
    training_set = CocoDataset(root_dir=root, set="train",
                               transform=Compose([Normalizer(mean=list(MEAN), std=list(STD)), Augmenter(),
                                                  Resizer(64)]))
    loader = torch.utils.data.DataLoader(training_set, batch_size=4, shuffle=False, drop_last=True,
                                         collate_fn=collater, num_workers=0)
    ours = CocoDataset(tmp_path / "shape", "train", load_project("shape"),
                       transform=build_transform(64, MEAN, STD, train=False))
    assert training_set.obj_list == ("rectangle", "circle") and training_set.labels == {0: "rectangle", 1: "circle"}
    assert training_set.classes == {"rectangle": 0, "circle": 1} and training_set.image_ids == ours.image_ids
    flips = []
    for start, batch in zip((0, 4), loader):
        assert batch["img"].shape == (4, 3, 64, 64) and batch["img"].dtype == torch.float32
        assert batch["annot"].shape == (4, 1, 5) and batch["scale"] == [pytest.approx(64 / 96)] * 4
        for i in range(4):
            reference = ours[start + i]
            image = batch["img"][i].permute(1, 2, 0).numpy()
            flips.append(_assert_same_or_mirrored(image, batch["annot"][i].numpy(), reference))
    assert len(flips) == 8

    # seeded, the published composition gives exactly our training pipeline's batches
    seeded = CocoDataset(root_dir=root, set="train", seed=11,
                         transform=Compose([Normalizer(mean=MEAN, std=STD), Augmenter(), Resizer(img_size=64)]))
    ours_train = CocoDataset(tmp_path / "shape", "train", load_project("shape"), seed=11,
                             transform=build_transform(64, MEAN, STD, train=True))
    for a, b in zip(torch.utils.data.DataLoader(seeded, batch_size=4, collate_fn=collater),
                    torch.utils.data.DataLoader(ours_train, batch_size=4, collate_fn=collater)):
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["annot"], b["annot"]) and a["scale"] == b["scale"]

    # torchvision's Compose calls every transform with one argument
    one_arg = CocoDataset(root, "train", _TorchvisionCompose([Normalizer(mean=MEAN, std=STD), Augmenter(),
                                                              Resizer(img_size=64)]))
    assert one_arg.obj_list == ("rectangle", "circle") and one_arg.set_name == "train"
    for index in range(len(one_arg)):
        sample = one_arg[index]
        _assert_same_or_mirrored(sample["img"], sample["annot"], ours[index])
    never = _TorchvisionCompose([Normalizer(mean=MEAN, std=STD), lambda s: Augmenter()(s, flip_x=0.0), Resizer(64)])
    sample = CocoDataset(root_dir=root, set="train", transform=never)[1]
    np.testing.assert_array_equal(sample["img"], ours[1]["img"])


def test_published_constructor_forms(tmp_path):
    _write_set(tmp_path, [_image(0)], [_ann(1, 0, [1, 1, 10, 10], category_id=3)], set_name="train2017",
               categories=[{"id": 3, "name": "c"}, {"id": 1, "name": "a"}])
    dataset = CocoDataset(root_dir=tmp_path)                  # set defaults to 'train2017'
    assert dataset.obj_list == ("a", "", "c") and dataset.labels == {0: "a", 2: "c"}
    np.testing.assert_allclose(dataset.load_annotations(0), [[1, 1, 11, 11, 2]])
    assert dataset.root_dir == tmp_path and dataset.set_name == "train2017"
    assert CocoDataset(tmp_path, "train2017", ["a", "b", "c"]).obj_list == ("a", "b", "c")   # ours unchanged
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json"):
        CocoDataset(str(tmp_path), "val2017")
    with pytest.raises(ValueError, match="root"):
        CocoDataset(tmp_path, root_dir=tmp_path)
    with pytest.raises(ValueError, match="set_name or the published set"):
        CocoDataset(tmp_path, "train2017", set="train2017")
    _write_set(tmp_path, [_image(0)], [], set_name="nocat", categories=[])
    with pytest.raises(ValueError, match=r"instances_nocat\.json: no obj_list given and no 'categories'"):
        CocoDataset(tmp_path, "nocat")
    _write_set(tmp_path, [_image(0)], [], set_name="badcat", categories=[{"id": 1, "name": ""}])
    with pytest.raises(ValueError, match=r"instances_badcat\.json: category id 1: expected a non-empty 'name'"):
        CocoDataset(tmp_path, "badcat")


def test_transforms_take_one_or_two_arguments(red_box_set):
    raw = CocoDataset(red_box_set, "val", ["rectangle"])[0]

    def fresh() -> dict:
        return {"img": raw["img"].copy(), "annot": raw["annot"].copy(), "scale": 1.0}

    np.testing.assert_array_equal(Normalizer(MEAN, STD)(fresh())["img"],
                                  Normalizer(MEAN, STD)(fresh(), np.random.default_rng(0))["img"])
    resized = Resizer(img_size=128)(fresh())
    assert Resizer(img_size=128).img_size == 128 and resized["img"].shape == (128, 128, 3)
    np.testing.assert_array_equal(resized["img"], Resizer(128)(fresh(), np.random.default_rng(0))["img"])
    assert Augmenter()(fresh(), flip_x=1.0)["annot"][0, 0] == 90          # published keyword
    assert Augmenter()(fresh(), 0.0)["annot"][0, 0] == 30                 # published positional flip_x
    assert HorizontalFlip(1.0)(fresh())["annot"][0, 0] == 90
    draws = {bool(Augmenter()(fresh())["annot"][0, 0] == 90) for _ in range(40)}
    assert draws == {True, False}                                          # fresh randomness per one-arg call
    assert RandomScaleCrop(64)(fresh())["img"].shape == (64, 64, 3)
    seeded = [Compose([HorizontalFlip(), RandomScaleCrop(64)])(fresh(), np.random.default_rng(4)) for _ in range(2)]
    np.testing.assert_array_equal(seeded[0]["img"], seeded[1]["img"])

    class PublishedStyle:
        def __call__(self, sample, flip_x=0.5):
            sample["flip_x"] = flip_x
            return sample

    assert Compose([PublishedStyle()])(fresh(), np.random.default_rng(0))["flip_x"] == 0.5   # not handed the rng
    assert takes_rng(lambda sample, rng: sample) and takes_rng(Normalizer()) and takes_rng(Augmenter())
    assert not takes_rng(lambda sample: sample) and not takes_rng(PublishedStyle()) and not takes_rng(print)


def test_collater_takes_tensors():
    rng = np.random.default_rng(0)
    samples = [{"img": rng.random((32, 32, 3), dtype=np.float32),
                "annot": np.arange(5 * n, dtype=np.float64).reshape(n, 5), "scale": 0.5} for n in (1, 3)]
    as_tensors = [{"img": torch.from_numpy(s["img"]), "annot": torch.from_numpy(s["annot"]), "scale": 0.5}
                  for s in samples]                          # what the published Resizer returns
    a, b = collater(samples), collater(as_tensors)
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["annot"], b["annot"]) and a["scale"] == b["scale"]
    assert b["annot"].dtype == torch.float32 and b["annot"].shape == (2, 3, 5) and torch.all(b["annot"][0, 1:] == -1)


def test_obj_list_argument_checked(tmp_path):
    _write_set(tmp_path, [_image(0)], [])
    with pytest.raises(ValueError, match="obj_list"):
        CocoDataset(tmp_path, "val", "rectangle")


def test_validation_sample_is_the_detector_input(synthetic_root):
    """One image pipeline (efficientdet.transforms): a validation sample and the detector's pre-processing
    of the same file agree in geometry exactly and in value up to the float32 raw image of the published
    loader (< 5e-7)."""
    from utils.inference.preprocess import preprocess

    dataset = CocoDataset(synthetic_root, "val", ["circle", "rectangle", "triangle"],
                          transform=build_transform(96, MEAN, STD, train=False))
    for index in range(len(dataset)):
        sample = dataset[index]
        batch, metas, _ = preprocess(str(dataset.image_path(index)), 96, MEAN, STD)
        ours = batch[0].permute(1, 2, 0).numpy()
        assert sample["img"].dtype == ours.dtype == np.float32
        np.testing.assert_array_equal(sample["img"] == 0, ours == 0)
        np.testing.assert_allclose(sample["img"], ours, rtol=0, atol=5e-7)
        assert sample["scale"] == pytest.approx(metas[0].scale_x) == pytest.approx(metas[0].scale_y)
