"""Timing one call the same way in every benchmark: warm up, then time each call (CUDA events on
a GPU, the wall clock on a CPU), and keep every time so that a table can show the spread."""

import time

import torch


def timings(fn, warmup: int, iters: int, device) -> list[float]:
    """Milliseconds of each of ``iters`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return times
