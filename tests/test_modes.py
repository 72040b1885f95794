"""Inference transformations keep the network's function."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from backbone import EfficientDet
from utils.inference.modes import fold_batchnorm


def test_fold_batchnorm_matches_eager(d0_model, d0_vectors):
    folded = fold_batchnorm(d0_model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.from_numpy(d0_vectors["input"])
    with torch.no_grad():
        _, reg, cls, anchors = folded(x)
    np.testing.assert_allclose(reg.numpy(), d0_vectors["regression"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(cls.numpy(), d0_vectors["classification"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(anchors.numpy(), d0_vectors["anchors"], atol=0, rtol=0)
    # The original model is untouched.
    assert any(isinstance(m, nn.BatchNorm2d) for m in d0_model.modules())


# ---------------------------------------------------------------------------------------------------------
# Inference modes
# ---------------------------------------------------------------------------------------------------------
import copy  # noqa: E402

import pytest  # noqa: E402

from utils.inference.modes import FASTEST, InferenceModel, mode_name, parse_mode  # noqa: E402
from utils.inference.postprocess import postprocess  # noqa: E402

FP32_MODES = ["fused", "channels_last", "trace", FASTEST]
OUTPUT_ATOL = 1e-4
BOX_ATOL = 1e-3
# bf16 keeps 8 bits of mantissa: probabilities are compared within this (documented in benchmark/README.md).
BF16_CLASS_ATOL = 2e-2


def gap_threshold(scores: np.ndarray, low: int = 10, high: int = 200) -> float:
    """A threshold in the widest gap between the low-th and high-th largest best-class scores, so that
    float round-off of another mode cannot move a score across it."""
    top = np.sort(scores.ravel())[::-1][:high + 1]
    gaps = top[low:high] - top[low + 1:high + 1]
    i = low + int(np.argmax(gaps))
    return float((top[i] + top[i + 1]) / 2)


@pytest.fixture(scope="module")
def eager_outputs(d0_model, d0_vectors):
    x = torch.from_numpy(d0_vectors["input"])
    with torch.inference_mode():
        regression, classification, anchors = InferenceModel(copy.deepcopy(d0_model), "eager")(x)
    threshold = gap_threshold(classification.max(dim=2).values.numpy())
    dets = postprocess((x.shape[2], x.shape[3]), anchors, regression, classification, threshold, 0.2)
    return x, regression, classification, anchors, threshold, dets


def test_parse_mode_components_and_aliases():
    assert parse_mode("eager") == frozenset()
    assert parse_mode("fastest") == parse_mode(FASTEST) == frozenset({"fused", "channels_last", "trace"})
    assert parse_mode("Trace+fused") == frozenset({"trace", "fused"})
    assert mode_name("trace+fused") == "fused+trace" and mode_name("eager") == "eager"
    assert parse_mode("fastest+bf16") == frozenset({"fused", "channels_last", "trace", "bf16"})
    with pytest.raises(ValueError, match="'turbo'"):
        parse_mode("fused+turbo")
    with pytest.raises(ValueError, match="bf16 and fp16"):
        parse_mode("bf16+fp16")
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        InferenceModel(EfficientDet(num_classes=3, compound_coef=0).eval(), "fp16", device=torch.device("cpu"))


@pytest.mark.parametrize("mode", FP32_MODES)
def test_fp32_modes_match_eager(mode, d0_model, eager_outputs):
    x, regression, classification, anchors, threshold, expected = eager_outputs
    model = copy.deepcopy(d0_model)
    runner = InferenceModel(model, mode)
    with torch.inference_mode():
        reg, cls, anc = runner(x)
    assert reg.dtype == cls.dtype == anc.dtype == torch.float32
    np.testing.assert_allclose(reg.numpy(), regression.numpy(), atol=OUTPUT_ATOL, rtol=0)
    np.testing.assert_allclose(cls.numpy(), classification.numpy(), atol=OUTPUT_ATOL, rtol=0)
    assert torch.equal(anc, anchors)
    dets = postprocess((x.shape[2], x.shape[3]), anc, reg, cls, threshold, 0.2)
    assert sum(len(d) for d in expected) > 0
    for got, want in zip(dets, expected):
        assert len(got) == len(want)
        np.testing.assert_array_equal(got.class_ids, want.class_ids)
        np.testing.assert_allclose(got.boxes, want.boxes, atol=BOX_ATOL, rtol=0)
    if "fused" in runner.components:
        assert not any(isinstance(m, nn.BatchNorm2d) for m in runner.network.modules())
    if "channels_last" in runner.components:
        tensors = list(runner.network.parameters()) + list(runner.network.buffers())
        # 1-channel and 1x1 layouts coincide; oneDNN-packed weights have their own (opaque) layout.
        weights = [t for t in tensors
                   if t.layout == torch.strided and t.dim() == 4 and t.shape[1] > 1 and t.shape[2] > 1]
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)


@pytest.mark.parametrize("mode", ["fused+trace", FASTEST])
def test_trace_graph_per_input_shape(mode, d0_model, d0_vectors):
    runner = InferenceModel(copy.deepcopy(d0_model), mode)
    x = torch.from_numpy(d0_vectors["input"])
    with torch.inference_mode():
        reg2, cls2, _ = runner(x)
        reg1, cls1, _ = runner(x[1:])  # another batch size: a second graph, same numbers
        runner(x)
    assert len(runner._traced) == 2
    for graph in runner._traced.values():
        # Weights are packed for oneDNN before tracing (channels-last), never inside the graph on every run.
        assert "_reorder_convolution_weight" not in str(graph.graph)
    np.testing.assert_allclose(reg1.numpy(), reg2[1:].numpy(), atol=OUTPUT_ATOL, rtol=0)
    np.testing.assert_allclose(cls1.numpy(), cls2[1:].numpy(), atol=OUTPUT_ATOL, rtol=0)
    with pytest.raises(ValueError, match="multiples of 128"):
        runner(torch.zeros(1, 3, 100, 128))


#: bf16 detections against float32 ones. Scores: within BF16_CLASS_ATOL (a score is a bf16 probability).
#: Boxes: within BF16_BOX_RTOL of the box's longer side (+ 1e-3 px): the regression (dy, dx, dh, dw) is
#: computed in bf16 (8-bit mantissa) on values below ~0.13, about 5e-4 off, and scales the anchor's side.
BF16_BOX_RTOL = 2e-3


def separated_scores_model(d0_model: EfficientDet) -> EfficientDet:
    """The conformance model with a class head that scores three (anchor type, class) pairs at every position
    (probabilities 0.73, 0.62, 0.5; everything else 0.0025): the same at every position in float32 and in bf16,
    so both keep the same boxes in NMS (ties in input order) and detections can be compared one to one. The
    regression head and the rest of the network are the conformance weights."""
    model = copy.deepcopy(d0_model)
    with torch.no_grad():
        head = model.classifier.header.pointwise_conv.conv
        head.weight.zero_()
        head.bias.fill_(-6.0)
        for anchor_type, class_id, logit in [(0, 1, 1.0), (4, 17, 0.5), (8, 63, 0.0)]:
            head.bias[anchor_type * model.num_classes + class_id] = logit
    return model


@pytest.mark.slow
def test_bf16_within_documented_tolerance(d0_model, d0_vectors):
    """bf16 on top of the fastest fp32 mode: probabilities within BF16_CLASS_ATOL (class logits spread ×30 so
    that they are not all tied); with well-separated scores, the same detections as float32 (count, classes),
    scores within BF16_CLASS_ATOL and boxes within BF16_BOX_RTOL."""
    model = copy.deepcopy(d0_model)
    with torch.no_grad():
        model.classifier.header.pointwise_conv.conv.weight.mul_(30.0)
    x = torch.from_numpy(d0_vectors["input"])
    with torch.inference_mode():
        _, classification, _ = InferenceModel(copy.deepcopy(model), "eager")(x)
        _, cls, anc = InferenceModel(model, FASTEST + "+bf16")(x)
    assert cls.dtype == torch.bfloat16 and anc.dtype == torch.float32
    assert float((cls.float() - classification).abs().max()) <= BF16_CLASS_ATOL

    separated = separated_scores_model(d0_model)
    with torch.inference_mode():
        expected_outputs = InferenceModel(copy.deepcopy(separated), "eager")(x)
        bf16_outputs = InferenceModel(separated, FASTEST + "+bf16")(x)
    hw = (x.shape[2], x.shape[3])
    for iou_threshold in (0.2, 0.5):
        expected = postprocess(hw, expected_outputs[2], *expected_outputs[:2], 0.3, iou_threshold)
        dets = postprocess(hw, bf16_outputs[2], *bf16_outputs[:2], 0.3, iou_threshold)
        for got, want in zip(dets, expected):
            assert len(got) == len(want) > 100
            np.testing.assert_array_equal(got.class_ids, want.class_ids)
            np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=BF16_CLASS_ATOL)
            longer = np.maximum(want.boxes[:, 2] - want.boxes[:, 0], want.boxes[:, 3] - want.boxes[:, 1])
            assert np.all(np.abs(got.boxes - want.boxes).max(axis=1) <= BF16_BOX_RTOL * longer + 1e-3)
            assert not np.array_equal(got.boxes, want.boxes)  # bf16 did compute the regression


def test_detector_mode_gives_eager_detections(d0_model, eager_outputs):
    from utils.inference.detector import Detector
    from utils.config.project import load_project

    x, _, _, _, threshold, expected = eager_outputs
    project = load_project("coco")
    eager = Detector(copy.deepcopy(d0_model), project, input_size=(256, 384), device="cpu", threshold=threshold)
    fast = Detector(copy.deepcopy(d0_model), project, input_size=(256, 384), device="cpu", threshold=threshold,
                    mode="fastest")
    assert eager.mode == "eager" and fast.mode == FASTEST
    for got, want in zip(fast.predict_batch(x), eager.predict_batch(x)):
        assert len(got) == len(want) and got.class_names == want.class_names
        np.testing.assert_allclose(got.boxes, want.boxes, atol=BOX_ATOL, rtol=0)
    with pytest.raises(ValueError, match="'warp'"):
        Detector(copy.deepcopy(d0_model), project, input_size=(256, 384), device="cpu", mode="warp")


# ---------------------------------------------------------------------------------------------------------
# Inference-only layers of the "fused" mode
# ---------------------------------------------------------------------------------------------------------
import torch.nn.functional as F  # noqa: E402

from efficientnet.utils import Conv2dStaticSamePadding  # noqa: E402
from efficientnet.utils import InferenceConv2d  # noqa: E402
from utils.inference.modes import TRACE_CACHE_SIZE, bf16_supported, specialize_for_inference  # noqa: E402


@pytest.mark.parametrize("fuse_onednn", [True, False])
@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (3, 2), (5, 2), (1, 2)])
def test_inference_conv_equals_same_padding_conv(kernel, stride, fuse_onednn):
    torch.manual_seed(kernel * 10 + stride)
    wrapper = Conv2dStaticSamePadding(6, 6, kernel, stride=stride, groups=3).eval()
    layer = InferenceConv2d(wrapper, "swish", fuse_onednn=fuse_onednn).eval()
    plain = InferenceConv2d(wrapper, None, fuse_onednn=fuse_onednn).eval()
    sigmoid = InferenceConv2d(wrapper, "sigmoid", fuse_onednn=fuse_onednn).eval()
    # Every parity combination of the sides: the shifted-kernel variants must reproduce F.pad's asymmetric zeros.
    for height, width in [(8, 8), (9, 9), (8, 11), (13, 10), (2, 3)]:
        x = torch.randn(2, 6, height, width)
        with torch.no_grad():
            expected = wrapper(x)
            assert plain(x).shape == expected.shape
            np.testing.assert_allclose(plain(x).numpy(), expected.numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(layer(x).numpy(), F.silu(expected).numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(sigmoid(x).numpy(), torch.sigmoid(expected).numpy(), atol=1e-6, rtol=0)
            # Channels-last inputs take the prepacked weights on the oneDNN path.
            got = layer(x.contiguous(memory_format=torch.channels_last))
            np.testing.assert_allclose(got.numpy(), F.silu(expected).numpy(), atol=1e-5, rtol=0)
    weights = sorted(name for name in layer.state_dict() if name.startswith("weight"))
    # Stride 1 (and 1x1 kernels) never need a shifted kernel: one copy of the weights.
    assert weights == (["weight_00", "weight_01", "weight_10", "weight_11"]
                       if stride == 2 and kernel > 1 else ["weight_00"])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch built with oneDNN")
def test_inference_conv_packs_weights_once_per_dtype():
    torch.manual_seed(0)
    wrapper = Conv2dStaticSamePadding(8, 16, 3, stride=2).eval()
    layer = InferenceConv2d(wrapper, "swish").eval()
    x = torch.randn(1, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = F.silu(wrapper(x))
        np.testing.assert_allclose(layer(x).numpy(), expected.numpy(), atol=1e-5, rtol=0)
        packed = [b for b in layer.buffers() if b.layout != torch.strided]
        assert len(packed) == 1 and packed[0].is_mkldnn
        layer(x)
        assert [b for b in layer.buffers() if b.layout != torch.strided][0] is packed[0]  # reused, not repacked
        # oneDNN's layout depends on the input shape: each shape gets its own packing, the oldest are dropped.
        assert layer.max_packed == TRACE_CACHE_SIZE
        for size in range(12, 12 + 2 * TRACE_CACHE_SIZE + 4, 2):
            y = torch.randn(1, 8, size, size).contiguous(memory_format=torch.channels_last)
            np.testing.assert_allclose(layer(y).numpy(), F.silu(wrapper(y)).numpy(), atol=1e-5, rtol=0)
        assert sum(b.layout != torch.strided for b in layer.buffers()) == TRACE_CACHE_SIZE
        assert all(t.layout == torch.strided for t in layer.state_dict().values())  # never saved
        # A dtype change drops the float32 packing; bf16 inputs get their own.
        layer.to(torch.bfloat16)
        assert all(b.layout == torch.strided for b in layer.buffers())
        got = layer(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.bfloat16
    # With native oneDNN bf16 (AVX512-BF16/AMX) the bf16 weight is packed; without it (AVX2 only) the layer
    # falls back to F.conv2d rather than calling a oneDNN kernel that would raise.
    native = bf16_supported(torch.device("cpu"))
    assert layer.fuse_onednn == native
    packed_dtypes = [b.dtype for b in layer.buffers() if b.layout != torch.strided]
    assert packed_dtypes == ([torch.bfloat16] if native else [])
    np.testing.assert_allclose(got.float().numpy(), expected.numpy(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("kernel,groups", [(1, 1), (3, 8)])  # a pointwise pair, a depthwise pair
def test_side_by_side_conv_computes_both(kernel, groups):
    from efficientdet.model import _side_by_side

    torch.manual_seed(kernel)
    first = Conv2dStaticSamePadding(8, 8, kernel, groups=groups).eval()
    second = Conv2dStaticSamePadding(8, 8, kernel, groups=groups, bias=False).eval()
    merged = _side_by_side([first, second])
    assert merged.conv.groups == 2 * groups
    a, b = torch.randn(2, 8, 9, 7), torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        got = merged(torch.cat([a, b], dim=1))
        np.testing.assert_allclose(got[:, :8].numpy(), first(a).numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(got[:, 8:].numpy(), second(b).numpy(), atol=1e-5, rtol=0)


def test_inference_conv_rejects_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="stride"):
        InferenceConv2d(Conv2dStaticSamePadding(4, 4, 3, stride=3))
    with pytest.raises(ValueError, match="kernel"):
        InferenceConv2d(Conv2dStaticSamePadding(4, 4, 2, stride=2))
    with pytest.raises(ValueError, match="'relu'"):
        InferenceConv2d(Conv2dStaticSamePadding(4, 4, 3), "relu")


def test_specialized_model_keeps_its_input_and_repeats_itself(d0_model, d0_vectors):
    """The specialised network works in place on its temporaries only: the input and repeated calls are
    unaffected, and no BatchNorm or padding copy is left in the backbone."""
    network = specialize_for_inference(d0_model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    assert not any(isinstance(m, Conv2dStaticSamePadding) and m._needs_pad
                   for m in network.backbone_net.modules())
    x = torch.from_numpy(d0_vectors["input"]).clone()
    before = x.clone()
    with torch.no_grad():
        first = network(x)
        second = network(x)
    assert torch.equal(x, before)
    for a, b in zip(first[1:3], second[1:3]):
        assert torch.equal(a, b)
    np.testing.assert_allclose(first[2].numpy(), d0_vectors["classification"], atol=OUTPUT_ATOL, rtol=0)
    np.testing.assert_allclose(first[1].numpy(), d0_vectors["regression"], atol=OUTPUT_ATOL, rtol=0)
    for level, got in zip(range(3, 8), first[0]):
        np.testing.assert_allclose(got.numpy(), d0_vectors[f"bifpn_p{level}"], atol=OUTPUT_ATOL, rtol=0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch built with oneDNN")
def test_specialized_model_packs_each_conv_once_per_input_shape(d0_model, d0_vectors):
    network = specialize_for_inference(d0_model).to(memory_format=torch.channels_last)
    x = torch.from_numpy(d0_vectors["input"]).contiguous(memory_format=torch.channels_last)

    def packed():
        return {name: b for name, b in network.named_buffers() if b.layout != torch.strided}

    with torch.no_grad():
        network(x)
        first = packed()
        network(x)
    assert first and packed().keys() == first.keys()  # reused on the second pass, nothing repacked
    header = [name for name in first if name.startswith("heads.header_depthwise.")]
    assert len(header) == 5  # the output depthwise conv is shared by the 5 levels: one packing per level


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_specialized_model_without_onednn_matches(memory_format, d0_model, d0_vectors):
    """The path CUDA takes (no oneDNN: F.conv2d and in-place activations), checked on the CPU."""
    network = specialize_for_inference(d0_model).to(memory_format=memory_format)
    convs = [m for m in network.modules() if isinstance(m, InferenceConv2d)]
    assert convs
    for conv in convs:
        conv.fuse_onednn = False
    x = torch.from_numpy(d0_vectors["input"]).contiguous(memory_format=memory_format)
    with torch.no_grad():
        _, regression, classification, _ = network(x)
    assert not any(b.layout != torch.strided for b in network.buffers())  # nothing packed
    np.testing.assert_allclose(classification.numpy(), d0_vectors["classification"], atol=OUTPUT_ATOL, rtol=0)
    np.testing.assert_allclose(regression.numpy(), d0_vectors["regression"], atol=OUTPUT_ATOL, rtol=0)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_spatial_mean_in_reduced_precision(memory_format):
    from efficientnet.model import _squeeze_for_inference

    x = torch.randn(2, 24, 12, 20).contiguous(memory_format=memory_format)
    assert torch.equal(_squeeze_for_inference(x), x.mean(dim=(2, 3)))
    low = x.to(torch.bfloat16).contiguous(memory_format=memory_format)
    got = _squeeze_for_inference(low)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 24)
    # One bf16 rounding of the float32-accumulated mean: within one bf16 unit of the rounded float32 mean.
    want = low.float().mean(dim=(2, 3))
    np.testing.assert_allclose(got.float().numpy(), want.numpy(), rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("pad_value", [0.0, float("-inf")])  # published, official
@pytest.mark.parametrize("kernel,stride", [(3, 2), (2, 2), (3, 1), (5, 2), (3, 3)])
def test_inference_max_pool_equals_padded_pool(kernel, stride, pad_value):
    from efficientnet.utils import MaxPool2dStaticSamePadding
    from efficientnet.utils import InferenceMaxPool2d

    pool = MaxPool2dStaticSamePadding(kernel, stride, pad_value=pad_value)
    fast = InferenceMaxPool2d(pool)
    torch.manual_seed(kernel + stride)
    for height, width in [(8, 8), (9, 9), (8, 11), (13, 10), (2, 3), (1, 1)]:
        x = -torch.rand(2, 3, height, width) - 0.1  # all negative: the padded zeros win at the borders
        x[0] += 1.0
        for memory_format in (torch.contiguous_format, torch.channels_last):
            inputs = x.contiguous(memory_format=memory_format)
            expected = pool(inputs)
            got = fast(inputs)
            assert got.shape == expected.shape and torch.equal(got, expected), (height, width, memory_format)
    with pytest.raises(ValueError, match="pad_value"):
        InferenceMaxPool2d(MaxPool2dStaticSamePadding(3, 2, pad_value=1.0))
