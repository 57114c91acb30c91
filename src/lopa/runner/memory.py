"""How much memory the KV pool may take, and which errors mean the device ran out of it.

    budget = kv_budget(RunnerConfig.kv_cache_bytes, device)   # bytes the pool may hold (admission checks it)
    if is_oom(err): ...                                        # a step that ran out of memory (engine.py)

The derived budget reads only totals (physical RAM; the GPU's memory and what the weights took), never what
is free at this instant, so every Branch Parallel rank derives the same number and admits the same requests.
"""

from __future__ import annotations

import os

import torch

CPU_FRACTION = 4  # a CPU pool takes at most 1/4 of physical RAM: the weights, activations and the OS keep the rest
GPU_FRACTION = 2  # a GPU pool takes at most 1/2 of what the weights leave: activations, graphs and logits the rest


def kv_budget(requested: int | None, device: torch.device) -> int:
    """RunnerConfig.kv_cache_bytes, or the derived default for ``device`` (call it after the weights loaded)."""
    if requested is not None:
        return requested
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return max(0, total - torch.cuda.memory_allocated(device)) // GPU_FRACTION
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // CPU_FRACTION


def is_oom(err: BaseException) -> bool:
    """torch's CUDA out-of-memory, Python's MemoryError, or the CPU allocator's refusal (a RuntimeError)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
