"""The one place that chooses the device and the compute dtype.

CUDA: bf16 autocast when the card supports it (the release runs FlanT5 in bf16). fp16 is refused for
FlanT5: its activations overflow fp16's range (inf/NaN captions), a known T5 problem.
CPU: fp32 unless bf16 is asked for. bf16 autocast is refused (fp32, with a warning) on CPUs without native
bf16 matmuls (AVX512-BF16 or AMX), where it is slower than fp32 (docs/dynrefer-mini.md has the gain where
they exist).
"""
from __future__ import annotations

import contextlib
import warnings

import torch


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else CUDA when available, else CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu'")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_dtype(device: torch.device, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """Compute dtype for `device`: bf16 on CUDA when supported, fp32 otherwise; fp16 is refused."""
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                 "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(names)}")
        dtype = names[dtype]
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if dtype == torch.float16:
        fallback = torch.bfloat16 if bf16_ok else torch.float32
        warnings.warn(
            f"fp16 is refused: FlanT5 activations overflow in fp16 (NaN/empty captions); using {fallback}",
            stacklevel=2,
        )
        return fallback
    if dtype == torch.bfloat16 and not bf16_ok and device.type == "cuda":
        warnings.warn("this GPU has no bf16 support; using fp32", stacklevel=2)
        return torch.float32
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bf16 matmuls (AVX512-BF16 or AMX), where bf16 is slower than fp32; "
                      "using fp32", stacklevel=2)
        return torch.float32
    if dtype is not None:
        return dtype
    return torch.bfloat16 if bf16_ok else torch.float32


def cpu_has_native_bf16() -> bool:
    """True if oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 or AMX)."""
    try:  # a private oneDNN query; if it is missing, assume no
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for `dtype` on `device` (a no-op for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
