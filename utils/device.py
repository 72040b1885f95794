"""Device selection, in one place for every script."""
from __future__ import annotations

from typing import Optional, Union

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
