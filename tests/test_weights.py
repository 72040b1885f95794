"""Weight loading rules: published files, training checkpoints, prefixes, class changes, wrong models."""
from __future__ import annotations

import logging

import pytest
import torch

from backbone import EfficientDet
from utils.weights.loading import describe_state_dict, load_weights


def _meta_state_dict(compound_coef: int, num_classes: int = 90):
    with torch.device("meta"):
        return EfficientDet(num_classes=num_classes, compound_coef=compound_coef).state_dict()


def test_published_layout_loads_strictly(d0_weights, tmp_path):
    path = tmp_path / "efficientdet-d0.pth"
    torch.save(d0_weights, path)
    model = EfficientDet(num_classes=90, compound_coef=0)
    assert load_weights(model, path) == ()
    for key, value in model.state_dict().items():
        assert torch.equal(value, d0_weights[key]), key


def test_module_prefix_and_training_checkpoint(d0_weights, tmp_path):
    wrapped = {"model": {f"module.{k}": v for k, v in d0_weights.items()}, "epoch": 3, "step": 10}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    model = EfficientDet(num_classes=90, compound_coef=0)
    load_weights(model, path)
    assert torch.equal(model.state_dict()["bifpn.0.p6_w1"], d0_weights["bifpn.0.p6_w1"])


def test_class_count_change_skips_only_class_output(d0_weights, caplog):
    torch.manual_seed(0)
    model = EfficientDet(num_classes=2, compound_coef=0)
    initial_header = model.classifier.header.pointwise_conv.conv.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        skipped = load_weights(model, d0_weights)
    assert set(skipped) == {k for k in model.state_dict() if k.startswith("classifier.header.")}
    assert "90 classes, model has 2" in caplog.text
    state = model.state_dict()
    assert torch.equal(state["classifier.header.pointwise_conv.conv.weight"], initial_header)
    for key, value in state.items():
        if not key.startswith("classifier.header."):
            assert torch.equal(value, d0_weights[key]), key


def test_class_count_change_strict_fails(d0_weights):
    model = EfficientDet(num_classes=2, compound_coef=0)
    with pytest.raises(ValueError, match="90 classes, model has 2"):
        load_weights(model, d0_weights, strict_classes=True)


@pytest.mark.parametrize("ckpt_coef, message", [
    (2, r"checkpoint is D2 \(BiFPN width 112\), model is D0 \(64\)"),
    (6, r"checkpoint is D6/D7 \(BiFPN width 384\), model is D0 \(64\)"),
    (8, r"checkpoint is D7x \(BiFPN width 384\), model is D0 \(64\)"),
])
def test_other_model_is_named(ckpt_coef, message):
    model = EfficientDet(num_classes=90, compound_coef=0)
    with pytest.raises(ValueError, match=message):
        load_weights(model, _meta_state_dict(ckpt_coef))


def test_describe_state_dict_identifies_every_model():
    for coef in range(9):
        info = describe_state_dict(_meta_state_dict(coef))
        assert info.matches(coef)
        assert info.class_outputs == 90 * 9


def test_missing_and_corrupt_files(tmp_path):
    model = EfficientDet(num_classes=90, compound_coef=0)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_weights(model, tmp_path / "nothere.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth: not a readable PyTorch checkpoint"):
        load_weights(model, corrupt)


def test_anchor_count_mismatch_is_named(d0_weights):
    model = EfficientDet(num_classes=90, compound_coef=0, ratios=((1.0, 1.0),), scales=(1.0,))
    with pytest.raises(ValueError, match="regressor.header"):
        load_weights(model, d0_weights, strict_classes=False)
