"""Choosing the autocast dtype: bf16 only where the device really supports it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (emulated bf16 is slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where supported, else 'fp32'; an unsupported 'bf16' is an error."""
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = cpu_supports_bf16()
    if requested == "auto":
        return "bf16" if supported else "fp32"
    if requested == "bf16" and not supported:
        raise ValueError(f"run.precision=bf16 but {device} has no native bf16; use fp32 or auto")
    return requested


def autocast(precision: str, device: torch.device):
    """The autocast context for a precision ('fp32' autocasts nothing)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
