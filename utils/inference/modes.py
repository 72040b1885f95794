"""Inference-only transformations of a detector: BatchNorm folding, channels-last, frozen graphs,
reduced precision, combined into the inference *modes* of :class:`InferenceModel`.

Every transformation keeps the network's function (up to float round-off; bf16/fp16 up to their
precision) and returns the same outputs as :class:`backbone.EfficientDet`. They are for
inference only: folded models cannot be trained or saved as published checkpoints.

A mode is a ``+``-joined set of components (order does not matter)::

    eager           plain float32 model (the reference; no component)
    fused           the network in its inference form (:meth:`backbone.EfficientDet.fuse`: each
                    module's ``fuse()`` beside its training form): every BatchNorm folded into the conv
                    before it (:meth:`~backbone.EfficientDet.fold_batchnorm`), stride-2 convs and
                    max-pools without padding copies, swish and the class sigmoid fused into the convs
                    (oneDNN on CPU, weights prepacked per input shape) or in place, squeeze-excitation as
                    Linear layers, both heads run side by side
    channels_last   weights and activations in NHWC memory format (oneDNN's preferred layout on CPU)
    trace           torch.jit.trace + torch.jit.freeze per input shape (B, H, W); the frozen graph
                    returns (regression, classification), anchors come from the model's cached Anchors
    bf16            weights and activations in bfloat16 (CPU with AVX512-BF16/AMX, or CUDA)
    fp16            weights and activations in float16 (CUDA only)

e.g. ``fused+channels_last+trace``. Aliases: ``eager`` (no component) and ``fastest``
(:data:`FASTEST`: the fastest float32 combination measured, same detections as ``eager``; see
``benchmark/README.md``). ``torch.compile`` is not offered: on the 2-core reference CPU it took 19–76 s
to compile D0 (inductor, freezing) and then ran slower than the frozen trace of the fused network (34.5
against 27.5 ms).
"""
from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from typing import Dict, FrozenSet, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from backbone import EfficientDet, FusedEfficientDet, check_images
from efficientnet.utils import TRACE_CACHE_SIZE, bf16_supported

logger = logging.getLogger(__name__)

# Components in canonical order (mode names are written in this order).
MODE_COMPONENTS: Tuple[str, ...] = ("fused", "channels_last", "trace", "bf16", "fp16")
# The fastest float32 mode (identical detections to eager): D0 512x512 batch 1 on 2 CPU threads,
# see benchmark/README.md.
FASTEST = "fused+channels_last+trace"
MODE_ALIASES: Dict[str, str] = {"eager": "", "fastest": FASTEST}
# The modes worth listing (CLI help, benchmark default); any combination of components is valid.
MODES: Tuple[str, ...] = ("eager", "fused", "channels_last", "trace", "fused+channels_last",
                          "fused+trace", "fused+channels_last+trace", "fused+channels_last+trace+bf16",
                          "fused+channels_last+trace+fp16", "fastest")
# TRACE_CACHE_SIZE (efficientnet.utils): input shapes whose frozen graphs an InferenceModel keeps (oldest
# dropped first); also the input shapes whose oneDNN-packed weights an InferenceConv2d keeps by default.

__all__ = ["FASTEST", "MODES", "MODE_COMPONENTS", "TRACE_CACHE_SIZE", "InferenceModel", "bf16_supported",
           "fold_batchnorm", "mode_name", "parse_mode", "specialize_for_inference"]


def fold_batchnorm(model: EfficientDet) -> EfficientDet:
    """A copy of ``model`` with every BatchNorm folded: :meth:`backbone.EfficientDet.fold_batchnorm`."""
    return model.fold_batchnorm()


def specialize_for_inference(model: EfficientDet) -> FusedEfficientDet:
    """The ``fused`` mode's network: :meth:`backbone.EfficientDet.fuse`."""
    return model.fuse()


def parse_mode(mode: str) -> FrozenSet[str]:
    """The components of a mode string such as ``"fused+channels_last+trace"``, ``"eager"`` or ``"fastest"``.

    Raises ValueError naming the mode for an unknown component, or for ``bf16`` with ``fp16``.
    """
    if not isinstance(mode, str) or not mode.strip():
        raise ValueError(f"mode must be a non-empty string such as 'eager' or 'fused+trace', got {mode!r}")
    components = set()
    for part in mode.strip().lower().split("+"):
        part = part.strip()
        if part in MODE_ALIASES:
            components.update(p for p in MODE_ALIASES[part].split("+") if p)
        elif part in MODE_COMPONENTS:
            components.add(part)
        else:
            raise ValueError(f"unknown mode component {part!r} in mode {mode!r}: use 'eager', 'fastest' or a "
                             f"'+'-joined set of {', '.join(MODE_COMPONENTS)}")
    if "bf16" in components and "fp16" in components:
        raise ValueError(f"mode {mode!r} asks for both bf16 and fp16: pick one")
    return frozenset(components)


def mode_name(components: Union[str, FrozenSet[str], Sequence[str]]) -> str:
    """Canonical name of a mode (components in :data:`MODE_COMPONENTS` order; ``"eager"`` when empty)."""
    parts = parse_mode(components) if isinstance(components, str) else frozenset(components)
    unknown = parts.difference(MODE_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown mode components {sorted(unknown)}")
    return "+".join(c for c in MODE_COMPONENTS if c in parts) or "eager"


class _OutputsOnly(nn.Module):
    """The detector without features and anchors, for tracing: images -> (regression, classification)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor) -> Tuple[Tensor, Tensor]:
        _, regression, classification, _ = self.model(inputs)
        return regression, classification


class InferenceModel:
    """An :class:`EfficientDet` prepared for one inference mode; ``__call__(images)`` runs it.

    Args:
        model: the detector (eval mode is set). It is moved to ``device`` and, for the modes without
            ``fused``, converted in place (dtype, memory format) as the Detector always did; ``fused``
            folds a copy (in float32, before any precision change) and leaves ``model`` unconverted.
        mode: see the module doc, e.g. ``"eager"``, ``"fused+channels_last+trace"``, ``"fastest"``.
        device: where the network runs (``torch.device``); default: where ``model`` is.

    ``fp16`` on a non-CUDA device is a ValueError. ``bf16`` is allowed everywhere; where
    :func:`bf16_supported` is False it is emulated (slow) and a warning is logged.

    Attributes:
        network: the module that runs (the folded copy under ``fused``, else ``model`` itself).
        components: the mode's components; ``name``: its canonical name.
        dtype: the network's dtype (float32, bfloat16 or float16).
    """

    def __init__(self, model: nn.Module, mode: str = "eager", device: Optional[torch.device] = None) -> None:
        self.components = parse_mode(mode)
        self.name = mode_name(self.components)
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        if "fp16" in self.components and self.device.type != "cuda":
            raise ValueError(f"mode {mode!r}: fp16 inference needs a CUDA device, got {self.device}")
        if "bf16" in self.components and not bf16_supported(self.device):
            logger.warning("mode %r: no native bfloat16 support on %s, bf16 is emulated (slow)", mode, self.device)
        self.dtype = (torch.bfloat16 if "bf16" in self.components
                      else torch.float16 if "fp16" in self.components else torch.float32)
        self.memory_format = torch.channels_last if "channels_last" in self.components else torch.contiguous_format
        model.eval()
        self.anchors = model.anchors
        if "fused" in self.components:
            network = specialize_for_inference(model.to(device=self.device, dtype=torch.float32))
        else:
            network = model
        self.network = network.to(device=self.device, dtype=self.dtype, memory_format=self.memory_format).eval()
        self._traced: "OrderedDict[Tuple[int, ...], torch.jit.ScriptModule]" = OrderedDict()

    def prepare_inputs(self, images: Tensor) -> Tensor:
        """images: Tensor[B, 3, H, W] (any device / float dtype) -> on the network's device, dtype and layout."""
        images = images.to(device=self.device, non_blocking=True)
        # Layout first, then dtype: on CPU the single copy that does both is 2x slower (bf16 1x3x512x512:
        # 0.42 ms against 0.18 ms).
        return images.contiguous(memory_format=self.memory_format).to(self.dtype)

    def traced(self, inputs: Tensor) -> torch.jit.ScriptModule:
        """The frozen graph for ``inputs``'s shape (traced on first use; :data:`TRACE_CACHE_SIZE` kept)."""
        key = tuple(int(v) for v in inputs.shape)
        graph = self._traced.get(key)
        if graph is None:
            logger.info("tracing %s for input shape %s", self.name, key)
            with torch.no_grad():
                # One eager run first: it creates the lazily packed conv weights (InferenceConv2d), which the
                # tracer then records as buffers; created during tracing they would be untraceable constants.
                self.network(inputs)
            with torch.no_grad(), warnings.catch_warnings():
                # Python ints (input checks, padding amounts) become constants of this shape's graph.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # torch.jit is deprecated in favour of torch.compile, which is far slower to build here
                # (see the module doc); the frozen trace is the measured faster option.
                warnings.simplefilter("ignore", DeprecationWarning)
                graph = torch.jit.freeze(torch.jit.trace(_OutputsOnly(self.network).eval(), inputs,
                                                         check_trace=False))
                # TorchScript's profiling executor specialises and optimises the graph over its first runs.
                for _ in range(2):
                    graph(inputs)
            self._traced[key] = graph
            while len(self._traced) > TRACE_CACHE_SIZE:
                self._traced.popitem(last=False)
        else:
            self._traced.move_to_end(key)
        return graph

    def __call__(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """images: Tensor[B, 3, H, W] normalised RGB -> ``(regression Tensor[B, N, 4] (dy, dx, dh, dw),
        classification Tensor[B, N, C] sigmoid probabilities, anchors Tensor[1, N, 4] (y1, x1, y2, x2)
        input pixels float32)``; regression and classification in :attr:`dtype`."""
        check_images(images, self.network.config)  # the frozen graphs check nothing
        inputs = self.prepare_inputs(images)
        if "trace" in self.components:
            regression, classification = self.traced(inputs)(inputs)
        else:
            _, regression, classification, _ = self.network(inputs)
        reference = inputs.new_empty((0, 3, inputs.shape[2], inputs.shape[3]), dtype=torch.float32)
        return regression, classification, self.anchors(reference)
