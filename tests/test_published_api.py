"""The published module API (efficientdet/utils.py, utils/utils.py, the published FocalLoss call): users' scripts
and notebooks written against zylo117 "Yet-Another-EfficientDet-Pytorch" run unchanged and get the numbers of
the project's one implementation (utils.inference.detector.Detector, efficientdet.anchors, utils.inference.preprocess, ...)."""
from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pytest
import torch

import efficientdet.anchors as anchors_module
import train
from backbone import EfficientDetBackbone
from efficientdet.loss import FocalLoss
from efficientdet.utils import Anchors, BBoxTransform, ClipBoxes
from tests.conftest import REPO
from tests.test_loss import reference_yaep
from tests.test_postprocess import crafted_classification, reference_postprocess
from tests.test_preprocess import published_aspectaware_resize_padding
from tests.test_train import base_args, write_tiny_project
from utils.config.cli import boolean_string as cli_boolean_string
from utils.inference.detector import Detector
from utils.inference.postprocess import postprocess as project_postprocess
from utils.inference.preprocess import ImageMeta, boxes_to_original
from utils.inference.preprocess import preprocess as batch_preprocess
from utils.config.project import load_project
from utils.utils import (STANDARD_COLORS, aspectaware_resize_padding, boolean_string, color_list, get_index_label,
                         invert_affine, plot_one_box, postprocess, preprocess, preprocess_video, standard_to_bgr)

pytestmark = pytest.mark.usefixtures("one_thread")

IMG = REPO / "test" / "img.jpg"  # 428 x 640
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RATIOS = [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]
SCALES = [2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)]


# --------------------------------------------------------------------------------------------------
# The published inference snippet against utils.inference.detector.Detector.


def published_snippet(weights_path: Path, img_path: str, input_size: int, obj_list: Sequence[str],
                      threshold: Optional[float] = None, iou_threshold: float = 0.2):
    """The published efficientdet_test.py steps on one image, as users have them, with the network input both
    as the snippet makes it (channels-last strides, from ``permute``) and made contiguous. ``threshold`` None:
    the median best score (an untrained head: half of the anchors pass). Returns
    ``(threshold, {"channels_last": out, "contiguous": out}, {layout: (regression, classification)})``."""
    ori_imgs, framed_imgs, framed_metas = preprocess(img_path, max_size=input_size)
    x = torch.stack([torch.from_numpy(fi) for fi in framed_imgs], 0).to(torch.float32).permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()

    model = EfficientDetBackbone(compound_coef=0, num_classes=len(obj_list), ratios=RATIOS, scales=SCALES)
    model.load_state_dict(torch.load(weights_path))
    model.requires_grad_(False)
    model.eval()

    outs, raw = {}, {}
    for layout, inputs in (("channels_last", x), ("contiguous", x.contiguous())):
        with torch.no_grad():
            features, regression, classification, anchors = model(inputs)
        if threshold is None:
            threshold = float(classification.max(dim=2).values.median())
        out = postprocess(inputs, anchors, regression, classification, BBoxTransform(), ClipBoxes(),
                          threshold, iou_threshold)
        outs[layout] = invert_affine(framed_metas, out)
        raw[layout] = (regression, classification)
    return threshold, outs, raw


def assert_same_as_detector(outs, weights, project, img_path: str, input_size: int, threshold: float,
                            iou_threshold: float = 0.2) -> int:
    """Bit-exact equality of the snippet's detections with the Detector's in the matching layout (the snippet's
    permuted input is channels-last); returns the number of detections."""
    counts = set()
    for layout, mode in (("channels_last", "channels_last"), ("contiguous", "eager")):
        detector = Detector.from_checkpoint(0, weights, project, input_size=input_size, device="cpu",
                                            threshold=threshold, iou_threshold=iou_threshold, clip_to_image=False,
                                            mode=mode)
        (dets,) = detector.detect(img_path)
        (got,) = outs[layout]
        assert set(got) == {"rois", "class_ids", "scores"}
        assert got["rois"].dtype == np.float32 and got["rois"].shape == (len(dets), 4)
        assert got["class_ids"].dtype == np.int64 and got["scores"].dtype == np.float32
        assert np.array_equal(got["rois"], dets.boxes), layout
        assert np.array_equal(got["class_ids"], dets.class_ids), layout
        assert np.array_equal(got["scores"], dets.scores), layout
        counts.add(len(dets))
    return min(counts)


def test_snippet_on_a_checkpoint_written_by_train_py(tmp_path):
    """train.py writes ``efficientdet-d0_{epoch}_{step}.pth`` in the published format: a plain state_dict that
    ``model.load_state_dict(torch.load(path))`` takes (strict), and the published snippet on it gives exactly
    the Detector's detections."""
    yaml_path = write_tiny_project(tmp_path)
    args = base_args(tmp_path, yaml_path, "run") + ["--batch_size", "2", "--num_epochs", "1", "--max_steps", "2",
                                                    "--save_interval", "0", "--val_interval", "0"]
    assert train.main(train.parse_args(args)) == 0
    saved = sorted((tmp_path / "run" / "ckpt" / "tiny").glob("efficientdet-d0_*_*.pth"))
    assert saved, "train.py wrote no efficientdet-d0_{epoch}_{step}.pth"
    weights_path = saved[-1]
    state = torch.load(weights_path)
    assert all(isinstance(v, torch.Tensor) for v in state.values()), sorted(state)[:8]

    project = load_project(yaml_path)
    threshold, outs, _ = published_snippet(weights_path, str(IMG), 128, project.obj_list)
    assert assert_same_as_detector(outs, weights_path, project, str(IMG), 128, threshold) > 0


def published_pipeline(model, img_path: str, input_size: int, threshold: float, iou_threshold: float,
                       contiguous: bool = False):
    """The published efficientdet_test.py / coco_eval.py steps written out, none of ours but the model:
    ``cv2.imread``, RGB, ``(img / 255 - mean) / std``, ``aspectaware_resize_padding`` verbatim, the permuted input,
    the network, the published ``postprocess`` (decode, ``ClipBoxes`` to the input, max class score > threshold,
    class-aware NMS: ``reference_postprocess``), then ``invert_affine``: ``(rois, class_ids, scores)``.
    ``contiguous``: the same input values in the contiguous memory layout (the Detector's default; the
    permuted tensor is channels-last, whose convolutions round differently by ~3e-8)."""
    framed, (new_w, new_h, old_w, old_h, _, _) = published_frame(cv2.imread(img_path), input_size)
    x = torch.stack([torch.from_numpy(framed)], 0).to(torch.float32).permute(0, 3, 1, 2)
    x = x.contiguous() if contiguous else x
    with torch.no_grad():
        _, regression, classification, anchors = model(x)
    ((rois, class_ids, scores),) = reference_postprocess(input_size, input_size, anchors.numpy(), regression.numpy(),
                                                         classification.numpy(), threshold, iou_threshold)
    rois[:, [0, 2]] = rois[:, [0, 2]] / (new_w / old_w)
    rois[:, [1, 3]] = rois[:, [1, 3]] / (new_h / old_h)
    return rois, class_ids, scores


def pipeline_images(folder: Path) -> List[str]:
    """Views of test/img.jpg: a square whose side truncates at 256 (425 x 425: 255 wide x 256 high), 480 x 640
    (h x w) and 500 x 300."""
    image = cv2.imread(str(IMG))
    views = {"square425": image[:425, :425], "landscape480x640": cv2.resize(image, (640, 480)),
             "portrait500x300": cv2.resize(image[:, :300], (300, 500))}
    for name, view in views.items():
        cv2.imwrite(str(folder / f"{name}.png"), view)
    return [str(folder / f"{name}.png") for name in views]


#: Between the 26th and 27th best score of the conformance model (0.08163358, 0.08163065; its scores are close
#: together and the same on every image): float round-off cannot move a score across it.
CONFORMANCE_THRESHOLD = 0.0816321


def test_snippet_equals_the_published_steps_written_out(tmp_path, d0_model):
    """Our adapters (preprocess, postprocess, invert_affine) and the Detector give the detections of the
    published steps written out, on a truncating square and non-square images (same count, classes, boxes
    within 1e-3 px, scores within 1e-5)."""
    project = load_project(REPO / "projects" / "coco.yml")
    detector = Detector(copy.deepcopy(d0_model), project, input_size=256, device="cpu", mode="channels_last",
                        threshold=CONFORMANCE_THRESHOLD)
    for img_path in pipeline_images(tmp_path):
        rois, class_ids, scores = published_pipeline(d0_model, img_path, 256, CONFORMANCE_THRESHOLD, 0.2)
        _, framed_imgs, framed_metas = preprocess(img_path, max_size=256)
        x = torch.stack([torch.from_numpy(fi) for fi in framed_imgs], 0).to(torch.float32).permute(0, 3, 1, 2)
        with torch.no_grad():
            _, regression, classification, anchors = d0_model(x)
        out = postprocess(x, anchors, regression, classification, BBoxTransform(), ClipBoxes(),
                          CONFORMANCE_THRESHOLD, 0.2)
        (got,) = invert_affine(framed_metas, out)
        (dets,) = detector.detect(img_path)
        for boxes, ids, values in ((got["rois"], got["class_ids"], got["scores"]),
                                   (dets.boxes, dets.class_ids, dets.scores)):
            assert len(boxes) == len(rois) > 5, img_path
            np.testing.assert_array_equal(ids, class_ids)
            np.testing.assert_allclose(boxes, rois, rtol=0, atol=1e-3)
            np.testing.assert_allclose(values, scores, rtol=0, atol=1e-5)
        if "square" in img_path:  # y fills the input: y mapped back by 256 / 425, x by 255 / 425
            assert framed_metas[0][:2] == (255, 256)


def test_snippet_on_conformance_weights(tmp_path, d0_weights):
    weights_path = tmp_path / "efficientdet-d0.pth"
    torch.save(d0_weights, weights_path)
    project = load_project(REPO / "projects" / "coco.yml")
    threshold, outs, raw = published_snippet(weights_path, str(IMG), 256, project.obj_list, threshold=0.08)
    assert assert_same_as_detector(outs, weights_path, project, str(IMG), 256, threshold) > 10
    # Boxes are in original pixels: the 640-wide image was scaled by 0.4; some reach past 255 / 0.4 - 1.
    assert outs["contiguous"][0]["rois"][:, [0, 2]].max() > 255
    # The two layouts differ only by float round-off.
    for a, b in zip(raw["channels_last"], raw["contiguous"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Pre-processing geometry.


def published_frame(bgr: np.ndarray, size: int) -> Tuple[np.ndarray, tuple]:
    """The published ``preprocess`` of one BGR image, written out: RGB, ``(img / 255 - mean) / std`` in float64,
    ``aspectaware_resize_padding(img, size, size, means=None)``: (framed image, meta)."""
    normalized = (bgr[..., ::-1] / 255 - MEAN) / STD
    canvas, *meta = published_aspectaware_resize_padding(normalized, size, size, means=None)
    return canvas, tuple(meta)


# (h, w): landscape, portrait, squares whose side truncates at 256 (int(256 / 98 * 98) == 255) or not.
SHAPES = [(120, 200), (190, 100), (98, 98), (425, 425), (128, 128)]


@pytest.fixture
def two_images(tmp_path) -> Tuple[List[str], List[np.ndarray]]:
    """The images of SHAPES (the first two non-square, then squares) and their PNG files."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in SHAPES]
    paths = [str(tmp_path / f"{h}x{w}.png") for h, w in SHAPES]
    for path, image in zip(paths, images):
        cv2.imwrite(path, image)
    return paths, images


def test_preprocess_frames_metas_and_same_bits_as_detector_input(two_images):
    paths, images = two_images
    ori_imgs, framed_imgs, framed_metas = preprocess(*paths, max_size=256)
    assert all(np.array_equal(a, b) for a, b in zip(ori_imgs, images))
    assert framed_metas[:4] == [(256, 153, 200, 120, 0, 103), (134, 256, 100, 190, 122, 0), (255, 256, 98, 98, 1, 0),
                                (255, 256, 425, 425, 1, 0)]  # a square is fitted by its height
    batch, _, _ = batch_preprocess(paths, 256, MEAN, STD)
    for b, (framed, meta, image) in enumerate(zip(framed_imgs, framed_metas, images)):
        assert framed.shape == (256, 256, 3) and framed.dtype == np.float32 and framed.flags.c_contiguous
        want, want_meta = published_frame(image, 256)
        assert np.array_equal(framed, want) and meta == want_meta
        assert np.array_equal(framed, batch[b].permute(1, 2, 0).numpy())
    assert not framed_imgs[0][153:].any() and not framed_imgs[1][:, 134:].any() and not framed_imgs[2][:, 255:].any()


def test_preprocess_default_mean_std_are_rgb_ordered(tmp_path):
    signature = inspect.signature(preprocess)
    assert signature.parameters["mean"].default == MEAN and signature.parameters["std"].default == STD
    assert signature.parameters["max_size"].default == 512
    red = np.zeros((128, 128, 3), np.uint8)
    red[..., 2] = 255  # BGR
    path = tmp_path / "red.png"
    cv2.imwrite(str(path), red)
    _, (framed,), _ = preprocess(str(path), max_size=128)
    # Channel 0 is R, normalised with R's mean and std; channel 2 is B.
    np.testing.assert_allclose(framed[0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-6)
    # The project YAML's mean/std (RGB order) passed explicitly give the same input.
    _, (explicit,), _ = preprocess(str(path), max_size=128, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert np.array_equal(framed, explicit)


def test_preprocess_video_takes_frames(two_images):
    paths, images = two_images
    ori_imgs, framed_imgs, framed_metas = preprocess_video(*images, max_size=256)
    assert len(ori_imgs) == len(SHAPES) and ori_imgs[0] is images[0]
    _, from_files, file_metas = preprocess(*paths, max_size=256)
    assert framed_metas == file_metas
    assert all(np.array_equal(a, b) for a, b in zip(framed_imgs, from_files))
    for framed, meta, image in zip(framed_imgs, framed_metas, images):
        want, want_meta = published_frame(image, 256)
        assert np.array_equal(framed, want) and meta == want_meta


def test_preprocess_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        preprocess(str(missing))
    with pytest.raises(ValueError, match="mean and std"):
        preprocess(str(IMG), max_size=128, mean=(0.5, 0.5))


def test_aspectaware_resize_padding_geometry():
    rng = np.random.default_rng(1)
    image = rng.standard_normal((120, 200, 3))
    canvas, new_w, new_h, old_w, old_h, padding_w, padding_h = aspectaware_resize_padding(image, 256, 256)
    assert (new_w, new_h, old_w, old_h, padding_w, padding_h) == (256, 153, 200, 120, 0, 103)
    assert canvas.shape == (256, 256, 3) and canvas.dtype == np.float32
    assert np.array_equal(canvas[:153], cv2.resize(image, (256, 153)).astype(np.float32))
    assert not canvas[153:].any()

    portrait = rng.standard_normal((190, 100, 3))
    canvas, *meta = aspectaware_resize_padding(portrait, 256, 256, means=(1.0, 2.0, 3.0))
    assert tuple(meta) == (134, 256, 100, 190, 122, 0)
    assert np.array_equal(canvas[:, 134:], np.broadcast_to(np.float32([1, 2, 3]), (256, 122, 3)))

    nearest, *_ = aspectaware_resize_padding(image, 256, 256, interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(nearest[:153],
                          cv2.resize(image, (256, 153), interpolation=cv2.INTER_NEAREST).astype(np.float32))
    assert not np.array_equal(nearest, aspectaware_resize_padding(image, 256, 256)[0])

    # A non-square canvas is height x width (the published one was height x height).
    canvas, *meta = aspectaware_resize_padding(image, 384, 256)
    assert canvas.shape == (256, 384, 3) and tuple(meta) == (384, 230, 200, 120, 0, 26)
    # A size that is already right is not resized.
    same, *meta = aspectaware_resize_padding(image[:64, :128], 128, 128)
    assert np.array_equal(same[:64], image[:64, :128].astype(np.float32)) and tuple(meta) == (128, 64, 128, 64, 0, 64)

    # Square canvases (the published use): every result equals the published function's, squares included.
    for h, w in [(98, 98), (103, 103), (425, 425), (128, 128), (120, 200), (190, 100)]:
        array = rng.standard_normal((h, w, 3))
        for kwargs in ({}, {"means": (1.0, 2.0, 3.0)}, {"interpolation": cv2.INTER_NEAREST}):
            got, *got_meta = aspectaware_resize_padding(array, 256, 256, **kwargs)
            want, *want_meta = published_aspectaware_resize_padding(array, 256, 256, **kwargs)
            assert got_meta == want_meta and np.array_equal(got, want), (h, w, kwargs)
    assert aspectaware_resize_padding(rng.standard_normal((98, 98, 3)), 256, 256)[1:3] == (255, 256)


def test_invert_affine_maps_back_in_place_without_clipping():
    rois = np.array([[25.6, 12.75, 128.0, 76.5], [0.0, 0.0, 255.0, 152.0]], np.float32)
    preds = [{"rois": rois, "class_ids": np.array([1, 2]), "scores": np.array([0.9, 0.5], np.float32)},
             {"rois": np.zeros((0, 4), np.float32), "class_ids": np.zeros(0, np.int64),
              "scores": np.zeros(0, np.float32)}]
    metas = [(256, 153, 200, 120, 0, 103), (134, 256, 100, 190, 122, 0)]
    expected = boxes_to_original(rois, ImageMeta(old_h=120, old_w=200, new_h=153, new_w=256, canvas_h=256,
                                                 canvas_w=256), clip=False)
    out = invert_affine(metas, preds)
    assert out is preds and out[0]["rois"] is rois  # in place
    np.testing.assert_allclose(rois[0], [20.0, 10.0, 100.0, 60.0], rtol=1e-6)
    assert np.array_equal(rois, expected)
    assert rois[1, 2] == pytest.approx(255 / 1.28) and rois[1, 2] > 199  # not clipped to the image, as published
    assert out[1]["rois"].shape == (0, 4)
    with pytest.raises(ValueError, match="meta"):
        invert_affine([metas[0]], preds)


# --------------------------------------------------------------------------------------------------
# Post-processing, anchors, loss.


def test_postprocess_published_format_and_our_numbers(d0_vectors):
    x = torch.from_numpy(d0_vectors["input"])
    regression = torch.from_numpy(d0_vectors["regression"])
    anchors = torch.from_numpy(d0_vectors["anchors"])
    height, width = x.shape[2:]
    # The stored conformance detections (threshold 0.2) are empty for both images.
    stored = postprocess(x, anchors, regression, torch.from_numpy(d0_vectors["classification"]), BBoxTransform(),
                         ClipBoxes(), 0.2, 0.2)
    for b, got in enumerate(stored):
        assert len(got["rois"]) == len(d0_vectors[f"det{b}_rois"]) == 0
        assert got["rois"].shape == (0, 4) and got["class_ids"].shape == got["scores"].shape == (0,)
    assert invert_affine([(384, 256, 384, 256, 0, 0)] * 2, stored) is stored
    # Crafted class scores give real detections: reference_postprocess, and the project's postprocess bit for bit.
    classification = crafted_classification(regression.shape[1], 200, 4, seed=3)
    out = postprocess(x, anchors, regression, torch.from_numpy(classification), BBoxTransform(), ClipBoxes(),
                      0.2, 0.3)
    ours = project_postprocess((height, width), anchors, regression, torch.from_numpy(classification), 0.2, 0.3)
    expected = reference_postprocess(height, width, d0_vectors["anchors"], d0_vectors["regression"], classification,
                                     0.2, 0.3)
    assert len(out) == 2
    for got, dets, (boxes, classes, scores) in zip(out, ours, expected):
        assert 10 < len(got["rois"]) == len(scores) < 200
        assert got["rois"].dtype == np.float32 and got["class_ids"].dtype == np.int64
        assert np.array_equal(got["rois"], dets.boxes) and np.array_equal(got["scores"], dets.scores)
        assert np.array_equal(got["class_ids"], dets.class_ids)
        np.testing.assert_array_equal(got["class_ids"], classes)
        np.testing.assert_allclose(got["rois"], boxes, rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["scores"], scores, rtol=0, atol=1e-6)

    class OtherDecoder(torch.nn.Module):
        def forward(self, anchors, regression):
            return anchors
    with pytest.raises(ValueError, match="regressBoxes"):
        postprocess(x, anchors, regression, torch.from_numpy(classification), OtherDecoder(), ClipBoxes(), 0.2, 0.2)
    with pytest.raises(ValueError, match="clipBoxes"):
        postprocess(x, anchors, regression, torch.from_numpy(classification), BBoxTransform(), BBoxTransform(),
                    0.2, 0.2)


def test_box_coders_are_ours():
    assert BBoxTransform is anchors_module.BBoxTransform and ClipBoxes is anchors_module.ClipBoxes


def test_anchors_adapter_equals_our_anchors(d0_vectors):
    image = torch.zeros(2, 3, 256, 384)
    published = Anchors(anchor_scale=4., pyramid_levels=[3, 4, 5, 6, 7], scales=SCALES, ratios=RATIOS)
    ours = anchors_module.Anchors(4.0, (3, 4, 5, 6, 7), scales=SCALES, ratios=RATIOS)
    got = published(image)
    assert got.shape == (1, (32 * 48 + 16 * 24 + 8 * 12 + 4 * 6 + 2 * 3) * 9, 4) and got.dtype == torch.float32
    assert torch.equal(got, ours(image))
    assert torch.equal(Anchors()(image), got)  # published defaults
    np.testing.assert_allclose(got.numpy(), d0_vectors["anchors"], rtol=0, atol=1e-4)
    # First anchor: P3 (stride 8), centre (4, 4), scale 1, ratio (1, 1): half side 4 * 8 / 2 = 16.
    assert got[0, 0].tolist() == [-12.0, -12.0, 20.0, 20.0]
    # The published call's dtype, not the image's.
    assert Anchors()(image.double()).dtype == torch.float32
    assert Anchors()(image, torch.float16).dtype == torch.float16
    # D7x's extra level and explicit strides.
    assert Anchors(pyramid_levels=[3, 4, 5, 6, 7, 8])(image[..., :256]).shape[1] == (32 * 32 + 16 * 16 + 64 + 16 + 4 + 1) * 9
    assert Anchors(pyramid_levels=[3], strides=[16])(image).shape[1] == 16 * 24 * 9
    with pytest.raises(ValueError, match="divisible"):
        published(torch.zeros(1, 3, 200, 256))
    with pytest.raises(ValueError, match="anchor_sizes"):
        Anchors(anchor_sizes=[1])


def test_focal_loss_published_call_returns_our_values():
    torch.manual_seed(0)
    anchors = anchors_module.Anchors()(torch.zeros(1, 3, 128, 128))
    classifications = torch.rand(2, anchors.shape[1], 3)
    regressions = torch.randn(2, anchors.shape[1], 4) * 0.2
    annotations = torch.tensor([[[10., 20., 60., 90., 0.], [70., 5., 120., 40., 2.]],
                                [[32., 32., 96., 96., 1.], [-1., -1., -1., -1., -1.]]])
    imgs = torch.zeros(2, 3, 128, 128)
    published = FocalLoss()(classifications, regressions, anchors, annotations, imgs=imgs, obj_list=["a", "b", "c"])
    ours = FocalLoss("yaep")(classifications, regressions, anchors, annotations)
    assert len(published) == 2
    assert torch.equal(published[0], ours[0]) and torch.equal(published[1], ours[1])
    expected = reference_yaep(classifications, regressions, anchors, annotations)  # the published per-image loop
    torch.testing.assert_close(published[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(published[1], expected[1].float(), rtol=1e-5, atol=1e-6)
    assert published[1].item() > 0


# --------------------------------------------------------------------------------------------------
# Drawing and small helpers.


def test_plot_one_box_draws_in_place():
    image = np.zeros((200, 300, 3), np.uint8)
    plot_one_box(image, [50, 60, 150, 160], color=(0, 0, 255), line_thickness=2)
    assert tuple(image[110, 50]) == (0, 0, 255) and tuple(image[160, 100]) == (0, 0, 255)
    assert not image[:55].any() and not image[70:150, 60:140].any()  # no label, inside untouched

    labelled = np.zeros((200, 300, 3), np.uint8)
    plot_one_box(labelled, [50, 60, 150, 160], label="cat", score=0.87, color=(0, 0, 255), line_thickness=2)
    assert labelled[35:58, 52:90].any()  # the label above the box
    assert tuple(labelled[110, 50]) == (0, 0, 255)

    default = np.zeros((100, 100, 3), np.uint8)
    plot_one_box(default, (10.6, 10.2, 80.0, 80.0))
    assert default.any()


def test_colors_and_labels():
    assert len(STANDARD_COLORS) == 126 and STANDARD_COLORS[0] == "LawnGreen"
    bgr = standard_to_bgr(["Red", "LawnGreen", "navy"])
    assert bgr == [(0, 0, 255), (0, 252, 124), (128, 0, 0)]
    assert len(color_list) == len(STANDARD_COLORS) >= 90
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in color_list)
    assert color_list[:2] == [(0, 252, 124), (0, 255, 127)]
    with pytest.raises(ValueError):
        standard_to_bgr(["NoSuchColour"])
    obj_list = ["person", "bicycle", "car"]
    assert get_index_label("car", obj_list) == 2
    with pytest.raises(ValueError, match="truck"):
        get_index_label("truck", obj_list)
    assert boolean_string is cli_boolean_string and boolean_string("True") is True
    assert boolean_string("False") is False


def test_published_class_names_are_the_renamed_classes():
    """``EfficientDetBackbone`` (the whole detector) is ``EfficientDet``; ``FocalLoss`` (both losses) is
    ``DetectionLoss``: the same classes, so isinstance checks and pickled models keep working."""
    from backbone import EfficientDet
    from efficientdet.loss import DetectionLoss

    assert EfficientDetBackbone is EfficientDet and FocalLoss is DetectionLoss
    assert EfficientDetBackbone(num_classes=2, compound_coef=0).__class__.__name__ == "EfficientDet"
