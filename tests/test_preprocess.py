"""Pre-processing as published (normalise, then aspect-preserving resize, top-left on a zero canvas) and the
inverse box mapping."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from efficientdet.transforms import resized_shape
from utils.inference.preprocess import ImageMeta, boxes_to_original, list_images, preprocess

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def published_preprocess(bgr: np.ndarray, size: int) -> np.ndarray:
    """The published steps written out for one image on a square canvas: [size, size, 3] float32."""
    img = bgr[..., ::-1]
    normalized = (img / 255 - np.array(MEAN)) / np.array(STD)
    old_h, old_w = normalized.shape[:2]
    if old_w > old_h:
        new_w, new_h = size, int(size / old_w * old_h)
    else:
        new_w, new_h = int(size / old_h * old_w), size
    canvas = np.zeros((size, size, 3), np.float32)
    if (new_w, new_h) != (old_w, old_h):
        normalized = cv2.resize(normalized, (new_w, new_h))
    canvas[:new_h, :new_w] = normalized
    return canvas


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
    assert resized_shape(120, 200, 256, 256) == (153, 256)
    assert resized_shape(300, 100, 256, 384) == (256, 85)
    assert resized_shape(100, 100, 128, 128) == (128, 128)


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
