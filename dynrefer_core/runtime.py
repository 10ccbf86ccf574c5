"""The one place that chooses the device, the compute dtype and, under torchrun, the process group.

CUDA: bf16 autocast when the card supports it (the release runs FlanT5 in bf16). fp16 is refused for
FlanT5: its activations overflow fp16's range (inf/NaN captions), a known T5 problem.
CPU: fp32 unless bf16 is asked for. bf16 autocast is refused (fp32, with a warning) on CPUs without native
bf16 matmuls (AVX512-BF16 or AMX), where it is slower than fp32 (docs/dynrefer-mini.md has the gain where
they exist).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


@dataclass
class Ranks:
    """This process's place among the training processes: rank 0 of 1 unless torchrun started several."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0, which logs, evaluates and saves."""
        return self.rank == 0

    def device(self, requested: str | None = None) -> torch.device:
        """`requested` (or `choose_device`'s default) for one process; with several, this process's GPU
        (`local_rank`), or the CPU without CUDA or when "cpu" is requested."""
        if self.world == 1 or requested == "cpu":
            return choose_device(requested)
        return choose_device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """`module` under DistributedDataParallel with several processes (backward then averages the
        gradients over them), else `module` itself."""
        if self.world == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[self.local_rank] if device.type == "cuda" else None, find_unused_parameters=True)

    def barrier(self) -> None:
        """Wait for the other processes (a no-op without a process group)."""
        if dist.is_initialized():
            dist.barrier()


def init_distributed(device: str | None = None) -> Ranks:
    """Join torchrun's process group if there is one: NCCL on GPUs, gloo on the CPU (or when `device` is "cpu")."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Ranks()
    backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
    dist.init_process_group(backend)
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if backend == "nccl":
        torch.cuda.set_device(ranks.local_rank)
    return ranks
