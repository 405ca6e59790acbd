"""Peak memory of a run (CUDA max allocated, or peak RSS on the CPU), reset when each run starts."""

from __future__ import annotations

import resource

import torch

_CLEAR_REFS = "/proc/self/clear_refs"  # writing "5" resets VmHWM, the peak RSS (Linux >= 4.0)
_STATUS = "/proc/self/status"


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak: CUDA's peak statistics, or the process's peak RSS where Linux allows it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not permitted: peak_memory_mb then reports the process's lifetime peak


def resident_memory_mb(device: torch.device) -> float:
    """MiB in use now: CUDA allocated, or the process's resident set (VmRSS). With :func:`reset_peak_memory` and
    :func:`peak_memory_mb`, what one step adds to a warm process is ``peak_memory_mb - resident_memory_mb``."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_kb("VmRSS") / 1024


def _status_kb(field: str) -> float:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def peak_memory_mb(device: torch.device) -> float:
    """MiB: CUDA max allocated since the last reset, or the peak RSS (VmHWM) since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_kb("VmHWM") / 1024
