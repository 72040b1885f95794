"""Training speed and memory features: memory-efficient swish, activation checkpointing, channels-last steps,
mixed precision on CPU, and the non-finite guard's skip / restore (utils/training/step.py, guard.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import efficientnet.checkpointing as checkpointing
from backbone import EfficientDet
from efficientdet.loss import DetectionLoss
from efficientnet.utils import MemoryEfficientSwish, Swish, SwishImplementation
from utils.training import step as step_module
from utils.training.guard import FiniteGuard
from utils.training.parts import ModelWithLoss, freeze_backbone_and_bifpn
from utils.training.step import EMULATED_BF16, amp_dtype, optimizer_step

SIZE = 128


def _batch(batch: int = 2, size: int = SIZE, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    # Image 0: two boxes and a padding row; image 1: no boxes (only padding).
    annotations = torch.full((batch, 3, 5), -1.0)
    annotations[0, 0] = torch.tensor([10.0, 12.0, 70.0, 90.0, 0.0])
    annotations[0, 1] = torch.tensor([60.0, 40.0, 120.0, 100.0, 1.0])
    return images, annotations


def _model(seed: int = 0) -> EfficientDet:
    torch.manual_seed(seed)
    return EfficientDet(num_classes=2, compound_coef=0).train()


def _saved_bytes(function) -> int:
    """Bytes of the tensors autograd keeps for the backward while ``function()`` runs."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        function()
    return total[0]


@pytest.mark.parametrize("swish", [Swish(), MemoryEfficientSwish(), SwishImplementation.apply])
def test_swish_gradient_is_the_formula_and_only_the_input_is_kept(swish):
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64).requires_grad_()
    reference = x.detach().clone().requires_grad_()
    (reference * torch.sigmoid(reference)).sum().backward()  # autograd of x * sigmoid(x) written out
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = swish(x)
    y.sum().backward()
    torch.testing.assert_close(y, reference * torch.sigmoid(reference), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-12, atol=1e-12)
    assert len(kept) == 1 and kept[0].data_ptr() == x.data_ptr()  # the input, not sigmoid(x) or the output


def _gradients(model, images, seed=5):
    torch.manual_seed(seed)  # drop connect draws its masks from here
    features, regression, logits, _ = model(images, logits=True)
    (regression.square().mean() + logits.sigmoid().mean() + sum(f.mean() for f in features)).backward()
    return ({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            {n: b.clone() for n, b in model.named_buffers()})


def test_grad_checkpointing_gives_the_same_gradients_and_statistics_with_less_memory():
    images, _ = _batch()
    plain = _model()
    checked = copy.deepcopy(plain).set_grad_checkpointing(True)
    grads, buffers = _gradients(plain, images)
    grads_ck, buffers_ck = _gradients(checked, images)
    assert grads.keys() == grads_ck.keys() and len(grads) == len(list(plain.parameters()))
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in buffers:  # BatchNorm statistics moved once, not twice (the recomputation leaves them alone)
        torch.testing.assert_close(buffers_ck[name], buffers[name], rtol=0, atol=0, msg=name)
    # Drop connect is on: another seed gives other gradients, so the recomputation did reuse the first masks.
    other, _ = _gradients(copy.deepcopy(plain), images, seed=6)
    assert not torch.allclose(other["backbone_net.model._conv_stem.conv.weight"],
                              grads["backbone_net.model._conv_stem.conv.weight"])
    kept = _saved_bytes(lambda: plain(images, logits=True))
    kept_ck = _saved_bytes(lambda: checked(images, logits=True))
    assert kept_ck < 0.3 * kept


def test_frozen_parts_are_not_checkpointed(monkeypatch):
    model = _model().set_grad_checkpointing(True)
    freeze_backbone_and_bifpn(model)
    calls = []
    real = checkpointing.checkpointed
    monkeypatch.setattr(checkpointing, "checkpointed", lambda fn, modules, *xs: calls.append(modules) or real(
        fn, modules, *xs))
    for module in ("backbone", "efficientnet.model", "efficientdet.model"):
        monkeypatch.setattr(f"{module}.checkpointed", checkpointing.checkpointed)
    model(_batch()[0], logits=True)[1].sum().backward()
    assert len(calls) == 2 * 5  # each head's five levels; no backbone stage, no BiFPN cell
    with torch.no_grad():
        model.set_grad_checkpointing(True)(_batch()[0])
    assert len(calls) == 10  # nothing to recompute without gradients


def _step_losses_and_grads(channels_last: bool, dtype=torch.float32):
    model = _model().to(dtype)
    model.backbone_net.model.drop_connect_rate = 0.0  # random masks differ between dtypes
    net = ModelWithLoss(model, DetectionLoss("yaep", from_logits=True), channels_last=channels_last)
    images, annotations = _batch()
    cls_loss, reg_loss, _ = net(images.to(dtype), annotations.to(dtype))
    (cls_loss + reg_loss).backward()
    return (float(cls_loss.detach()), float(reg_loss.detach())), {n: p.grad.double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_step_in_either_layout_matches_float64(channels_last):
    """The channels-last step (the CPU default) differs from the plain layout by float32 round-off only: both
    have the losses of the same network in float64 within 1e-5 and its gradients within 2e-3 (each tensor's
    norm; the plain layout's own error is 1.3e-4 here, channels-last's 2.8e-4)."""
    losses64, grads64 = _step_losses_and_grads(False, torch.float64)
    losses, grads = _step_losses_and_grads(channels_last)
    assert losses == pytest.approx(losses64, rel=1e-5)
    largest = max(float(g.norm()) for g in grads64.values())
    for name, reference in grads64.items():
        if float(reference.norm()) > 1e-4 * largest:  # gradients of biases before a BN are zero up to round-off
            error = float((grads[name] - reference).norm() / reference.norm())
            assert error < 2e-3, (name, error)


def _run_steps(dtype, steps=3):
    model = _model()
    net = ModelWithLoss(model, DetectionLoss("yaep", from_logits=True))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    guard = FiniteGuard(model, optimizer)
    images, annotations = _batch()
    losses = []
    for _ in range(steps):
        torch.manual_seed(1)
        verdict, cls_loss, reg_loss, _ = optimizer_step(net, optimizer, guard, images, annotations, dtype=dtype)
        assert verdict == "ok"
        losses.append(float(cls_loss + reg_loss))
    return losses


def test_bf16_autocast_steps_on_cpu_stay_finite_and_near_float32():
    """The first loss (the same weights: bf16 rounding only) within 2 % of float32; the later ones, after AdamW
    steps that follow the sign of noise-sized gradients differently, within the documented 15 % (amp_drift.py)."""
    fp32, bf16 = _run_steps(None), _run_steps(torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert abs(bf16[0] - fp32[0]) <= 0.02 * abs(fp32[0]), (fp32, bf16)
    for a, b in zip(fp32[1:], bf16[1:]):
        assert abs(b - a) <= 0.15 * abs(a), (fp32, bf16)


def test_amp_dtype_says_once_when_bf16_is_emulated(monkeypatch):
    lines = []
    assert amp_dtype(torch.device("cuda"), lines.append) == torch.float16 and not lines
    monkeypatch.setattr(step_module, "bf16_supported", lambda device: False)
    assert amp_dtype(torch.device("cpu"), lines.append) == torch.bfloat16
    assert lines == [EMULATED_BF16]
    monkeypatch.setattr(step_module, "bf16_supported", lambda device: True)
    assert amp_dtype(torch.device("cpu"), lines.append) == torch.bfloat16 and len(lines) == 1


def _state(model, optimizer):
    return (copy.deepcopy(model.state_dict()),
            {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in
             enumerate(optimizer.state.values())})


def _assert_state(model, optimizer, expected):
    weights, optim = _state(model, optimizer)
    for key, value in expected[0].items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)
    assert optim.keys() == expected[1].keys()
    for k, entry in expected[1].items():
        for n, v in entry.items():
            torch.testing.assert_close(torch.as_tensor(optim[k][n]), torch.as_tensor(v), rtol=0, atol=0)


def test_guard_skips_a_nan_step_leaving_weights_statistics_and_optimizer_alone():
    model = _model()
    net = ModelWithLoss(model, DetectionLoss("yaep", from_logits=True))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    guard = FiniteGuard(model, optimizer)
    images, annotations = _batch()
    assert optimizer_step(net, optimizer, guard, images, annotations)[0] == "ok"
    before = _state(model, optimizer)
    assert before[1] and model.backbone_net.model._bn0.num_batches_tracked.item() == 1
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")  # NaN batch statistics in the forward, NaN loss and gradients
    assert optimizer_step(net, optimizer, guard, bad, annotations)[0] == "skipped"
    _assert_state(model, optimizer, before)
    assert optimizer_step(net, optimizer, guard, images, annotations)[0] == "ok"  # and training goes on


def test_guard_restores_its_restore_point_when_finite_gradients_overflow_a_weight():
    model = _model()
    net = ModelWithLoss(model, DetectionLoss("yaep", from_logits=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    guard = FiniteGuard(model, optimizer, snapshot_every=2)
    images, annotations = _batch()
    for _ in range(2):
        assert optimizer_step(net, optimizer, guard, images, annotations)[0] == "ok"
    point = _state(model, optimizer)  # the restore point: after 2 good steps
    assert optimizer_step(net, optimizer, guard, images, annotations)[0] == "ok"
    optimizer.param_groups[0]["lr"] = 1e38  # finite gradients, infinite weights
    assert optimizer_step(net, optimizer, guard, images, annotations)[0] == "restored"
    _assert_state(model, optimizer, point)


def test_guard_refuses_a_zero_snapshot_interval():
    model = _model()
    with pytest.raises(ValueError, match="snapshot_every"):
        FiniteGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), snapshot_every=0)



@pytest.mark.parametrize("kernel, stride, scaled, layout", [
    (3, 1, False, "nchw"), (5, 2, False, "nchw"), (1, 1, True, "nchw"), (3, 1, False, "channels_last"),
    (1, 1, True, "channels_last"), (1, 1, "tiny", "channels_last")])
def test_lean_conv_of_batchnorm_swish_equals_the_plain_modules_keeping_less(kernel, stride, scaled, layout):
    """conv(swish(bn(x)) [* s]) through BatchNormSwish + ConvOfBatchNormSwish: the values, gradients and running
    statistics of nn.BatchNorm2d -> x * sigmoid(x) [-> * s] -> F.pad ("SAME", strided) -> nn.Conv2d written out
    (to float32 round-off: random BatchNorm weights), keeping under half the bytes. On channels-last input the
    project conv keeps y * s (its gradient for s is then sum(grad * y * s) / s), unless a scale is below
    MIN_SCALE ("tiny": one is 0, where that quotient would be 0 / 0): then it recomputes y * s."""
    from efficientnet.lean import batchnorm_swish_saved, conv_of_batchnorm_swish
    from efficientnet.utils import Conv2dStaticSamePadding

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8, momentum=0.01, eps=1e-3).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    conv = Conv2dStaticSamePadding(8, 6 if scaled else 8, kernel, stride=stride, groups=1 if scaled else 8,
                                   bias=False)
    plain_bn, plain_conv = copy.deepcopy(bn), copy.deepcopy(conv.conv)
    x = torch.randn(2, 8, 12, 12)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    s = torch.rand(2, 8, 1, 1) if scaled else None
    if scaled == "tiny":
        s[1, 3] = 0.0
    if scaled:
        s.requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    s2 = s.detach().clone().requires_grad_() if scaled else None

    def lean():
        y, saved = batchnorm_swish_saved(bn, x)
        assert saved is not None
        ys.append(y.detach())
        return conv_of_batchnorm_swish(conv, y, saved, s)

    def plain():
        z = plain_bn(x2)
        y = z * torch.sigmoid(z)
        y = y * s2 if scaled else y
        if stride == 2:  # TensorFlow "SAME" of a 12 x 12 input, kernel 5, stride 2: 1 before, 2 after
            y = F.pad(y, (1, 2, 1, 2))
        return plain_conv(y)

    out, ref, ys = [], [], []
    kept_lean = _saved_bytes(lambda: out.append(lean()))
    with torch.no_grad():
        keeps_scaled = scaled is not False and any(t.shape == x.shape and torch.equal(t, ys[0] * s)
                                                   for t in out[0].grad_fn.saved_tensors)
    assert keeps_scaled == (scaled is True and layout == "channels_last")
    kept_plain = _saved_bytes(lambda: ref.append(plain()))
    assert out[0].shape == ref[0].shape == (2, conv.conv.out_channels, 12 // stride, 12 // stride)
    grad = torch.randn_like(ref[0])
    out[0].backward(grad), ref[0].backward(grad)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=1e-6)
    pairs = [(x.grad, x2.grad), (bn.weight.grad, plain_bn.weight.grad), (bn.bias.grad, plain_bn.bias.grad),
             (conv.conv.weight.grad, plain_conv.weight.grad)] + ([(s.grad, s2.grad)] if scaled else [])
    for a, b in pairs:  # channels-last reads BN's input back from its output: within 1e-5 of the gradients' scale
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 if layout == "nchw" else 1e-5 * float(b.abs().max()))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(plain_bn, name), rtol=0, atol=0)
    assert kept_lean < 0.5 * kept_plain


@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_depthwise_conv_under_cpu_autocast_is_the_float64_conv_to_bf16_precision(kernel, stride, monkeypatch):
    """A depthwise Conv2dStaticSamePadding training under CPU bf16 autocast (DepthwiseForAmp): output, input
    gradient and weight gradient equal float64 autograd of the same conv ("SAME" padding written out) to bf16
    precision; the output, the input gradient and the kept input are bf16, the weight gradient float32; the
    input gradient of a strided conv and the weight gradient of a 5x5 one are computed in float32, the others in
    bf16 (one backward call per precision)."""
    from efficientnet.utils import Conv2dStaticSamePadding

    torch.manual_seed(0)
    conv = Conv2dStaticSamePadding(16, 16, kernel, stride=stride, groups=16, bias=False)
    x = torch.randn(2, 16, 12, 12).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 16, 12 // stride, 12 // stride).bfloat16()
    calls = []
    backward = torch.ops.aten.convolution_backward

    def spy(*args):
        calls.append((args[0].dtype, tuple(args[-1][:2])))
        return backward(*args)

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = conv(x)
    out.backward(grad)
    monkeypatch.undo()  # torch looks the op up by attribute elsewhere (torch.testing)
    assert out.dtype == x.grad.dtype == torch.bfloat16 and conv.conv.weight.grad.dtype == torch.float32
    assert {t.dtype for t in kept if t.dim() == 4 and t.shape[0] == 2} == {torch.bfloat16}
    low_input, low_weight = stride == 1, kernel == 3
    expected = {(torch.bfloat16, (low_input, low_weight)), (torch.float32, (not low_input, not low_weight))}
    assert set(calls) == {c for c in expected if any(c[1])} and len(calls) == len(set(calls))

    x64 = x.detach().double().requires_grad_()
    w64 = conv.conv.weight.detach().double().requires_grad_()
    total = (kernel - 1) if stride == 1 else max((12 // stride - 1) * stride + kernel - 12, 0)
    before = total // 2
    ref = F.conv2d(F.pad(x64, (before, total - before, before, total - before)), w64, None, stride, 0, 1, 16)
    ref.backward(grad.double())
    for a, b in ((out, ref), (x.grad, x64.grad), (conv.conv.weight.grad, w64.grad)):
        scale = float(b.detach().abs().max())
        torch.testing.assert_close(a.double(), b.detach(), rtol=0, atol=2e-2 * scale)


def test_mbconv_block_training_step_is_the_plain_modules_bit_for_bit():
    """An expanded, strided MBConv block (the lean forms inside: BatchNormSwishConv, BatchNormSwish,
    ConvOfBatchNormSwish) against the same block's modules called plainly (BN, F.silu, squeeze-excitation, F.pad,
    convs written out): the same output, gradients and running statistics bit for bit in the plain layout on the
    CPU at the blocks' initial BatchNorm weights (w = 1, b = 0), where the recomputed BN output has the forward's
    bits."""
    from efficientnet.model import MBConvBlock

    torch.manual_seed(0)
    block = MBConvBlock(16, 24, kernel=5, stride=2, expand_ratio=6, se_ratio=0.25).train()
    plain = copy.deepcopy(block)
    x = torch.randn(2, 16, 16, 16)

    def written_out(b, inputs):
        swish = F.silu  # the published Swish module's kernel
        h = swish(b._bn0(b._expand_conv.conv(inputs)))
        h = swish(b._bn1(b._depthwise_conv.conv(F.pad(h, (1, 2, 1, 2)))))  # "SAME": 16 px, kernel 5, stride 2
        squeezed = b._se_expand.conv(swish(b._se_reduce.conv(h.mean(dim=(2, 3), keepdim=True))))
        return b._bn2(b._project_conv.conv(torch.sigmoid(squeezed) * h))

    out, ref = block(x), written_out(plain, x)
    grad = torch.randn_like(ref)
    out.backward(grad), ref.backward(grad)
    assert torch.equal(out, ref)
    for (name, p), q in zip(block.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(block.named_buffers(), plain.buffers()):  # running statistics, batches tracked
        assert torch.equal(b, c), name


@pytest.mark.parametrize("weights", ["trained", "zero", "large_ratio"])
def test_batchnorm_swish_under_cpu_autocast_keeps_only_the_bn_output(weights):
    """swish(bn(x)) for a bf16 x under CPU autocast (BatchNormSwish keeping BN's output): output, input gradient and both
    BatchNorm gradients equal float64 autograd of the formulas written out (batch statistics, biased variance,
    x_hat * w + b, z * sigmoid(z)) to bf16 precision, running statistics as nn.BatchNorm2d updates them, and only
    BN's output is kept; with a zero weight, or a channel with |b| > KEEP_OUTPUT_RATIO * |w|, the plain modules
    run (BN's input kept as well), with the same values."""
    from efficientnet.lean import KEEP_OUTPUT_RATIO, batchnorm_swish

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8, momentum=0.1, eps=1e-3).train()
    with torch.no_grad():
        bn.weight.uniform_(0.3, 2.0).mul_(torch.tensor([1.0, -1.0] * 4)), bn.bias.uniform_(-3.0, 3.0)
        if weights == "zero":
            bn.weight[3] = 0.0
        elif weights == "large_ratio":
            bn.bias[5] = 1.5 * KEEP_OUTPUT_RATIO * bn.weight[5].abs()
    reference = copy.deepcopy(bn)
    x = (torch.randn(4, 8, 10, 10) * 2 + 0.5).bfloat16().contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    kept = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = batchnorm_swish(bn, x)
    grad = torch.randn(out.shape).bfloat16()
    out.backward(grad)

    x64 = x.detach().double().requires_grad_()
    w64, b64 = (reference.weight.detach().double().requires_grad_(), reference.bias.detach().double().requires_grad_())
    mean, var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)
    z = (x64 - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-3) * w64[:, None, None] + b64[:, None, None]
    ref = z * torch.sigmoid(z)
    ref.backward(grad.double())
    assert out.dtype == x.grad.dtype == torch.bfloat16
    for a, b in ((out, ref), (x.grad, x64.grad), (bn.weight.grad, w64.grad), (bn.bias.grad, b64.grad)):
        scale = float(b.detach().abs().max())
        torch.testing.assert_close(a.double(), b.detach(), rtol=0, atol=2e-2 * scale)
    n = x.numel() // 8
    torch.testing.assert_close(bn.running_mean, 0.1 * mean.detach().float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var.detach().float() * n / (n - 1), rtol=1e-3, atol=1e-3)
    assert int(bn.num_batches_tracked) == 1
    full_size = [t for t in kept if t.shape == x.shape]
    assert len(full_size) == (1 if weights == "trained" else 2)
    assert not any(t.data_ptr() == x.data_ptr() for t in full_size) == (weights == "trained")


@pytest.mark.parametrize("kernel, pad", [(3, (0, 1, 0, 1)), (5, (1, 2, 1, 2))])
def test_strided_lean_depthwise_conv_on_channels_last_equals_the_plain_modules(kernel, pad):
    """swish(bn(x)) -> "SAME"-padded strided depthwise conv on channels-last input (BatchNormSwishConv: swish written
    into the padded tensor, the input gradient a view of the padded one): the padded swish equals F.pad(F.silu(z))
    (zero border; inside to the last bit: swish's vectorised and scalar kernels share the rows differently); output
    and gradients equal nn.BatchNorm2d -> F.silu -> F.pad -> nn.Conv2d to float32 round-off."""
    from efficientnet.lean import _silu_padded, batchnorm_swish_conv
    from efficientnet.utils import Conv2dStaticSamePadding

    torch.manual_seed(0)
    z = torch.randn(2, 24, 14, 14).contiguous(memory_format=torch.channels_last)
    padded = _silu_padded(z, pad)
    assert padded.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(padded, F.pad(F.silu(z), pad), rtol=2e-7, atol=0)
    bn = torch.nn.BatchNorm2d(24, momentum=0.01, eps=1e-3).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
    conv = Conv2dStaticSamePadding(24, 24, kernel, stride=2, groups=24, bias=False)
    plain_bn, plain_conv = copy.deepcopy(bn), copy.deepcopy(conv.conv)
    x = torch.randn(2, 24, 14, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    out = batchnorm_swish_conv(bn, x, conv)
    ref = plain_conv(F.pad(F.silu(plain_bn(x2)), pad))
    grad = torch.randn_like(ref)
    out.backward(grad), ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in ((x.grad, x2.grad), (bn.weight.grad, plain_bn.weight.grad), (bn.bias.grad, plain_bn.bias.grad),
                 (conv.conv.weight.grad, plain_conv.weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, height, width", [(2, 10, 12), (1, 7, 5)])
def test_project_conv_under_cpu_autocast_is_the_float64_conv_keeping_no_scaled_input(batch, height, width):
    """The 1x1 project conv of squeeze-excitation's scaled output under CPU bf16 autocast
    (ScaledPointwiseForAmp: one matrix product per image with weight * s[b]): output and the gradients of y, s and
    the weight equal float64 autograd of conv2d(y * s, weight) to bf16 precision; output channels-last bf16, weight
    gradient float32; the backward keeps y, s and the weight but no y * s (the plain modules keep both)."""
    from efficientnet.lean import conv_of_batchnorm_swish
    from efficientnet.utils import Conv2dStaticSamePadding

    torch.manual_seed(0)
    conv = Conv2dStaticSamePadding(48, 16, 1, bias=False)
    y = torch.randn(batch, 48, height, width).bfloat16().contiguous(memory_format=torch.channels_last)
    s = torch.rand(batch, 48, 1, 1).bfloat16()
    grad = torch.randn(batch, 16, height, width).bfloat16()

    def run(lean: bool):
        conv.conv.weight.grad = None
        yy, ss = y.clone().requires_grad_(), s.clone().requires_grad_()
        kept = []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
                out = conv_of_batchnorm_swish(conv, yy, None, ss) if lean else conv(yy * ss)
        out.backward(grad)
        full = [t for t in kept if t.shape == y.shape]
        return out, yy.grad, ss.grad, conv.conv.weight.grad.clone(), full

    out, grad_y, grad_s, grad_w, full = run(lean=True)
    assert type(out.grad_fn).__name__ == "ScaledPointwiseForAmpBackward"
    assert out.dtype == grad_y.dtype == grad_s.dtype == torch.bfloat16 and grad_w.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert len(full) == 1 and torch.equal(full[0], y)
    assert len(run(lean=False)[4]) == 2  # the plain modules keep y and y * s

    y64, s64 = y.double().requires_grad_(), s.double().requires_grad_()
    w64 = conv.conv.weight.detach().double().requires_grad_()
    ref = F.conv2d(y64 * s64, w64)
    ref.backward(grad.double())
    for a, b in ((out, ref), (grad_y, y64.grad), (grad_s, s64.grad), (grad_w, w64.grad)):
        scale = float(b.detach().abs().max())
        torch.testing.assert_close(a.double(), b.detach(), rtol=0, atol=1e-2 * scale)


def test_spatial_mean_passes_its_gradient_on_as_a_broadcast_view():
    """Squeeze-excitation's mean: the values of ``x.mean``, and a gradient of ``grad / (H * W)`` for every element
    that is a stride-0 view (nothing written out), summed with another gradient of ``x`` to autograd's bits."""
    from efficientnet.lean import spatial_mean

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    out = spatial_mean(x)
    assert torch.allclose(out, x.detach().sum(dim=(2, 3), keepdim=True) / 35, rtol=1e-15, atol=0)
    grad = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, x, grad)
    assert g.stride()[2:] == (0, 0)
    assert torch.allclose(g, grad.expand(2, 3, 5, 7) / 35, rtol=1e-15, atol=0)
    with torch.no_grad():
        assert spatial_mean(x).grad_fn is None

    weight = torch.randn(4, 3, 1, 1)

    def loss(mean):  # x used twice, as in an MBConv block: by the project conv and by the squeeze
        y = x.float() * 1.5
        return (F.conv2d(y * torch.sigmoid(mean(y)), weight) ** 2).sum()
    (lean_grad,) = torch.autograd.grad(loss(spatial_mean), x)
    (plain_grad,) = torch.autograd.grad(loss(lambda y: y.mean(dim=(2, 3), keepdim=True)), x)
    assert torch.equal(lean_grad, plain_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_drop_connect_is_the_published_formula_bit_for_bit(dtype):
    """``x / keep * floor(keep + rand)`` written out (the published drop connect, same random draw): the same
    output and input gradient bit for bit, signed zeros, infinities and NaNs included."""
    from efficientnet.utils import drop_connect

    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, 5).to(dtype)
    x[:, 0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0], dtype=dtype)
    grad = torch.randn(16, 3, 4, 5).to(dtype)
    rate = 0.2  # the backbone's; 1 / keep is not exact
    keep = 1.0 - rate

    def published(inputs):
        mask = torch.floor(keep + torch.rand((inputs.shape[0], 1, 1, 1), dtype=inputs.dtype))
        return inputs / keep * mask, mask

    results = []
    for function in (lambda t: drop_connect(t, rate, True), lambda t: published(t)[0]):
        leaf = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        out = function(leaf)
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    torch.manual_seed(1)
    mask = published(x)[1].flatten()
    assert 0 < int(mask.sum()) < 16  # kept and dropped samples both
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(torch.signbit(ours), torch.signbit(reference))
    assert drop_connect(x, rate, False) is x
