"""What every script does around its work: logging setup and one-line errors."""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence, Union

KEEP_MEMORY_ENV = "EFFDET_KEEP_MEMORY"  # "0" turns the allocator tuning of run_script off

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def boolean_string(value: Union[str, bool]) -> bool:
    """``"True"``/``"False"`` (the published scripts' form), also ``true/false``, ``1/0``, ``yes/no``, ``on/off``.

    Raises ValueError naming the value otherwise (argparse turns it into "invalid boolean_string value").
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not a valid boolean string: {value!r} (use True or False)")


def add_bool_arg(parser: argparse.ArgumentParser, *flags: str, default: Optional[bool] = False,
                 help: str = "") -> argparse.Action:
    """A boolean option that takes every published form: ``--flag`` (True), ``--flag True/False``,
    ``--flag true/false/1/0``. ``default`` may be None to tell "not given" from an explicit value."""
    shown = "" if default is None else f" (default {default})"
    return parser.add_argument(*flags, type=boolean_string, nargs="?", const=True, default=default,
                               metavar="BOOL", help=help + shown)


DEFAULT_WEIGHTS_HELP = "checkpoint (default weights/efficientdet-d{c}.pth, downloaded when missing)"


def add_model_args(parser: argparse.ArgumentParser, weights_help: str = DEFAULT_WEIGHTS_HELP,
                   project_default: str = "coco", weights_flags: Sequence[str] = ("-w", "--weights")) -> None:
    """The options that name the model, defined once for every script: ``-c/--compound_coef`` (D0..D7x as
    0..8), ``-p/--project`` (``projects/NAME.yml`` or a YAML path) and ``-w/--weights`` (``train.py``:
    ``-w/--load_weights``; none with empty ``weights_flags``)."""
    parser.add_argument("-c", "--compound_coef", type=int, default=0, help="EfficientDet D0..D7x as 0..8 (default %(default)s)")
    parser.add_argument("-p", "--project", default=project_default,
                        help="project name (projects/NAME.yml) or path of a project YAML (default %(default)s)")
    if weights_flags:
        parser.add_argument(*weights_flags, default=None, help=weights_help)


def add_threshold_args(parser: argparse.ArgumentParser, preset: Any, iou_flag: str = "--iou_threshold") -> None:
    """``--threshold`` (keep score > it) and ``--iou_threshold`` (NMS: suppress IoU > it; ``coco_eval.py``:
    the published ``--nms_threshold``), defaulting to ``preset.score`` / ``preset.iou`` (a
    :class:`utils.inference.postprocess.Thresholds`, which checks their ranges)."""
    parser.add_argument("--threshold", type=float, default=preset.score,
                        help="score threshold (keep score > it; default %(default)s)")
    parser.add_argument(iou_flag, type=float, default=preset.iou,
                        help="NMS IoU threshold (suppress IoU > it; default %(default)s)")


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """The options of the shared inference path (:class:`utils.inference.detector.Detector`) that every detecting
    script takes: ``--device``, ``--float16``, ``--mode``, ``--input_size``."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or N (default: CUDA when available)")
    add_bool_arg(parser, "--float16", help="half-precision network (CUDA only)")
    parser.add_argument("--mode", default="eager",
                        help="inference mode: eager (default), fused, channels_last, trace, bf16, fp16 joined with + "
                             "(e.g. fused+channels_last+trace), or fastest; see utils/inference/modes.py")
    parser.add_argument("--input_size", type=int, default=None,
                        help="square network input side, a multiple of the model's largest stride "
                             "(default: the model's, e.g. 512 for D0)")


def run_script(run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
               log_level: int = logging.INFO, keep_memory: bool = True) -> int:
    """Call ``run(args)``; bad input (ValueError, and OSError: FileNotFoundError, download and I/O
    failures) becomes one ``error: ...`` line on stderr and exit status 1, without a traceback.

    With ``keep_memory`` (and unless ``EFFDET_KEEP_MEMORY=0``) glibc is told to keep freed memory
    (:func:`keep_freed_memory`): on the CPU every forward and backward otherwise page-faults its large
    activations in again, which made steps up to 10x slower here (see benchmark/README.md).

    torch's intra-op thread count is put back afterwards, so that an in-process caller (a test, a notebook)
    keeps its own whatever ``run`` sets (the benchmarks' ``--threads``).
    """
    import torch

    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    if keep_memory and os.environ.get(KEEP_MEMORY_ENV, "1") != "0":
        keep_freed_memory()
    threads = torch.get_num_threads()
    try:
        return run(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)


def keep_freed_memory() -> bool:
    """glibc ``mallopt``: no ``mmap`` for large blocks, a 512 MiB top pad and no trimming, so that the
    activations of one run reuse the pages of the previous one instead of being page-faulted in again
    (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=...`` in the environment does the same).
    Returns False where glibc's mallopt is not available."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2 ** 31 - 1)
                and libc.mallopt(m_top_pad, 512 * 2 ** 20))


def parse_with_settings(parser: argparse.ArgumentParser, argv: Sequence[str], settings: dict,
                        caller: str) -> argparse.Namespace:
    """``parser.parse_args(argv)``, then each of ``settings`` (keyword arguments of the Python API named as the
    script's flags, e.g. ``batch_size``) set as if given on the command line: a string goes through the flag's
    type, a value outside the flag's choices is refused. An unknown name is a one-line ValueError naming it and
    the closest flags (``difflib``)."""
    import difflib

    args = parser.parse_args(list(argv))
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    for key, value in settings.items():
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{caller}: unknown setting {key!r}{hint}; the settings are the script's flags: "
                             + ", ".join(sorted(actions)))
        if isinstance(value, str) and callable(action.type):
            try:
                value = action.type(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{caller}: {key}={value!r}: {exc}") from None
        if value is not None and action.choices is not None and value not in action.choices:
            raise ValueError(f"{caller}: {key}={value!r} is not one of {', '.join(map(str, action.choices))}")
        setattr(args, key, value)
    return args
