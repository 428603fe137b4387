"""Precision: bf16 autocast (CPU and GPU), fp16 autocast with GradScaler (GPU only), or fp32."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (emulated bf16 is usually slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the device has native bf16, else 'fp32'.

    An explicit 'bf16' on a CPU without native support still runs (emulated, with a warning);
    'fp16' is refused on CPU (autocast there was 17x slower, see FIELD-NOTES).
    """
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    if requested == "auto":
        return "bf16" if supported else "fp32"
    if requested == "bf16" and not supported:
        warnings.warn(f"run.precision=bf16 on {device} without native bf16: emulated, expect it to be slow",
                      stacklevel=2)
    if requested == "fp16" and device.type != "cuda":
        raise ValueError(f"run.precision=fp16 needs a CUDA device, got {device}; use bf16 or fp32")
    return requested


def autocast(precision: str, device: torch.device):
    """The autocast context for a precision ('fp32' autocasts nothing)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that scales only for fp16 (disabled otherwise, so the loop has one code path)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
