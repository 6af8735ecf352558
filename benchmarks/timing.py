"""Timing helpers the benchmark scripts share: wait for the device, time one call."""

import resource
import time

import torch


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously; a CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, device: torch.device):
    """``(seconds, minor page faults)`` of one call of ``fn``, its device work included."""
    sync(device)
    f, t = minor_faults(), time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t, minor_faults() - f
