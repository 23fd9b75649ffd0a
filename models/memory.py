"""Device memory: telling an allocation failure from a bug, giving memory back, sizing the prefix cache.

Out of memory does not always arrive as ``torch.OutOfMemoryError``: cuBLAS reports
``CUBLAS_STATUS_ALLOC_FAILED``, attention kernels and the CPU allocator raise plain
RuntimeErrors. All of them mean "fewer items may fit", so the scorer answers them the
same way (free, then let the batcher halve the batch); every other RuntimeError is a bug.
"""

from __future__ import annotations

import gc
import os

import torch

#: Fragments of the messages torch, cuBLAS, cuDNN and the CPU allocator use for a failed allocation.
ALLOCATION_FAILURES = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "can't allocate memory",
    "failed to allocate",
    "Cannot allocate memory",
)
#: Share of the memory that is free after warm-up (at the largest batch) given to the prefix cache.
CACHE_SHARE_OF_FREE = 0.5
#: On a CPU the cache competes with everything else on the host: a tenth of available memory, at most 4 GiB.
CPU_CACHE_SHARE, CPU_CACHE_CAP = 0.1, 4 << 30


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says that memory ran out (and a smaller batch may succeed)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return any(fragment in text for fragment in ALLOCATION_FAILURES)


def release(device: torch.device) -> None:
    """Give the failed forward's memory back: collect its tensors, return cached CUDA blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> int:
    """Memory a new allocation could take now: free device memory, or available host memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def default_cache_bytes(device: torch.device) -> int:
    """The prefix cache's size when the settings leave it open (measured after warm-up)."""
    if device.type == "cuda":
        return int(free_bytes(device) * CACHE_SHARE_OF_FREE)
    return min(int(free_bytes(device) * CPU_CACHE_SHARE), CPU_CACHE_CAP)


def peak_bytes(device: torch.device) -> int | None:
    """Peak allocated device memory since the last reset (None off CUDA)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
