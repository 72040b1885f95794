"""Export EfficientDet D0–D7x to ONNX and check the graph with ONNX Runtime against PyTorch.

    python export.py -c 0 -w weights/efficientdet-d0.pth -o d0.onnx
    python export.py -c 2 --input_size 512 --dynamic_batch --with_decode -o d2_boxes.onnx
    python export.py -c 0 -o d0_random.onnx                           # random weights (no -w)

The graph takes ``images`` float32[B, 3, H, W] (normalised RGB, H and W multiples of the largest stride)
and returns ``regression`` [B, N, 4] (dy, dx, dh, dw) and ``classification`` [B, N, C] (sigmoid), or with
``--with_decode`` ``boxes`` [B, N, 4] (x1, y1, x2, y2) input pixels clipped to the input and ``scores``
[B, N, C]; the anchors of the exported input size are a constant of the graph. BatchNorm is folded.
Score thresholding and NMS stay outside the graph (``utils.inference.postprocess``). Needs ``onnx`` and
``onnxruntime`` (requirements-dev.txt).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from backbone import build_model
from utils.inference.onnx_export import ExportModule, export_onnx
from utils.config.project import load_project
from utils.weights.loading import load_weights
from utils.config.cli import add_bool_arg, add_model_args, run_script

ONNX_TOLERANCE = 1e-4


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, weights_help="checkpoint (default: random weights)")
    parser.add_argument("--input_size", type=int, nargs="+", default=None, metavar="SIDE",
                        help="input side, or height width (default: the model's)")
    parser.add_argument("--batch_size", type=int, default=1, help="batch of the exported example (default 1)")
    add_bool_arg(parser, "--dynamic_batch", help="symbolic batch dimension")
    add_bool_arg(parser, "--with_decode", help="include BBoxTransform + ClipBoxes: outputs boxes (x1, y1, x2, y2) and scores")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("-o", "--output", default=None, help="output path (default efficientdet-d{c}.onnx)")
    add_bool_arg(parser, "--no_check", help="skip the ONNX Runtime check")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights and of the check input")
    return parser.parse_args(argv)


def _import_onnx():
    """(onnx, onnxruntime), or ValueError telling how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ValueError(f"ONNX export needs onnx and onnxruntime (pip install -r requirements-dev.txt): {exc}") from None
    return onnx, onnxruntime


def check_onnx(path: str, module: ExportModule, images: torch.Tensor) -> Dict[str, float]:
    """Max |ONNX Runtime − PyTorch| per output for ``images`` Tensor[B, 3, H, W] float32 (CPU provider)."""
    onnx, onnxruntime = _import_onnx()
    onnx.checker.check_model(onnx.load(path))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = session.run(None, {"images": images.cpu().numpy()})
    with torch.no_grad():
        expected = module(images)
    return {name: float(np.abs(g - e.cpu().numpy()).max()) for name, g, e in zip(names, got, expected)}


def _input_hw(model, sizes: Optional[Sequence[int]]) -> Tuple[int, int]:
    if sizes is None:
        return model.config.input_size, model.config.input_size
    if len(sizes) not in (1, 2):
        raise ValueError(f"--input_size takes a side or height width, got {list(sizes)}")
    return (int(sizes[0]), int(sizes[-1]))


def run(args: argparse.Namespace) -> int:
    _import_onnx()
    project = load_project(args.project)
    torch.manual_seed(args.seed)
    model = build_model(args.compound_coef, project).eval()
    if args.weights:
        load_weights(model, args.weights, strict_classes=True)
    height, width = _input_hw(model, args.input_size)
    model.check_input_size(height, width)
    output = Path(args.output or f"efficientdet-d{args.compound_coef}.onnx")
    if output.parent and not output.parent.exists():
        raise FileNotFoundError(f"output folder {output.parent} does not exist")
    names = export_onnx(model, str(output), (height, width), batch_size=args.batch_size,
                        dynamic_batch=args.dynamic_batch, with_decode=args.with_decode, opset=args.opset)
    print(f"exported {model.config.name} ({height}x{width}, {project.num_classes} classes, opset {args.opset}"
          f"{', dynamic batch' if args.dynamic_batch else ''}) to {output}: outputs {', '.join(names)}")
    if args.no_check:
        return 0
    # The check runs the unfused PyTorch model (the reference) against the folded ONNX graph.
    reference = ExportModule(model, (height, width), with_decode=args.with_decode).eval()
    batch = 2 if args.dynamic_batch else args.batch_size
    images = torch.randn((batch, 3, height, width), generator=torch.Generator().manual_seed(args.seed))
    diffs = check_onnx(str(output), reference, images)
    print("onnxruntime vs PyTorch, max abs diff: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    # Boxes are in pixels: their tolerance scales with the input side (1e-4 relative).
    limits = {name: ONNX_TOLERANCE * (max(height, width) if name == "boxes" else 1.0) for name in diffs}
    failed = [f"{name} {diffs[name]:.2e} > {limits[name]:.2g}" for name in diffs if not diffs[name] <= limits[name]]
    if failed:
        print(f"error: ONNX Runtime differs from PyTorch: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    return run_script(run, args, log_level=logging.WARNING)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
