"""Pre-processing as published (normalise, then aspect-preserving resize, top-left on a zero canvas) and the
inverse box mapping. The published functions are written out here as published (utils/utils.py and
efficientdet/dataset.py of zylo117/Yet-Another-EfficientDet-Pytorch) and ours are checked against them."""
from __future__ import annotations

from typing import List, Tuple

import cv2
import numpy as np
import pytest
import torch

from efficientdet.transforms import (FIT_TIES_INFERENCE, FIT_TIES_TRAINING, Normalizer, Resizer, letterbox_size,
                                     resized_shape)
from utils.inference.preprocess import ImageMeta, boxes_to_original, list_images, preprocess

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def published_aspectaware_resize_padding(image, width, height, interpolation=None, means=None):
    """The published inference geometry (utils/utils.py), verbatim: a square image (old_w == old_h) is
    fitted by its HEIGHT."""
    old_h, old_w, c = image.shape
    if old_w > old_h:
        new_w = width
        new_h = int(width / old_w * old_h)
    else:
        new_w = int(height / old_h * old_w)
        new_h = height

    canvas = np.zeros((height, height, c), np.float32)
    if means is not None:
        canvas[...] = means

    if new_w != old_w or new_h != old_h:
        if interpolation is None:
            image = cv2.resize(image, (new_w, new_h))
        else:
            image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)

    padding_h = height - new_h
    padding_w = width - new_w

    if c > 1:
        canvas[:new_h, :new_w] = image
    else:
        if len(image.shape) == 2:
            canvas[:new_h, :new_w, 0] = image
        else:
            canvas[:new_h, :new_w] = image

    return canvas, new_w, new_h, old_w, old_h, padding_w, padding_h,


def published_inference_sides(old_h: int, old_w: int, width: int, height: int) -> Tuple[int, int]:
    """(new_w, new_h) of the published ``aspectaware_resize_padding``, without touching pixels."""
    if old_w > old_h:
        return width, int(width / old_w * old_h)
    return int(height / old_h * old_w), height


def published_resizer_sides(height: int, width: int, img_size: int) -> Tuple[int, int, float]:
    """(resized_height, resized_width, scale) of the published training ``Resizer`` (efficientdet/dataset.py):
    a square image is fitted by its WIDTH."""
    if height > width:
        scale = img_size / height
        resized_height = img_size
        resized_width = int(width * scale)
    else:
        scale = img_size / width
        resized_height = int(height * scale)
        resized_width = img_size
    return resized_height, resized_width, scale


def published_preprocess(bgr: np.ndarray, size: int, mean=MEAN, std=STD) -> np.ndarray:
    """The published ``preprocess`` steps for one BGR image: BGR -> RGB, / 255, (x - mean) / std in float64,
    then ``aspectaware_resize_padding(img, size, size)``: the [size, size, 3] float32 canvas."""
    img = bgr[..., ::-1]
    normalized = (img / 255 - mean) / std
    return published_aspectaware_resize_padding(normalized, size, size, means=None)[0]


def shapes_to_check() -> List[Tuple[int, int]]:
    """(h, w): every square side 64..2048, 200 seeded random pairs, and extreme aspects."""
    rng = np.random.default_rng(2024)
    squares = [(s, s) for s in range(64, 2049)]
    spread = [tuple(int(v) for v in pair) for pair in rng.integers(1, 2049, size=(200, 2))]
    extreme = [(1, 2048), (2048, 1), (1, 1), (2, 2047), (2047, 2), (1, 512), (512, 1), (511, 512), (512, 511),
               (2048, 2047), (2047, 2048), (425, 425), (480, 640), (500, 300), (1, 3), (3, 1)]
    return squares + spread + extreme


SIZES = (256, 512, 640, 768, 1536)


def test_inference_geometry_is_the_published_one_for_every_shape():
    """Inference fits a square image by its height (published ``aspectaware_resize_padding``); where the
    published side truncates to 0 (it would fail in cv2.resize) ours is 1."""
    truncating_squares = 0
    for size in SIZES:
        for old_h, old_w in shapes_to_check():
            want_w, want_h = published_inference_sides(old_h, old_w, size, size)
            got_h, got_w = resized_shape(old_h, old_w, size, size, fit_ties_by=FIT_TIES_INFERENCE)
            assert (got_w, got_h) == (max(want_w, 1), max(want_h, 1)), (size, old_h, old_w)
            truncating_squares += old_h == old_w and want_w != size
    assert truncating_squares > 400  # e.g. 425 x 425 at 512: 511 wide x 512 high
    assert published_inference_sides(425, 425, 512, 512) == (511, 512)
    with pytest.raises(cv2.error):  # the published code at a side that truncates to 0
        published_aspectaware_resize_padding(np.zeros((1, 2048, 3)), 512, 512)


def test_training_geometry_is_the_published_resizer_for_every_shape():
    for size in SIZES:
        for height, width in shapes_to_check():
            want_h, want_w, want_scale = published_resizer_sides(height, width, size)
            want = (max(want_h, 1), max(want_w, 1))
            got = resized_shape(height, width, size, size, fit_ties_by=FIT_TIES_TRAINING)
            assert got == want, (size, height, width)
            assert letterbox_size(height, width, size) == (*want, want_scale)
    assert published_resizer_sides(425, 425, 512) == (511, 512, 512 / 425)  # 512 wide x 511 high
    with pytest.raises(ValueError, match="fit_ties_by"):
        resized_shape(10, 10, 64, 64, fit_ties_by="longer")


# Square sides that truncate at these canvases (int(size / side * side) < size), and others.
PIXEL_SHAPES = {256: [(98, 98), (103, 103), (425, 425), (128, 128), (300, 300), (120, 200), (190, 120), (3, 300)],
                384: [(94, 94), (147, 147), (425, 425), (480, 640), (500, 300)]}


@pytest.mark.parametrize("size", sorted(PIXEL_SHAPES))
def test_pixels_equal_the_published_steps(size):
    rng = np.random.default_rng(size)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in PIXEL_SHAPES[size]]
    batch, metas, _ = preprocess(images, size, MEAN, STD)
    for image, canvas, meta in zip(images, batch.permute(0, 2, 3, 1).numpy(), metas):
        want, new_w, new_h, old_w, old_h, _, _ = published_aspectaware_resize_padding(
            (image[..., ::-1] / 255 - MEAN) / STD, size, size)
        assert (meta.new_w, meta.new_h, meta.old_w, meta.old_h) == (new_w, new_h, old_w, old_h)
        assert canvas.shape == want.shape == (size, size, 3)
        np.testing.assert_array_equal(canvas, want)
    square = metas[0]
    assert square.new_w < size == square.new_h  # a truncating square: fitted by its height


def test_training_resizer_pixels_equal_the_published_resizer():
    """The training Resizer keeps the published training rule: a square image is fitted by its width."""
    rng = np.random.default_rng(7)
    for height, width in [(98, 98), (103, 103), (120, 200), (190, 120)]:
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        annot = np.array([[10.0, 20.0, 50.0, 60.0, 0.0]])
        sample = Resizer(256)(Normalizer(MEAN, STD)({"img": image[..., ::-1] / 255.0, "annot": annot.copy()}))
        resized_height, resized_width, scale = published_resizer_sides(height, width, 256)
        normalized = (image[..., ::-1] / 255.0 - MEAN) / STD
        want = np.zeros((256, 256, 3))
        want[:resized_height, :resized_width] = cv2.resize(normalized, (resized_width, resized_height),
                                                           interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(sample["img"], want.astype(np.float32))
        np.testing.assert_allclose(sample["annot"][:, :4], annot[:, :4] * scale, rtol=1e-6)
        if height == width:
            assert resized_width == 256 > resized_height  # by its width, unlike inference


@pytest.fixture
def landscape():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(120, 200, 3), dtype=np.uint8)


def test_matches_published_steps_exactly(tmp_path, landscape):
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), landscape)
    portrait = np.ascontiguousarray(landscape.transpose(1, 0, 2)[:190])
    batch, metas, originals = preprocess([str(path), portrait], 256, MEAN, STD)
    assert batch.shape == (2, 3, 256, 256) and batch.dtype == torch.float32
    for b, image in enumerate((landscape, portrait)):
        expected = published_preprocess(image, 256)
        np.testing.assert_allclose(batch[b].permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-6)
    assert np.array_equal(originals[0], landscape)
    assert (metas[0].old_h, metas[0].old_w, metas[0].new_h, metas[0].new_w) == (120, 200, 153, 256)
    assert (metas[1].old_h, metas[1].old_w, metas[1].new_h, metas[1].new_w) == (190, 120, 256, 161)
    assert metas[0].source == str(path)


def test_normalises_before_resizing(landscape):
    # Resizing the uint8 image first would round the interpolated values to integers.
    batch, _, _ = preprocess(landscape, 128, MEAN, STD)
    resized_first = cv2.resize(landscape, (128, 76))[..., ::-1] / 255.0
    resized_first = ((resized_first - np.array(MEAN)) / np.array(STD)).astype(np.float32)
    ours = batch[0].permute(1, 2, 0).numpy()[:76]
    assert np.abs(ours - resized_first).max() > 1e-3


def test_rgb_order_padding_and_project_stats():
    image = np.zeros((64, 128, 3), np.uint8)
    image[..., 0] = 255  # blue in BGR
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.5, 1.0)
    batch, metas, _ = preprocess(image, 256, mean, std)
    canvas = batch[0]
    assert metas[0].new_h == 128 and metas[0].new_w == 256
    # Channel 0 is red (0), channel 2 blue (255).
    assert torch.allclose(canvas[:, :128, :], torch.tensor([(0 - 0.5) / 0.5, (0 - 0.25) / 0.5, 1.0])[:, None, None])
    assert torch.count_nonzero(canvas[:, 128:, :]) == 0  # zero padding below the image


def test_grayscale_and_bgra_inputs(landscape):
    gray = cv2.cvtColor(landscape, cv2.COLOR_BGR2GRAY)
    bgr_of_gray = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    bgra = cv2.cvtColor(landscape, cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = 7
    batch, _, originals = preprocess([gray, gray[..., None], bgra, bgr_of_gray, landscape], 128, MEAN, STD)
    assert all(o.shape == (120, 200, 3) for o in originals)
    assert torch.equal(batch[0], batch[3]) and torch.equal(batch[1], batch[3])
    assert torch.equal(batch[2], batch[4])


def test_non_square_canvas(landscape):
    batch, metas, _ = preprocess(landscape, (256, 384), MEAN, STD)
    assert batch.shape == (1, 3, 256, 384)
    # 200x120 fits 384 wide at 230 high (height-limited would need 426 wide).
    assert (metas[0].new_h, metas[0].new_w) == (230, 384)
    assert resized_shape(120, 200, 256, 256, fit_ties_by=FIT_TIES_INFERENCE) == (153, 256)
    assert resized_shape(300, 100, 256, 384, fit_ties_by=FIT_TIES_INFERENCE) == (256, 85)
    assert resized_shape(100, 100, 128, 128, fit_ties_by=FIT_TIES_INFERENCE) == (128, 128)
    # Equal aspects on a non-square canvas: the tie rule decides (98 x 147 at 256 x 384: int(384 / 147 * 98) is
    # 255, int(256 / 98 * 147) is 383).
    assert resized_shape(98, 147, 256, 384, fit_ties_by=FIT_TIES_INFERENCE) == (256, 383)
    assert resized_shape(98, 147, 256, 384, fit_ties_by=FIT_TIES_TRAINING) == (255, 384)


def test_bad_inputs_name_the_file(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        preprocess(str(missing), 128)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        preprocess([broken], 128)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((10, 10, 3), np.float32), 128)
    with pytest.raises(ValueError, match="shape"):
        preprocess(np.zeros((10, 10, 2), np.uint8), 128)
    with pytest.raises(ValueError, match="no images"):
        preprocess([], 128)
    with pytest.raises(ValueError, match="input size"):
        preprocess(np.zeros((10, 10, 3), np.uint8), 0)


def test_boxes_back_to_original():
    meta = ImageMeta(old_h=120, old_w=200, new_h=153, new_w=256, canvas_h=256, canvas_w=256)
    canvas_boxes = np.array([[25.6, 15.3, 128.0, 76.5], [200.0, 100.0, 255.0, 255.0]], np.float32)
    mapped = boxes_to_original(canvas_boxes, meta)
    np.testing.assert_allclose(mapped[0], [20.0, 12.0, 100.0, 60.0], rtol=1e-5)
    # The second box reaches into the padding: clipped to the image.
    np.testing.assert_allclose(mapped[1], [156.25, 100 / (153 / 120), 199.0, 119.0], rtol=1e-5)
    unclipped = boxes_to_original(torch.from_numpy(canvas_boxes), meta, clip=False)
    assert isinstance(unclipped, torch.Tensor)
    assert unclipped[1, 3].item() == pytest.approx(255.0 / (153 / 120), rel=1e-5)
    assert canvas_boxes[0, 0] == pytest.approx(25.6)  # input untouched


def test_list_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.jpg", "a.png", "notes.txt"):
        (folder / name).write_bytes(b"x")
    single = tmp_path / "c.jpg"
    single.write_bytes(b"x")
    assert list_images([folder, single]) == [folder / "a.png", folder / "b.jpg", single]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        list_images([empty])
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images([tmp_path / "nope"])


def test_truncated_image_is_an_error_naming_the_file(tmp_path):
    """Inference reads images with the training loader's checks: a JPEG cut to a third is refused, not
    decoded into an image completed in grey."""
    from utils.inference.preprocess import read_image

    path = tmp_path / "cut.jpg"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    assert read_image(path).shape == (64, 96, 3)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 3])
    with pytest.raises(ValueError, match=r"cut\.jpg.*truncated"):
        read_image(path)
