"""utils/weights/tf_convert.py and convert_official.py: official TF checkpoint -> our state_dict, checked against the official network's outputs."""
from __future__ import annotations

import shutil
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

import convert_official
from utils.weights.tf_convert import (OFFICIAL_RATIOS, bifpn_nodes, build_model, checkpoint_facts, convert,
                              official_mappings)
from efficientdet.config import get_model_config
from utils.config.project import load_project
from utils.weights.loading import load_weights

EMA = "/ExponentialMovingAverage"


class DictReader:
    """A stand-in for TFCheckpointReader over a dict of arrays (to add or remove variables)."""

    def __init__(self, tensors: Dict[str, np.ndarray], prefix: str = "fake/model") -> None:
        self.tensors = tensors
        self.prefix = prefix

    def names(self) -> List[str]:
        return sorted(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        return self.tensors[name]


@pytest.fixture(scope="module")
def tensors(reader) -> Dict[str, np.ndarray]:
    return reader.read_all()


@pytest.fixture(scope="module")
def official_vectors(conformance_dir) -> Dict[str, np.ndarray]:
    data = np.load(conformance_dir / "official_d0_vectors.npz")
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def converted(reader) -> Dict[str, torch.Tensor]:
    return convert(reader, 0, 90)


def _expected(vectors: Dict[str, np.ndarray], num_classes: int = 90) -> Tuple[np.ndarray, np.ndarray]:
    """Official per-level outputs flattened in our anchor order: sigmoid probabilities and (ty, tx, th, tw)."""
    batch = vectors["input_nhwc"].shape[0]
    logits = np.concatenate([vectors[f"class_logits_p{lv}"].reshape(batch, -1, num_classes) for lv in range(3, 8)], 1)
    boxes = np.concatenate([vectors[f"box_p{lv}"].reshape(batch, -1, 4) for lv in range(3, 8)], 1)
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), boxes


def _run(state_dict: Dict[str, torch.Tensor], images: np.ndarray, pool_padding: str = "official"):
    from backbone import EfficientDet

    model = EfficientDet(90, 0, ratios=OFFICIAL_RATIOS, pool_padding=pool_padding).eval()
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        _, regression, classification, _ = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    return regression.numpy(), classification.numpy()


@pytest.fixture(scope="module")
def outputs(converted, official_vectors):
    return _run(converted, official_vectors["input_nhwc"])


# ---------------------------------------------------------------------------------------- naming

def test_bifpn_node_order_and_inputs_d0():
    nodes = bifpn_nodes(3, 7)
    assert [(n.level, n.top_down) for n in nodes] == [
        (6, True), (5, True), (4, True), (3, True), (4, False), (5, False), (6, False), (7, False)]
    assert [n.inputs for n in nodes] == [(3, 4), (2, 5), (1, 6), (0, 7), (1, 7, 8), (2, 6, 9), (3, 5, 10), (4, 11)]


def test_bifpn_node_order_d7x():
    nodes = bifpn_nodes(3, 8)
    assert len(nodes) == 10
    assert nodes[0].level == 7 and nodes[0].inputs == (4, 5)
    assert nodes[-1].level == 8 and nodes[-1].inputs == (5, 14)


def test_cell0_resample_names(converted, tensors):
    """In cell 0 the backbone features are down-channelled by resample_0_{offset}_{node id}."""
    cases = {"p5_down_channel": "fnode1/resample_0_2_6", "p4_down_channel": "fnode2/resample_0_1_7",
             "p3_down_channel": "fnode3/resample_0_0_8", "p4_down_channel_2": "fnode4/resample_0_1_9",
             "p5_down_channel_2": "fnode5/resample_0_2_10"}
    for ours, theirs in cases.items():
        kernel = tensors[f"fpn_cells/cell_0/{theirs}/conv2d/kernel{EMA}"]
        np.testing.assert_array_equal(converted[f"bifpn.0.{ours}.0.conv.weight"].numpy(),
                                      kernel.transpose(3, 2, 0, 1))


@pytest.mark.parametrize("compound_coef", [0, 6, 8])
def test_mappings_fill_every_key(compound_coef):
    """Every parameter and BN buffer of the model has a source (fusion weights only where weighted)."""
    model = build_model(compound_coef, 90)
    mapped = {m.key for m in official_mappings(model)}
    assert len(mapped) == len(official_mappings(model))
    own = set(model.state_dict())
    assert mapped <= own
    left = {k for k in own - mapped if not k.endswith("num_batches_tracked")}
    if model.config.weighted_fusion:
        assert left == set()
    else:
        assert left and all("_w1" in k or "_w2" in k for k in left)


def test_ema_shadows_are_used_where_present(converted, tensors):
    stem = "efficientnet-b0/stem"
    np.testing.assert_array_equal(converted["backbone_net.model._bn0.weight"].numpy(),
                                  tensors[f"{stem}/tpu_batch_normalization/gamma{EMA}"])
    # Moving statistics are not trainable: no shadow in this bundle, so the raw variable.
    assert f"{stem}/tpu_batch_normalization/moving_mean{EMA}" not in tensors
    np.testing.assert_array_equal(converted["backbone_net.model._bn0.running_mean"].numpy(),
                                  tensors[f"{stem}/tpu_batch_normalization/moving_mean"])
    np.testing.assert_array_equal(
        converted["bifpn.1.p4_w2"].numpy(),
        np.stack([tensors[f"fpn_cells/cell_1/fnode4/WSM{s}{EMA}"] for s in ("", "_1", "_2")]))
    np.testing.assert_array_equal(converted["backbone_net.model._blocks.0._depthwise_conv.conv.weight"].numpy(),
                                  tensors[f"efficientnet-b0/blocks_0/depthwise_conv2d/depthwise_kernel{EMA}"]
                                  .transpose(2, 3, 0, 1))
    assert int(converted["classifier.bn_list.4.2.num_batches_tracked"]) == 0


def test_converted_state_dict_loads_through_load_weights(converted):
    model = build_model(0, 90)
    assert load_weights(model, converted) == ()


# ------------------------------------------------------------------------------- numerical check

def test_converted_d0_reproduces_the_official_network(outputs, official_vectors):
    regression, classification = outputs
    probs, boxes = _expected(official_vectors)
    assert classification.shape == probs.shape and regression.shape == boxes.shape
    assert np.abs(classification - probs).max() < 1e-4
    assert np.abs(regression - boxes).max() < 1e-4


def test_raw_variables_do_not_reproduce_it(reader, official_vectors):
    raw = convert(reader, 0, 90, use_ema=False)
    regression, classification = _run(raw, official_vectors["input_nhwc"][:1])
    probs, boxes = _expected(official_vectors)
    error = max(np.abs(classification - probs[:1]).max(), np.abs(regression - boxes[:1]).max())
    assert error > 1e-3


def test_official_project_matches_the_converter():
    project = load_project("projects/coco_official.yml")
    np.testing.assert_allclose(project.anchors_ratios, OFFICIAL_RATIOS, rtol=0, atol=1e-12)
    assert project.pool_padding == "official"
    assert project.num_classes == 90 and project.obj_list[0] == "person" and project.obj_list[11] == ""
    assert [i + 1 for i, n in enumerate(project.obj_list) if not n] == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]


# ---------------------------------------------------------------------------------------- errors

def test_model_mismatch_names_both(reader):
    with pytest.raises(ValueError, match=r"checkpoint is efficientnet-b0 / BiFPN width 64 \(D0\), -c 1 is D1"):
        convert(reader, 1, 90)


def test_class_count_mismatch(reader):
    with pytest.raises(ValueError, match="checkpoint has 90 classes.*--num_classes is 80"):
        convert(reader, 0, 80)


def test_unplaceable_and_missing_variables_are_named(tensors):
    extra = dict(tensors)
    extra["fpn_cells/cell_0/fnode3/op_after_combine9/conv/bias"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError,
                       match="cannot place checkpoint variable 'fpn_cells/cell_0/fnode3/op_after_combine9/conv/bias'"):
        convert(DictReader(extra), 0, 90)
    missing = {k: v for k, v in tensors.items() if not k.startswith("class_net/class-1-bn-6/beta")}
    with pytest.raises(ValueError, match="'class_net/class-1-bn-6/beta'.*classifier.bn_list.3.1.bias"):
        convert(DictReader(missing), 0, 90)
    orphan = dict(tensors)
    orphan[f"somewhere/else{EMA}"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match=f"somewhere/else{EMA}"):
        convert(DictReader(orphan), 0, 90)


def test_checkpoint_facts_describe_other_models():
    names = ["efficientnet-b2/stem/conv2d/kernel"] + [f"fpn_cells/cell_{k}/fnode{j}/WSM" for k in range(5)
                                                        for j in range(8)] + \
            [f"class_net/class-{i}/bias" for i in range(3)]
    facts = checkpoint_facts(names)
    assert (facts.backbone, facts.fpn_cells, facts.num_nodes, facts.head_repeats) == (2, 5, 8, 3)


# ---------------------------------------------------------------------------------------- script

def _main(argv: List[str]) -> int:
    return convert_official.main(convert_official.parse_args(argv))


def test_script_writes_a_loadable_state_dict(bundle_dir, tmp_path, converted):
    target = tmp_path / "weights" / "efficientdet-d0-official.pth"
    assert _main(["-c", "0", "--ckpt", str(bundle_dir), "-o", str(target)]) == 0
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp file left
    state_dict = torch.load(target, map_location="cpu", weights_only=True)
    assert list(state_dict) == list(build_model(0, 90).state_dict())
    for key, value in converted.items():
        assert torch.equal(state_dict[key], value), key
    assert load_weights(build_model(0, 90), target) == ()


def _assert_one_line_error(capsys, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_script_wrong_compound_coef(bundle_dir, tmp_path, capsys):
    target = tmp_path / "out.pth"
    assert _main(["-c", "1", "--ckpt", str(bundle_dir), "-o", str(target)]) != 0
    _assert_one_line_error(capsys, "efficientnet-b0", "D0", "-c 1 is D1")
    assert not target.exists()


def test_script_missing_checkpoint(tmp_path, capsys):
    assert _main(["-c", "0", "--ckpt", str(tmp_path / "absent"), "-o", str(tmp_path / "out.pth")]) != 0
    _assert_one_line_error(capsys, "absent")


def test_script_truncated_index(bundle_dir, tmp_path, capsys):
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for item in bundle_dir.iterdir():
        shutil.copyfile(item, copy / item.name)
    index = copy / "model.index"
    index.write_bytes(index.read_bytes()[:1000])
    assert _main(["-c", "0", "--ckpt", str(copy), "-o", str(tmp_path / "out.pth")]) != 0
    _assert_one_line_error(capsys, "model.index", "truncated")


def test_script_bad_compound_coef(bundle_dir, tmp_path, capsys):
    assert _main(["-c", "9", "--ckpt", str(bundle_dir), "-o", str(tmp_path / "out.pth")]) != 0
    _assert_one_line_error(capsys, "compound coefficient")


def test_config_rows_cover_checkpoint_names():
    assert get_model_config(8).max_level == 8 and len(bifpn_nodes(3, 8)) == 2 * (8 - 3)
