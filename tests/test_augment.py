"""efficientdet/augment.py: flips, colour jitter, affine and mosaic against hand-computed boxes and pixels,
determinism per (seed, epoch, index), the defaults giving the published pipeline, setting checks, the
``--debug`` grid."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from efficientdet.augment import (AUGMENT_SETTINGS, AffineParams, ColorJitter, Mosaic, RandomAffine, VerticalFlip,
                                  affine, build_transform, check_augmentations, clip_boxes, jitter_hsv)
from efficientdet.dataset import CocoDataset, create_dataloaders
from efficientdet.synthetic import make_shape_dataset
from efficientdet.transforms import Compose, HorizontalFlip, Normalizer, Resizer
from utils.config.project import load_project
from utils.training.cli import build_parser
from utils.training.settings import DEFAULTS
from utils.training.setup import save_debug_grid, training_loaders
from utils.visual.draw import augmentation_grid

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _sample(height: int, width: int, boxes, value: float = 0.5) -> dict:
    image = np.full((height, width, 3), value, dtype=np.float32)
    annot = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
    return {"img": image, "annot": annot, "scale": 1.0, "image_id": 7}


def _ramp(height: int, width: int) -> np.ndarray:
    """A float32 image whose every pixel differs (to check where pixels go)."""
    values = np.arange(height * width * 3, dtype=np.float32).reshape(height, width, 3)
    return values / values.max()


@pytest.fixture(scope="module")
def shape_root(tmp_path_factory) -> Path:
    """A tiny shape dataset: ``ROOT/shape/{train,val}``, 6 + 2 images of 64 × 64."""
    root = tmp_path_factory.mktemp("augment_data")
    make_shape_dataset(root / "shape", num_train=6, num_val=2, size=64, seed=3)
    return root


# ---- vertical flip --------------------------------------------------------------------------------------------

def test_vertical_flip_boxes_and_pixels():
    sample = _sample(200, 100, [[10, 20, 50, 60, 1]])  # 100 wide, 200 high
    sample["img"] = _ramp(200, 100)
    original = sample["img"].copy()
    out = VerticalFlip(1.0)(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(out["annot"], [[10, 140, 50, 180, 1]])  # y1' = 200 - 60, y2' = 200 - 20
    np.testing.assert_array_equal(out["img"], original[::-1])
    kept = VerticalFlip(0.0)(_sample(200, 100, [[10, 20, 50, 60, 1]]), np.random.default_rng(0))
    np.testing.assert_array_equal(kept["annot"], [[10, 20, 50, 60, 1]])
    empty = VerticalFlip(1.0)(_sample(200, 100, np.zeros((0, 5))), np.random.default_rng(0))
    assert empty["annot"].shape == (0, 5)


# ---- affine ---------------------------------------------------------------------------------------------------

def test_affine_scale_and_translation_map_corners_exactly():
    # 100 wide x 200 high, centre (50, 100): x' = 0.5 (x - 50) + 50 + 10 = 0.5 x + 35, y' = 0.5 (y - 100) + 100 - 20
    out = affine(_sample(200, 100, [[10, 20, 50, 60, 1]]), AffineParams(scale=0.5, tx=10.0, ty=-20.0))
    np.testing.assert_allclose(out["annot"], [[40, 40, 60, 60, 1]], atol=1e-5)
    assert out["img"].shape == (200, 100, 3) and out["scale"] == 0.5
    empty = affine(_sample(200, 100, np.zeros((0, 5))), AffineParams(scale=0.5, tx=10.0, ty=-20.0))
    assert empty["annot"].shape == (0, 5)


def test_affine_translation_clips_and_drops_by_the_area_rule():
    sample = _sample(200, 100, [[10, 20, 50, 60, 0],     # -> (-20, 20, 20, 60): half inside, clipped
                                [0, 100, 20, 140, 1],    # -> (-30, 100, -10, 140): outside, dropped
                                [10, 100, 35, 110, 0],   # -> (-20, 100, 5, 110): 5 / 25 = 20 % inside, kept
                                [5, 150, 35, 160, 1],    # -> (-25, 150, 5, 160): 5 / 30 < 20 %, dropped
                                [40, 170, 60, 190, 1]])  # -> (10, 170, 30, 190): inside
    sample["img"] = _ramp(200, 100)
    original = sample["img"].copy()
    out = affine(sample, AffineParams(tx=-30.0))
    np.testing.assert_allclose(out["annot"], [[0, 20, 20, 60, 0], [0, 100, 5, 110, 0], [10, 170, 30, 190, 1]],
                               atol=1e-5)
    np.testing.assert_allclose(out["img"][:, :70], original[:, 30:], atol=1e-6)  # shifted 30 px left
    assert not out["img"][:, 70:].any()  # the border is 0


def test_affine_rotation_takes_the_bounding_box_of_the_corners():
    # 90 degrees about (50, 50) of a 100 x 100 image: x' = y, y' = 100 - x (counter-clockwise as displayed)
    sample = _sample(100, 100, [[10, 20, 50, 60, 1]])
    sample["img"] = _ramp(100, 100)
    original = sample["img"].copy()
    out = affine(sample, AffineParams(angle=90.0))
    np.testing.assert_allclose(out["annot"], [[20, 50, 60, 90, 1]], atol=1e-4)
    np.testing.assert_allclose(out["img"], np.rot90(original), atol=1e-5)
    # 45 degrees: the 20 x 20 box at the centre becomes a diamond of half-diagonal 10 sqrt(2)
    half = 10 * math.sqrt(2)
    out = affine(_sample(100, 100, [[40, 40, 60, 60, 0]]), AffineParams(angle=45.0))
    np.testing.assert_allclose(out["annot"], [[50 - half, 50 - half, 50 + half, 50 + half, 0]], atol=1e-4)


def test_random_affine_draws_its_ranges_from_the_generator():
    transform = RandomAffine(scale=0.5, translate=0.1, rotate=10.0)
    params = transform.draw(np.random.default_rng(5), 100, 200)
    rng = np.random.default_rng(5)  # scale, (tx, ty), angle in this order
    scale = rng.uniform(0.5, 1.5)
    tx, ty = rng.uniform(-0.1, 0.1, size=2)
    angle = rng.uniform(-10.0, 10.0)
    assert params == pytest.approx((scale, tx * 100, ty * 200, angle))
    boxes = [[10, 20, 50, 60, 1]]
    called = transform(_sample(200, 100, boxes), np.random.default_rng(5))
    direct = affine(_sample(200, 100, boxes), params)
    np.testing.assert_array_equal(called["annot"], direct["annot"])
    np.testing.assert_array_equal(called["img"], direct["img"])


def test_clip_boxes_rule():
    boxes = np.array([[-10, 0, 10, 10, 0],   # half inside: kept, clipped
                      [-9, 0, 1, 10, 1],     # 10 % inside: dropped
                      [5, 5, 5.5, 9, 0],     # 0.5 px wide: dropped (MIN_BOX_SIZE 1)
                      [90, 90, 110, 110, 1]], dtype=np.float32)  # a quarter inside: kept
    np.testing.assert_array_equal(clip_boxes(boxes, 100, 100), [[0, 0, 10, 10, 0], [90, 90, 100, 100, 1]])
    assert clip_boxes(np.zeros((0, 5)), 100, 100).shape == (0, 5)


# ---- colour ---------------------------------------------------------------------------------------------------

def test_hue_shift_by_a_third_turns_red_green():
    red = np.zeros((2, 2, 3), np.float32)
    red[..., 0] = 1.0
    np.testing.assert_allclose(jitter_hsv(red, 1.0 / 3.0, 1.0, 1.0), np.tile([0.0, 1.0, 0.0], (2, 2, 1)), atol=1e-5)


def test_color_jitter_gains_stay_in_range_and_leave_boxes_alone():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 0.5, size=(32, 48, 3)).astype(np.float32)  # x 1.4 stays below 1: no clipping
    boxes = [[1, 2, 30, 20, 1]]
    for seed in range(5):
        sample = _sample(32, 48, boxes)
        sample["img"] = image.copy()
        out = ColorJitter(0.0, 0.0, 0.4)(sample, np.random.default_rng(seed))
        gain = 1.0 + np.random.default_rng(seed).uniform(-1.0, 1.0, size=3)[2] * 0.4  # the value gain drawn
        assert 0.6 <= gain <= 1.4
        np.testing.assert_allclose(out["img"], image * gain, rtol=1e-4, atol=1e-5)  # value gain: RGB scaled
        np.testing.assert_array_equal(out["annot"], boxes)
        assert out["img"].shape == image.shape
    hue = ColorJitter(0.2, 0.0, 0.0)({"img": image.copy(), "annot": np.zeros((0, 5))}, np.random.default_rng(1))
    np.testing.assert_allclose(hue["img"].max(axis=2), image.max(axis=2), atol=1e-5)  # value kept
    np.testing.assert_allclose(np.ptp(hue["img"], axis=2), np.ptp(image, axis=2), atol=1e-5)  # chroma kept
    assert np.abs(hue["img"] - image).max() > 0.01
    saturation = ColorJitter(0.0, 0.7, 0.0)({"img": image.copy(), "annot": np.zeros((0, 5))},
                                            np.random.default_rng(2))
    np.testing.assert_allclose(saturation["img"].max(axis=2), image.max(axis=2), atol=1e-5)
    chroma_ratio = np.ptp(saturation["img"], axis=2) / np.ptp(image, axis=2)
    assert 0.3 - 1e-4 <= chroma_ratio.min() and chroma_ratio.max() <= 1.7 + 1e-4


# ---- mosaic ---------------------------------------------------------------------------------------------------

def test_mosaic_places_four_tiles_around_a_fixed_centre():
    fill = (0.1, 0.2, 0.3)
    tiles = [_sample(50, 50, [[10, 10, 40, 30, 0], [30, 30, 45, 45, 1]], value=0.9),
             _sample(50, 25, [[5, 25, 20, 45, 0]], value=0.8),  # 25 wide: resized to 50 x 100
             _sample(50, 50, [[0, 0, 50, 50, 1], [35, 0, 50, 20, 0]], value=0.7),
             _sample(50, 50, np.zeros((0, 5)), value=0.6)]
    out = Mosaic(1.0, 100, fill=fill).combine(tiles, (40, 60))
    # every tile x2; top-left corners: (-60, -40), (40, -40), (-60, 60), (40, 60)
    np.testing.assert_allclose(out["annot"], [[0, 20, 30, 50, 1],      # (60, 60, 90, 90) - (60, 40)
                                              [50, 10, 80, 50, 0],     # (10, 50, 40, 90) + (40, -40)
                                              [10, 60, 40, 100, 0]])   # (70, 0, 100, 40) + (-60, 60)
    # dropped: (-40, -20, 20, 20) keeps 400 of 2400 px; (-60, 60, 40, 160) keeps 1600 of 10000 px
    image = out["img"]
    assert image.shape == (100, 100, 3)
    np.testing.assert_allclose(image[:60, :40], 0.9)
    np.testing.assert_allclose(image[:60, 40:90], 0.8)
    np.testing.assert_allclose(image[:60, 90:], np.broadcast_to(fill, (60, 10, 3)))  # tile 1 is 50 wide
    np.testing.assert_allclose(image[60:, :40], 0.7)
    np.testing.assert_allclose(image[60:, 40:], 0.6)
    assert out["image_id"] == 7 and out["scale"] == 2.0


class _Source:
    def __init__(self, samples):
        self.samples, self.asked = samples, []

    def __len__(self) -> int:
        return len(self.samples)

    def raw_sample(self, index: int) -> dict:
        self.asked.append(index)
        return {key: (value.copy() if isinstance(value, np.ndarray) else value)
                for key, value in self.samples[index].items()}


def test_mosaic_draws_probability_indices_and_centre_from_the_sample_generator():
    source = _Source([_sample(50, 50, np.zeros((0, 5)), value=v) for v in (0.1, 0.2, 0.3, 0.4, 0.5)])
    off = Mosaic(0.0, 100)(_sample(50, 50, [[1, 1, 9, 9, 0]]), np.random.default_rng(1), source)
    assert off["img"].shape == (50, 50, 3) and source.asked == []
    own = _sample(50, 50, [[1, 1, 9, 9, 0]], value=0.9)
    out = Mosaic(1.0, 100)(own, np.random.default_rng(1), source)
    rng = np.random.default_rng(1)
    assert rng.random() < 1.0
    indices = [int(i) for i in rng.integers(0, 5, size=3)]
    cx, cy = (int(v) for v in rng.uniform(0.0, 100, size=2))
    assert source.asked == indices
    expected = Mosaic(1.0, 100).combine([_sample(50, 50, [[1, 1, 9, 9, 0]], value=0.9)]
                                        + [source.samples[i] for i in indices], (cx, cy))
    np.testing.assert_array_equal(out["img"], expected["img"])
    np.testing.assert_array_equal(out["annot"], expected["annot"])


def test_empty_images_go_through_every_augmentation():
    transform = build_transform(64, MEAN, STD, train=True, vflip=1.0, hsv_h=0.1, hsv_s=0.5, hsv_v=0.5,
                                affine_scale=0.3, affine_translate=0.1, affine_rotate=20.0)
    mosaic = Mosaic(1.0, 64).combine([_sample(40, 30, np.zeros((0, 5))) for _ in range(4)], (10, 50))
    for sample in (_sample(40, 30, np.zeros((0, 5))), mosaic):
        out = transform(sample, np.random.default_rng(0))
        assert out["img"].shape == (64, 64, 3) and out["annot"].shape == (0, 5)


# ---- the dataset: determinism, defaults -----------------------------------------------------------------------

def _augmented_set(root: Path, seed: int) -> CocoDataset:
    transform = build_transform(64, MEAN, STD, train=True, vflip=0.5, hsv_h=0.02, hsv_s=0.5, hsv_v=0.3,
                                affine_scale=0.3, affine_translate=0.1, affine_rotate=10.0)
    return CocoDataset(root / "shape", "train", load_project("shape"), transform=transform, seed=seed,
                       mosaic=Mosaic(0.7, 64, fill=MEAN))


def test_augmented_samples_are_deterministic_per_seed_epoch_index(shape_root):
    first, second = _augmented_set(shape_root, 5), _augmented_set(shape_root, 5)
    samples = [first[i] for i in range(len(first))]
    for i in reversed(range(len(second))):  # another order, another instance
        np.testing.assert_array_equal(second[i]["img"], samples[i]["img"])
        np.testing.assert_array_equal(second[i]["annot"], samples[i]["annot"])
    loader = torch.utils.data.DataLoader(second, batch_size=None, num_workers=2)
    for i, sample in enumerate(loader):  # in worker processes
        np.testing.assert_array_equal(np.asarray(sample["img"]), samples[i]["img"])
    second.set_epoch(1)
    assert any(not np.array_equal(second[i]["img"], samples[i]["img"]) for i in range(len(second)))


def test_defaults_give_the_published_pipeline_bit_for_bit(shape_root):
    project = load_project("shape")
    data = create_dataloaders(project, shape_root, 64, 2, seed=9, progress=False)
    reference = CocoDataset(shape_root / "shape", "train", project, seed=9,
                            transform=Compose([Normalizer(MEAN, STD), HorizontalFlip(0.5), Resizer(64)]))
    assert [type(t).__name__ for t in data.train_set.transform.transforms] == ["Normalizer", "HorizontalFlip",
                                                                               "Resizer"]
    assert data.train_set.mosaic is None
    for i in range(len(reference)):
        ours, theirs = data.train_set[i], reference[i]
        np.testing.assert_array_equal(ours["img"], theirs["img"])
        np.testing.assert_array_equal(ours["annot"], theirs["annot"])
        assert ours["scale"] == theirs["scale"]


def test_settings_reach_the_pipeline_in_order(shape_root):
    data = create_dataloaders(load_project("shape"), shape_root, 64, 2, seed=9, progress=False, vflip=0.5,
                              mosaic=0.5, hsv_v=0.3, affine_rotate=5.0)
    names = [type(t).__name__ for t in data.train_set.transform.transforms]
    assert names == ["ColorJitter", "Normalizer", "HorizontalFlip", "VerticalFlip", "RandomAffine", "Resizer"]
    assert data.train_set.mosaic.p == 0.5 and data.train_set.mosaic.fill == pytest.approx(MEAN)
    assert data.val_set.mosaic is None
    assert [type(t).__name__ for t in data.val_set.transform.transforms] == ["Normalizer", "Resizer"]
    assert data.train_set[0]["img"].shape == (64, 64, 3)


# ---- settings -------------------------------------------------------------------------------------------------

def test_settings_defaults_and_flags():
    assert {key: DEFAULTS[key] for key in AUGMENT_SETTINGS} == {key: 0.0 for key in AUGMENT_SETTINGS}
    args = build_parser().parse_args(["-c", "0", "-p", "shape", "--vflip", "0.5", "--affine_rotate", "10"])
    assert args.vflip == 0.5 and args.affine_rotate == 10.0 and args.mosaic is None


@pytest.mark.parametrize("name, value", [("vflip", 1.5), ("mosaic", -0.1), ("hsv_h", 0.6), ("hsv_s", -1.0),
                                         ("hsv_v", 1.2), ("affine_scale", 1.0), ("affine_translate", -0.2),
                                         ("affine_rotate", 200.0), ("vflip", float("nan"))])
def test_out_of_range_settings_name_the_flag_and_value(name, value):
    with pytest.raises(ValueError, match=rf"^--{name} must be .*{value}"):
        check_augmentations({name: value}, prefix="--")
    args = argparse.Namespace(**{key: 0.0 for key in AUGMENT_SETTINGS})
    setattr(args, name, value)
    with pytest.raises(ValueError, match=rf"^--{name} "):  # before any data is read
        training_loaders(args, None, 64, 2, torch.device("cpu"), 0, 1)
    if name != "mosaic":
        with pytest.raises(ValueError, match=rf"^{name} "):
            build_transform(64, MEAN, STD, train=True, **{name: value})


def test_in_range_settings_pass():
    check_augmentations({"vflip": 1.0, "mosaic": 0.0, "hsv_h": 0.5, "affine_scale": 0.99, "affine_rotate": 180.0})
    with pytest.raises(ValueError, match="unknown augmentation setting --flip"):
        check_augmentations({"flip": 0.5}, prefix="--")


# ---- the --debug grid -----------------------------------------------------------------------------------------

def test_debug_grid_is_written(shape_root, tmp_path):
    dataset = _augmented_set(shape_root, 1)
    path = augmentation_grid(dataset, tmp_path / "grid.jpg", MEAN, STD, count=5, columns=2, tile=48)
    grid = cv2.imread(str(path))
    assert grid.shape == (3 * 48, 2 * 48, 3)
    assert grid[104:136, 56:88].max() < 8 < grid[8:40, 8:40].mean()  # the sixth tile stays empty (JPEG aside)
    logged = []
    written = save_debug_grid(dataset, load_project("shape"), tmp_path / "logs" / "shape", logged.append)
    assert written == tmp_path / "logs" / "shape" / "augmentations.jpg" and written.is_file()
    assert cv2.imread(str(written)).shape == (2 * 256, 4 * 256, 3) and str(written) in logged[0]  # 6 samples


# ---- benchmark/augment_speed.py -------------------------------------------------------------------------------

def test_augment_speed_prints_one_row_per_configuration(shape_root, capsys):
    from benchmark import augment_speed

    args = augment_speed.parse_args(["--data_path", str(shape_root), "--input_size", "64", "--batch_size", "2",
                                     "--batches", "1", "--rounds", "1"])
    assert augment_speed.main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == [name for name, _ in augment_speed.CONFIGS]
    assert rows[0].split("|")[-2].strip() == "1.00"
    assert augment_speed.main(augment_speed.parse_args(["--data_path", str(shape_root), "--input_size", "64",
                                                        "--batches", "3"])) == 1  # 6 images: too few batches of 8
