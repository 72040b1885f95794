"""The detector network: published layout, conformance outputs, input sizes, anchors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backbone import EfficientDet
from efficientdet.anchors import Anchors, BBoxTransform, encode_boxes
from efficientdet.config import MODEL_CONFIGS, get_model_config
from efficientdet.model import BiFPN
from efficientnet.config import round_filters
from efficientnet.model import EfficientNetBackbone
from efficientnet.utils import MaxPool2dStaticSamePadding, same_padding


@pytest.fixture(scope="module")
def layout(conformance_dir):
    return json.loads((conformance_dir / "checkpoint_layout.json").read_text())


@pytest.mark.parametrize("compound_coef", range(9))
def test_state_dict_matches_published_layout(layout, compound_coef):
    with torch.device("meta"):
        model = EfficientDet(num_classes=90, compound_coef=compound_coef)
    expected = layout[f"d{compound_coef}"]
    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert ours == expected["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == expected["num_parameters"]


@pytest.mark.parametrize("variant, channels", [(0, (40, 112, 320)), (2, (48, 120, 352)), (3, (48, 136, 384)),
                                               (4, (56, 160, 448)), (5, (64, 176, 512)), (6, (72, 200, 576)),
                                               (7, (80, 224, 640))])
def test_backbone_feature_channels(variant, channels):
    with torch.device("meta"):
        backbone = EfficientNetBackbone(variant)
    assert backbone.out_channels == channels


def test_round_filters_rules():
    assert round_filters(32, 1.0) == 32
    assert round_filters(40, 1.1) == 48      # int(44 + 4) // 8 * 8 = 48
    assert round_filters(16, 1.8) == 32      # 28.8 -> 32
    assert round_filters(24, 1.4) == 32      # 33.6 -> 32, not below 90 %


def test_conformance_outputs(d0_model, d0_vectors):
    with torch.no_grad():
        features, regression, classification, anchors = d0_model(torch.from_numpy(d0_vectors["input"]))
    np.testing.assert_allclose(regression.numpy(), d0_vectors["regression"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(classification.numpy(), d0_vectors["classification"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(anchors.numpy(), d0_vectors["anchors"], atol=1e-4, rtol=0)
    assert len(features) == 5
    for level, feature in zip(range(3, 8), features):
        np.testing.assert_allclose(feature.numpy(), d0_vectors[f"bifpn_p{level}"], atol=1e-3, rtol=0)


def test_one_forward_serves_the_loss_with_logits(d0_model, d0_vectors):
    """``logits=True`` (the training forward) returns the classifier's pre-sigmoid output, the rest unchanged;
    the fused inference form refuses it (its sigmoid is fused into the last conv)."""
    images = torch.from_numpy(d0_vectors["input"])
    with torch.no_grad():
        _, regression, logits, anchors = d0_model(images, logits=True)
    np.testing.assert_allclose(logits.sigmoid().numpy(), d0_vectors["classification"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(regression.numpy(), d0_vectors["regression"], atol=1e-4, rtol=0)
    assert logits.min() < 0  # not probabilities
    with pytest.raises(ValueError, match="fused sigmoid"):
        d0_model.fuse()(images, logits=True)


def test_pool_padding_matters(d0_weights, d0_vectors):
    """The official (-inf) pool padding is a different network: the published vectors need zeros."""
    model = EfficientDet(num_classes=90, compound_coef=0, pool_padding="official").eval()
    model.load_state_dict(d0_weights)
    with torch.no_grad():
        features = model(torch.from_numpy(d0_vectors["input"]))[0]
    assert np.abs(features[4].numpy() - d0_vectors["bifpn_p7"]).max() > 1e-3


@pytest.mark.parametrize("size", [(256, 384), (384, 256), (128, 128)])
def test_non_square_multiples_work(size):
    model = EfficientDet(num_classes=3, compound_coef=0).eval()
    with torch.no_grad():
        features, regression, classification, anchors = model(torch.zeros(1, 3, *size))
    h, w = size
    n = sum((h // 2 ** level) * (w // 2 ** level) * 9 for level in range(3, 8))
    assert regression.shape == (1, n, 4)
    assert classification.shape == (1, n, 3)
    assert anchors.shape == (1, n, 4)
    assert [tuple(f.shape[-2:]) for f in features] == [(h // 2 ** lv, w // 2 ** lv) for lv in range(3, 8)]
    assert float(classification.min()) >= 0.0 and float(classification.max()) <= 1.0


@pytest.mark.parametrize("size", [(500, 512), (512, 200), (64, 128)])
def test_bad_input_size_is_a_clear_error(size):
    model = EfficientDet(num_classes=3, compound_coef=0)
    with pytest.raises(ValueError, match=r"multiples of 128"):
        model(torch.zeros(1, 3, *size))


def test_d7x_needs_multiples_of_256():
    with torch.device("meta"):
        model = EfficientDet(num_classes=90, compound_coef=8)
    with pytest.raises(ValueError, match=r"multiples of 256.*P8"):
        model.check_input_size(384, 512)
    model.check_input_size(512, 768)


def test_unknown_compound_coef():
    with pytest.raises(ValueError, match="0..8"):
        get_model_config(9)


def test_config_table_matches_spec():
    assert [c.fpn_channels for c in MODEL_CONFIGS] == [64, 88, 112, 160, 224, 288, 384, 384, 384]
    assert [c.input_size for c in MODEL_CONFIGS] == [512, 640, 768, 896, 1024, 1280, 1280, 1536, 1536]
    assert [c.weighted_fusion for c in MODEL_CONFIGS] == [True] * 6 + [False] * 3


def test_same_padding_is_tensorflow_style():
    # n=7, k=3, s=2: total pad (4 - 1) * 2 + 3 - 7 = 2 -> 1/1; n=8: total 1 -> 0 top/left, 1 bottom/right.
    assert same_padding((7, 8), (3, 3), (2, 2)) == (0, 1, 1, 1)
    assert same_padding((8, 8), (1, 1), (1, 1)) == (0, 0, 0, 0)


def test_max_pool_padding_value():
    x = -torch.ones(1, 1, 4, 4)
    assert float(MaxPool2dStaticSamePadding(3, 2)(x)[0, 0, -1, -1]) == 0.0
    assert float(MaxPool2dStaticSamePadding(3, 2, pad_value=float("-inf"))(x)[0, 0, -1, -1]) == -1.0


def test_plain_sum_bifpn_ignores_fusion_weights():
    torch.manual_seed(0)
    cell = BiFPN(8, weighted=False).eval()
    inputs = [torch.randn(1, 8, 32 // 2 ** i, 32 // 2 ** i) for i in range(5)]
    before = cell(inputs)
    with torch.no_grad():
        cell.p6_w1.mul_(5.0)
    after = cell(inputs)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_weighted_bifpn_uses_fusion_weights():
    torch.manual_seed(0)
    cell = BiFPN(8, weighted=True).eval()
    inputs = [torch.randn(1, 8, 32 // 2 ** i, 32 // 2 ** i) for i in range(5)]
    before = cell(inputs)
    with torch.no_grad():
        cell.p6_w1[1] = 0.0
    after = cell(inputs)
    assert not torch.allclose(before[3], after[3])


def test_anchor_cache_keyed_by_dtype_and_size():
    anchors = Anchors()
    a32 = anchors(torch.zeros(1, 3, 128, 256))
    a64 = anchors(torch.zeros(1, 3, 128, 256, dtype=torch.float64))
    assert a32.dtype == torch.float32 and a64.dtype == torch.float64
    assert anchors(torch.zeros(1, 3, 128, 256)) is a32
    assert anchors(torch.zeros(1, 3, 256, 128)).shape == a32.shape
    assert not torch.equal(anchors(torch.zeros(1, 3, 256, 128)), a32)
    assert len(anchors._cache) == 3


def test_anchor_order_and_geometry():
    anchors = Anchors(anchor_scale=4.0, pyramid_levels=(3,), scales=(1.0, 2.0), ratios=((1.0, 1.0), (2.0, 0.5)))
    boxes = anchors.generate(16, 24)  # P3: 2 x 3 positions, 4 anchors each
    assert boxes.shape == (2 * 3 * 4, 4)
    # First position (4, 4): scale 1 ratio (1, 1) -> 32 x 32; scale 1 ratio (2, .5) -> w 64, h 16.
    assert boxes[0].tolist() == [4 - 16, 4 - 16, 4 + 16, 4 + 16]
    assert boxes[1].tolist() == [4 - 8, 4 - 32, 4 + 8, 4 + 32]
    assert boxes[2].tolist() == [4 - 32, 4 - 32, 4 + 32, 4 + 32]  # scale 2 ratio (1, 1)
    # Second position is one stride to the right (row-major).
    assert boxes[4].tolist() == [4 - 16, 12 - 16, 4 + 16, 12 + 16]


def test_decode_inverts_encode():
    anchors = torch.tensor([[10.0, 20.0, 50.0, 100.0], [0.0, 0.0, 32.0, 32.0]])
    gt = torch.tensor([[12.0, 18.0, 60.0, 90.0], [4.0, 8.0, 20.0, 40.0]])  # (y1, x1, y2, x2)
    deltas = encode_boxes(gt, anchors)
    decoded = BBoxTransform()(anchors[None], deltas[None])[0]  # (x1, y1, x2, y2)
    torch.testing.assert_close(decoded, gt[:, [1, 0, 3, 2]])


def test_decode_and_clip_are_the_published_arithmetic_bit_for_bit():
    """BBoxTransform and ClipBoxes compute each coordinate with the published operations, in that order."""
    from efficientdet.anchors import ClipBoxes

    generator = torch.Generator().manual_seed(0)
    anchors = torch.rand(1, 300, 4, generator=generator) * 600
    anchors[..., 2:] += anchors[..., :2]
    regression = torch.randn(2, 300, 4, generator=generator) * 3
    ya, xa = (anchors[..., 0] + anchors[..., 2]) / 2, (anchors[..., 1] + anchors[..., 3]) / 2
    ha, wa = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    w, h = regression[..., 3].exp() * wa, regression[..., 2].exp() * ha
    yc, xc = regression[..., 0] * ha + ya, regression[..., 1] * wa + xa
    published = torch.stack((xc - w / 2.0, yc - h / 2.0, xc + w / 2.0, yc + h / 2.0), dim=2)
    decoded = BBoxTransform()(anchors, regression)
    assert torch.equal(decoded, published)
    clipped = ClipBoxes()(decoded, torch.empty(1, 3, 384, 320))
    assert torch.equal(clipped, torch.stack((published[..., 0].clamp(min=0), published[..., 1].clamp(min=0),
                                             published[..., 2].clamp(max=319), published[..., 3].clamp(max=383)),
                                            dim=-1))


def test_eval_is_deterministic_and_batch_independent(d0_model, d0_vectors):
    x = torch.from_numpy(d0_vectors["input"])
    with torch.no_grad():
        both = d0_model(x)[2]
        second = d0_model(x[1:])[2]
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=0)
