"""Which device a network runs on, and its mixed-precision settings."""

from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def auto_flag(flag: bool | str, device: torch.device) -> bool:
    """A setting that may be ``"auto"`` (on for CUDA only), or a plain bool."""
    return device.type == "cuda" if flag == "auto" else bool(flag)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype for ``device``: bf16 where supported, else fp16 on CUDA."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.bfloat16


