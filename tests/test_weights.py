"""Weight loading rules: published files, training checkpoints, prefixes, class changes, wrong models."""
from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from backbone import EfficientDet
from utils.weights.loading import HeadMismatchError, describe_state_dict, load_weights


SCALES_4 = (2 ** 0, 2 ** 0.25, 2 ** 0.5, 2 ** 0.75)  # x 3 ratios = 12 anchors per position (default: 3 x 3)
HEADERS = ("regressor.header.pointwise_conv.", "classifier.header.pointwise_conv.")
CLASS_BIAS_PRIOR = -math.log((1.0 - 0.01) / 0.01)  # official init: every anchor starts at p(object) = 0.01


def _meta_state_dict(compound_coef: int, num_classes: int = 90, scales=None):
    with torch.device("meta"):
        return _d0(num_classes, scales, compound_coef=compound_coef).state_dict()


def _d0(num_classes: int, scales=None, seed: int = 0, compound_coef: int = 0) -> EfficientDet:
    torch.manual_seed(seed)
    extra = {} if scales is None else {"scales": scales}
    return EfficientDet(num_classes=num_classes, compound_coef=compound_coef, **extra)


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


FINE_TUNING = [  # file scales, file classes, model scales, model classes, re-initialised, the log line's counts
    (None, 90, SCALES_4, 90, HEADERS, "9 anchors x 90 classes, the model 12 anchors x 90 classes"),
    (None, 90, None, 2, HEADERS[1:], "9 anchors x 90 classes, the model 9 anchors x 2 classes"),
    (None, 90, SCALES_4, 2, HEADERS, "9 anchors x 90 classes, the model 12 anchors x 2 classes"),
    # 12 x 3 and 9 x 4 class outputs have the same shape (36 channels): the counts decide, not the shape
    (SCALES_4, 3, None, 4, HEADERS, "12 anchors x 3 classes, the model 9 anchors x 4 classes"),
]


@pytest.mark.parametrize("file_scales, file_classes, model_scales, model_classes, reset, counts", FINE_TUNING)
def test_fine_tuning_across_anchor_and_class_counts(file_scales, file_classes, model_scales, model_classes, reset,
                                                     counts, tmp_path, caplog):
    file_state = _d0(file_classes, file_scales, seed=1).state_dict()
    path = tmp_path / "coco.pth"
    torch.save(file_state, path)
    model = _d0(model_classes, model_scales, seed=2)
    with torch.no_grad():  # a value no init gives: the headers must be re-initialised, not left as they were
        for name, param in model.named_parameters():
            if name.startswith(HEADERS):
                param.fill_(7.0)
    with caplog.at_level(logging.INFO, logger="utils.weights.loading"):
        skipped = load_weights(model, path)
    lines = [r.getMessage() for r in caplog.records if r.name == "utils.weights.loading"]
    heads = ", ".join(prefix.rstrip(".") for prefix in reset)
    assert lines == [f"{path}: re-initialised {heads}: the file has {counts}"]
    state = model.state_dict()
    assert set(skipped) == {k for k in state if k.startswith(reset)}
    for key, value in state.items():  # everything else, the kept header included, is the file's
        if not key.startswith(reset):
            assert torch.equal(value, file_state[key]), key
    for prefix in reset:
        output = model.get_submodule(prefix.rstrip("."))
        weight = output.conv.weight
        bound = 1.0 / math.sqrt(weight[0].numel())  # nn.Conv2d's kaiming_uniform_(a=sqrt(5)): U(-b, b)
        assert weight.abs().max() <= bound and weight.std() > bound / 4, prefix
        file_weight = file_state[f"{prefix}conv.weight"]
        assert file_weight.shape != weight.shape or not torch.equal(file_weight, weight), prefix
        depthwise = prefix.replace("pointwise_conv.", "depthwise_conv.conv.weight")  # same shape: the file's
        assert torch.equal(state[depthwise], file_state[depthwise]), depthwise
        bias = output.conv.bias
        expected = CLASS_BIAS_PRIOR if prefix.startswith("classifier") else 0.0
        assert torch.allclose(bias, torch.full_like(bias, expected)), prefix


@pytest.mark.parametrize("file_scales, file_classes, model_scales, model_classes, message", [
    (None, 90, None, 2, "checkpoint has 90 classes, model has 2"),
    (None, 90, SCALES_4, 90, "checkpoint has 9 anchors, model has 12"),
    (None, 90, SCALES_4, 2, "checkpoint has 9 anchors x 90 classes, model has 12 anchors x 2 classes"),
    (SCALES_4, 3, None, 4, "checkpoint has 12 anchors x 3 classes, model has 9 anchors x 4 classes"),
])
def test_strict_refuses_other_counts_read_off_the_file(file_scales, file_classes, model_scales, model_classes,
                                                       message):
    model = _d0(model_classes, model_scales)
    with pytest.raises(HeadMismatchError, match=f"^state_dict: {re.escape(message)}$"):
        load_weights(model, _meta_state_dict(0, file_classes, file_scales), strict_classes=True)


def test_backbone_mismatch_names_file_key_and_shapes(tmp_path):
    state = _d0(90, seed=1).state_dict()
    key = "backbone_net.model._conv_stem.conv.weight"
    state[key] = torch.zeros(32, 3, 5, 5)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    model = _d0(2, SCALES_4)  # other head counts too: fine-tuning across them does not hide the backbone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_weights(model, path)
    assert str(info.value) == (f"{path}: does not fit this model (1 of another shape, 0 missing, 0 unexpected; "
                               f"first: '{key}' is (32, 3, 5, 5) in the file, (32, 3, 3, 3) in the model)")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_other_model_names_its_first_differing_tensor():
    theirs, model = _meta_state_dict(1), _d0(90)
    own = model.state_dict()
    first = next(k for k in own if k not in theirs or theirs[k].shape != own[k].shape)
    with pytest.raises(ValueError) as info:
        load_weights(model, theirs)
    message = str(info.value)
    assert message.startswith("state_dict: checkpoint is D1 (BiFPN width 88), model is D0 (64): pass the matching -c (")
    assert message.endswith(f"first: {first!r} is {tuple(theirs[first].shape)} in the file, "
                            f"{tuple(own[first].shape)} in the model)")
