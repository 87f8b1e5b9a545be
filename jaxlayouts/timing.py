"""Timing one jitted call: the compile timed on its own, then the median of synchronised runs."""

from __future__ import annotations

import statistics
import time

import jax


def timed(fn, *args, warmup: int, iters: int) -> dict:
    """Compile time (the first call) and the median of ``iters`` runs after ``warmup`` runs, each
    ended by ``block_until_ready`` before the clock is read."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "time_s": statistics.median(times)}
