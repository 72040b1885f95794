"""The official (google/automl) EfficientDet TensorFlow variables mapped onto our state_dict,
beside the checkpoint reader (:mod:`utils.weights.tf_checkpoint`); ``convert_official.py`` is the command line.

The released numbers use the ``NAME/ExponentialMovingAverage`` shadows; each variable is taken from
its shadow where the bundle has one and from the raw variable otherwise (BN moving statistics are not
trainable and may have no shadow). Optimizer slots (``NAME/Momentum``) and ``global_step`` are ignored.
The variable names are derived from the model config (backbone blocks, BiFPN levels and cells, head
repeats), following the official graph:

- BiFPN node ``fnodeJ`` of a cell: top-down nodes for levels ``max−1 … min``, then bottom-up nodes
  for ``min+1 … max``; node J's inputs are offsets into the cell's growing feature list (the
  ``num_levels`` inputs first, node J's output is appended at offset ``num_levels + J``); its
  separable conv + BN is ``op_after_combine{num_levels + J}``, its fusion weights ``WSM``, ``WSM_1``,
  ``WSM_2`` in input order, and in cell 0 a backbone feature (offsets 0, 1, 2 = P3, P4, P5) entering
  as input ``I`` of the node is down-channelled by ``resample_{I}_{offset}_{num_levels + J}``.
- Heads: ``class_net/class-i`` (shared separable convs), ``class_net/class-i-bn-L`` (per level BN),
  ``class_net/class-predict``; ``box_net/box-*`` likewise.

The converted model must be built with ``pool_padding="official"`` and the official anchor ratios
(``projects/coco_official.yml``); its output is a plain state_dict, written atomically.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from backbone import EfficientDet
from efficientdet.anchors import OFFICIAL_RATIOS
from efficientdet.config import MODEL_CONFIGS, ModelConfig, get_model_config
from utils.weights.tf_checkpoint import TFCheckpointReader

logger = logging.getLogger(__name__)

__all__ = ["OFFICIAL_RATIOS", "CheckpointFacts", "FNode", "Mapping", "bifpn_nodes", "build_model", "checkpoint_facts",
           "convert", "official_mappings", "read_facts"]

EMA_SUFFIX = "/ExponentialMovingAverage"
IGNORED_SUFFIXES = ("/Momentum",)
IGNORED_NAMES = ("global_step",)
BN_VARIABLES = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                ("moving_variance", "running_var"))
# Official anchor ratios [1.0, 2.0, 0.5] as (sqrt(r), 1/sqrt(r)) (width, height) stretches.
NUM_BACKBONE_INPUTS = 3  # P3, P4, P5 enter cell 0 from the backbone

Transform = Callable[[List[np.ndarray]], np.ndarray]


def conv_kernel(arrays: List[np.ndarray]) -> np.ndarray:
    """TF conv kernel [kh, kw, in, out] -> PyTorch [out, in, kh, kw]."""
    return arrays[0].transpose(3, 2, 0, 1)


def depthwise_kernel(arrays: List[np.ndarray]) -> np.ndarray:
    """TF depthwise kernel [kh, kw, C, 1] -> PyTorch grouped conv [C, 1, kh, kw]."""
    return arrays[0].transpose(2, 3, 0, 1)


def identity(arrays: List[np.ndarray]) -> np.ndarray:
    return arrays[0]


def stack_scalars(arrays: List[np.ndarray]) -> np.ndarray:
    """Fusion weights ``WSM``, ``WSM_1`` … (scalars) -> one vector, in input order."""
    return np.stack([a.reshape(()) for a in arrays])


@dataclass(frozen=True)
class Mapping:
    """One of our state_dict keys and the checkpoint variables that make it."""

    key: str
    variables: Tuple[str, ...]
    transform: Transform


@dataclass(frozen=True)
class FNode:
    """One official BiFPN node: its level, direction and inputs (offsets into the feature list)."""

    index: int
    level: int
    top_down: bool
    inputs: Tuple[int, ...]


def bifpn_nodes(min_level: int, max_level: int) -> List[FNode]:
    """The official BiFPN node list (automl ``fpn_configs.bifpn_config``): top-down, then bottom-up."""
    num_levels = max_level - min_level + 1
    node_ids: Dict[int, List[int]] = {min_level + i: [i] for i in range(num_levels)}
    nodes: List[FNode] = []
    next_id = num_levels
    for level in range(max_level - 1, min_level - 1, -1):
        nodes.append(FNode(len(nodes), level, True, (node_ids[level][-1], node_ids[level + 1][-1])))
        node_ids[level].append(next_id)
        next_id += 1
    for level in range(min_level + 1, max_level + 1):
        nodes.append(FNode(len(nodes), level, False, tuple(node_ids[level]) + (node_ids[level - 1][-1],)))
        node_ids[level].append(next_id)
        next_id += 1
    return nodes


def _bn(ours: str, theirs: str) -> List[Mapping]:
    return [Mapping(f"{ours}.{pt}", (f"{theirs}/{tf}",), identity) for tf, pt in BN_VARIABLES]


def _separable(ours: str, theirs: str) -> List[Mapping]:
    """Our SeparableConvBlock convs (``ours``) <- TF SeparableConv2D ``theirs``."""
    return [Mapping(f"{ours}.depthwise_conv.conv.weight", (f"{theirs}/depthwise_kernel",), depthwise_kernel),
            Mapping(f"{ours}.pointwise_conv.conv.weight", (f"{theirs}/pointwise_kernel",), conv_kernel),
            Mapping(f"{ours}.pointwise_conv.conv.bias", (f"{theirs}/bias",), identity)]


def _conv(ours: str, theirs: str, bias: bool) -> List[Mapping]:
    maps = [Mapping(f"{ours}.conv.weight", (f"{theirs}/kernel",), conv_kernel)]
    if bias:
        maps.append(Mapping(f"{ours}.conv.bias", (f"{theirs}/bias",), identity))
    return maps


def backbone_mappings(model: EfficientDet) -> List[Mapping]:
    """EfficientNet stem and blocks (``efficientnet-bN/...``)."""
    net = model.backbone_net.model
    scope = f"efficientnet-b{model.config.backbone}"
    ours = "backbone_net.model"
    maps = _conv(f"{ours}._conv_stem", f"{scope}/stem/conv2d", bias=False)
    maps += _bn(f"{ours}._bn0", f"{scope}/stem/tpu_batch_normalization")
    for i, block in enumerate(net._blocks):
        tf = f"{scope}/blocks_{i}"
        pt = f"{ours}._blocks.{i}"
        bn_names = ["tpu_batch_normalization", "tpu_batch_normalization_1", "tpu_batch_normalization_2"]
        if block.has_expansion:
            maps += _conv(f"{pt}._expand_conv", f"{tf}/conv2d", bias=False)
            maps += _bn(f"{pt}._bn0", f"{tf}/{bn_names.pop(0)}")
            project = f"{tf}/conv2d_1"
        else:
            project = f"{tf}/conv2d"
        maps.append(Mapping(f"{pt}._depthwise_conv.conv.weight", (f"{tf}/depthwise_conv2d/depthwise_kernel",),
                            depthwise_kernel))
        maps += _bn(f"{pt}._bn1", f"{tf}/{bn_names.pop(0)}")
        maps += _conv(f"{pt}._se_reduce", f"{tf}/se/conv2d", bias=True)
        maps += _conv(f"{pt}._se_expand", f"{tf}/se/conv2d_1", bias=True)
        maps += _conv(f"{pt}._project_conv", project, bias=False)
        maps += _bn(f"{pt}._bn2", f"{tf}/{bn_names.pop(0)}")
    return maps


def bifpn_mappings(config: ModelConfig) -> List[Mapping]:
    """``resample_p6`` and every ``fpn_cells/cell_K/fnodeJ`` variable."""
    maps = _conv("bifpn.0.p5_to_p6.0", "resample_p6/conv2d", bias=True)
    maps += _bn("bifpn.0.p5_to_p6.1", "resample_p6/bn")
    min_level, max_level = config.min_level, config.max_level
    num_levels = max_level - min_level + 1
    for cell in range(config.fpn_cells):
        for node in bifpn_nodes(min_level, max_level):
            tf = f"fpn_cells/cell_{cell}/fnode{node.index}"
            name = f"conv{node.level}_{'up' if node.top_down else 'down'}"
            feature_id = num_levels + node.index
            if config.weighted_fusion:
                weights = tuple(f"{tf}/WSM" + (f"_{i}" if i else "") for i in range(len(node.inputs)))
                maps.append(Mapping(f"bifpn.{cell}.p{node.level}_w{1 if node.top_down else 2}", weights,
                                    stack_scalars))
            op = f"{tf}/op_after_combine{feature_id}"
            maps += _separable(f"bifpn.{cell}.{name}", f"{op}/conv")
            maps += _bn(f"bifpn.{cell}.{name}.bn", f"{op}/bn")
            if cell != 0:
                continue
            for slot, offset in enumerate(node.inputs):
                if offset >= NUM_BACKBONE_INPUTS:
                    continue
                level = min_level + offset
                if slot != 0 or level != node.level:
                    raise ValueError(f"unexpected BiFPN topology: backbone P{level} enters node {node.index} "
                                     f"(P{node.level}) as input {slot}")
                ours = f"p{level}_down_channel" + ("" if node.top_down else "_2")
                resample = f"{tf}/resample_{slot}_{offset}_{feature_id}"
                maps += _conv(f"bifpn.0.{ours}.0", f"{resample}/conv2d", bias=True)
                maps += _bn(f"bifpn.0.{ours}.1", f"{resample}/bn")
    return maps


def head_mappings(config: ModelConfig) -> List[Mapping]:
    """``class_net`` -> classifier, ``box_net`` -> regressor."""
    maps: List[Mapping] = []
    for ours, scope, prefix in (("classifier", "class_net", "class"), ("regressor", "box_net", "box")):
        for i in range(config.head_repeats):
            maps += _separable(f"{ours}.conv_list.{i}", f"{scope}/{prefix}-{i}")
            for j, level in enumerate(config.pyramid_levels):
                maps += _bn(f"{ours}.bn_list.{j}.{i}", f"{scope}/{prefix}-{i}-bn-{level}")
        maps += _separable(f"{ours}.header", f"{scope}/{prefix}-predict")
    return maps


def official_mappings(model: EfficientDet) -> List[Mapping]:
    """Every state_dict key of ``model`` that comes from the checkpoint, with its source variables."""
    return backbone_mappings(model) + bifpn_mappings(model.config) + head_mappings(model.config)


@dataclass(frozen=True)
class CheckpointFacts:
    """What an official checkpoint says about its model."""

    backbone: Optional[int]
    fpn_channels: Optional[int]
    fpn_cells: int
    num_nodes: int
    head_repeats: int
    class_outputs: Optional[int]

    def matching_models(self) -> List[ModelConfig]:
        facts = (self.backbone, self.fpn_channels, self.fpn_cells, self.num_nodes, self.head_repeats)
        return [cfg for cfg in MODEL_CONFIGS
                if (cfg.backbone, cfg.fpn_channels, cfg.fpn_cells, 2 * (cfg.max_level - cfg.min_level),
                    cfg.head_repeats) == facts]

    def describe(self) -> str:
        names = "/".join(cfg.name for cfg in self.matching_models()) or "no known model"
        backbone = f"efficientnet-b{self.backbone}" if self.backbone is not None else "no EfficientNet backbone"
        return f"{backbone} / BiFPN width {self.fpn_channels} ({names})"


def checkpoint_facts(names: Sequence[str]) -> CheckpointFacts:
    """Backbone, BiFPN width (from ``resample_p6``), cells, nodes and head repeats named in a checkpoint."""
    backbones = {int(m.group(1)) for n in names if (m := re.match(r"efficientnet-b(\d+)/", n))}
    cells = {int(m.group(1)) for n in names if (m := re.match(r"fpn_cells/cell_(\d+)/", n))}
    nodes = {int(m.group(1)) for n in names if (m := re.match(r"fpn_cells/cell_0/fnode(\d+)/", n))}
    repeats = {int(m.group(1)) for n in names if (m := re.match(r"class_net/class-(\d+)/", n))}
    return CheckpointFacts(backbone=min(backbones) if len(backbones) == 1 else None, fpn_channels=None,
                           fpn_cells=len(cells), num_nodes=len(nodes), head_repeats=len(repeats), class_outputs=None)


def read_facts(reader: TFCheckpointReader) -> CheckpointFacts:
    """:func:`checkpoint_facts` plus the widths read off the index (no tensor data is read)."""
    facts = checkpoint_facts(reader.names())
    width = reader.shape("resample_p6/conv2d/kernel")[-1] if "resample_p6/conv2d/kernel" in reader else None
    predict = "class_net/class-predict/pointwise_kernel"
    outputs = reader.shape(predict)[-1] if predict in reader else None
    return CheckpointFacts(facts.backbone, width, facts.fpn_cells, facts.num_nodes, facts.head_repeats, outputs)


def build_model(compound_coef: int, num_classes: int) -> EfficientDet:
    """Our detector as converted official weights need it (official ratios, TF max-pool padding)."""
    return EfficientDet(num_classes=num_classes, compound_coef=compound_coef, ratios=OFFICIAL_RATIOS,
                        pool_padding="official")


def convert(reader: TFCheckpointReader, compound_coef: int, num_classes: int = 90,
            use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """Our state_dict for ``-c compound_coef`` from an official checkpoint.

    Args:
        reader: the open checkpoint.
        compound_coef: model row (0 … 8); must match the checkpoint.
        num_classes: class count; must match the checkpoint's class output layer.
        use_ema: take ``NAME/ExponentialMovingAverage`` where present (the released numbers). False
            takes the raw variables (for comparison only).

    Raises:
        ValueError: the checkpoint is another model or class count, a variable cannot be placed, one of
            our keys stays unfilled, or a shape disagrees (each message names the variable or key).
    """
    config = get_model_config(compound_coef)
    model = _checked_model(reader, config, compound_coef, num_classes)
    own = model.state_dict()
    available, weights = _checkpoint_variables(reader)
    result, used, shadows = _place_variables(reader, model, own, available, weights, use_ema)
    unplaced = sorted(weights - used)
    if unplaced:
        raise ValueError(f"{reader.prefix}: cannot place checkpoint variable {unplaced[0]!r}"
                         + (f" (and {len(unplaced) - 1} more)" if len(unplaced) > 1 else ""))
    _fill_unmapped_keys(reader, config, own, result)
    logger.info("%s: %d tensors from %d checkpoint variables (%d moving-average shadows)",
                reader.prefix, len(result), len(used), shadows)
    return {key: result[key] for key in own}


def _checked_model(reader: TFCheckpointReader, config: ModelConfig, compound_coef: int,
                   num_classes: int) -> EfficientDet:
    """Our model for ``-c compound_coef``, once the checkpoint is checked to be that model and class count."""
    facts = read_facts(reader)
    if config not in facts.matching_models():
        raise ValueError(f"{reader.prefix}: checkpoint is {facts.describe()}, -c {compound_coef} is {config.name}")
    model = build_model(compound_coef, num_classes)
    num_anchors = model.classifier.num_anchors
    if facts.class_outputs is not None and facts.class_outputs != num_anchors * num_classes:
        raise ValueError(f"{reader.prefix}: checkpoint has {facts.class_outputs // num_anchors} classes "
                         f"({facts.class_outputs} class outputs / {num_anchors} anchors), "
                         f"--num_classes is {num_classes}")
    return model


def _checkpoint_variables(reader: TFCheckpointReader) -> Tuple[set, set]:
    """Every variable name of the checkpoint, and those to place (no shadows, optimizer slots or step)."""
    available = set(reader.names())
    weights = {n for n in available if not n.endswith(EMA_SUFFIX) and not n.endswith(IGNORED_SUFFIXES)
               and n not in IGNORED_NAMES}
    orphans = sorted(n for n in available if n.endswith(EMA_SUFFIX) and n[:-len(EMA_SUFFIX)] not in available)
    if orphans:
        raise ValueError(f"{reader.prefix}: cannot place checkpoint variable {orphans[0]!r} (a moving average of "
                         "a variable the checkpoint does not hold)")
    return available, weights


def _place_variables(reader: TFCheckpointReader, model: EfficientDet, own: Dict[str, torch.Tensor],
                     available: set, weights: set,
                     use_ema: bool) -> Tuple[Dict[str, torch.Tensor], set, int]:
    """Our tensors from :func:`official_mappings`, the variables used and the count of moving-average shadows."""
    result: Dict[str, torch.Tensor] = {}
    used: set = set()
    shadows = 0
    for mapping in official_mappings(model):
        if mapping.key not in own:
            raise ValueError(f"internal mapping error: {mapping.key!r} is not a key of {model.config.name}")
        arrays = []
        for name in mapping.variables:
            if name not in weights:
                raise ValueError(f"{reader.prefix}: variable {name!r} (for {mapping.key!r}) is not in the checkpoint")
            source = name + EMA_SUFFIX if use_ema and name + EMA_SUFFIX in available else name
            shadows += source != name
            arrays.append(reader.read(source))
            used.add(name)
        value = np.ascontiguousarray(mapping.transform(arrays))
        expected = tuple(own[mapping.key].shape)
        if value.shape != expected:
            raise ValueError(f"{reader.prefix}: {mapping.variables[0]!r} gives shape {value.shape} for "
                             f"{mapping.key!r}, which is {expected}")
        result[mapping.key] = torch.from_numpy(value).to(own[mapping.key].dtype)
    return result, used, shadows


def _fill_unmapped_keys(reader: TFCheckpointReader, config: ModelConfig, own: Dict[str, torch.Tensor],
                        result: Dict[str, torch.Tensor]) -> None:
    """Fill in ``result`` the keys no variable gives (BN counters, unused fusion weights); raise for any other."""
    for key, tensor in own.items():
        if key in result:
            continue
        if key.endswith("num_batches_tracked"):
            result[key] = torch.zeros_like(tensor)
        elif not config.weighted_fusion and re.fullmatch(r"bifpn\.\d+\.p\d+_w[12]", key):
            result[key] = torch.ones_like(tensor)  # unused by plain-sum models, kept for the layout
        else:
            raise ValueError(f"{reader.prefix}: our key {key!r} is left unfilled by the checkpoint")
