"""Device selection, in one place for every script."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch


def select_device(spec: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU; otherwise "cpu", "cuda", "cuda:N", or an int N.

    Raises ValueError naming the request when that device does not exist here.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None or str(spec).strip().lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(spec).strip().lower()
    if text.isdigit():
        text = f"cuda:{text}"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {spec!r}: use cpu, cuda or cuda:N")
    return device


def resolve_published_device(cuda: bool, device: Optional[str]) -> Tuple[torch.device, Optional[str]]:
    """The device of the published ``--cuda BOOL`` and ``--device N`` (plus ours: cpu, cuda, cuda:N).

    ``cuda`` False: the CPU (a bare index N is ignored, as published). ``cuda`` True with no ``device`` or
    an index N: ``cuda:N`` (``cuda`` without N), or the CPU where this machine has no CUDA, returned with
    a note to print. An explicit cpu / cuda / cuda:N is used as given. Returns ``(device, note or None)``;
    ValueError (via :func:`select_device`) for a device that does not exist here.
    """
    text = "" if device is None else str(device).strip().lower()
    if not cuda:
        if text.startswith("cuda"):
            raise ValueError(f"--cuda False asks for the CPU, but --device {device} names a CUDA device")
        return select_device("cpu" if text in ("", "auto") or text.isdigit() else text), None
    if text in ("", "auto") or text.isdigit():
        if not torch.cuda.is_available():
            return select_device("cpu"), ("note: no CUDA device on this machine: running on the CPU "
                                          "(--cuda False asks for the CPU)")
        return select_device(text if text.isdigit() else "cuda"), None
    return select_device(text), None
