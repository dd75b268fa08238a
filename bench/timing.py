"""Wall-clock timing shared by the bench scripts (run them as ``python bench/<script>.py``)."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_interleaved(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median wall time of each function; rounds interleave all of them, so a change in machine
    load hits the baseline and the measured functions alike and the ratios stay meaningful."""
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels, caches, graph building
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}
