"""GPU and RAM facts: memory per device, cache release. Everything works (and says "CPU") without CUDA."""

from __future__ import annotations

import gc

import torch

from internlm_app.chat_types import DeviceMemory


def memory_report() -> list[DeviceMemory]:
    """One entry per CUDA device; empty on a CPU-only machine."""
    if not torch.cuda.is_available():
        return []
    return [
        DeviceMemory(
            index=i,
            name=torch.cuda.get_device_name(i),
            allocated=torch.cuda.memory_allocated(i),
            reserved=torch.cuda.memory_reserved(i),
            total=torch.cuda.get_device_properties(i).total_memory,
        )
        for i in range(torch.cuda.device_count())
    ]


def clear_cache() -> tuple[list[DeviceMemory], list[DeviceMemory]]:
    """Collect garbage and release cached CUDA blocks; returns the memory before and after."""
    before = memory_report()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    return before, memory_report()


def total_gpu_bytes() -> int:
    return sum(d.total for d in memory_report())


def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
