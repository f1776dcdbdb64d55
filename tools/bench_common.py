"""Timing helpers shared by tools/bench_kernels.py and tools/bench_decode.py (CUDA only)."""
from __future__ import annotations

import statistics

import torch

L2_BYTES = 50 * 2**20


def copies_for(nbytes: int) -> int:
    """Buffers to rotate over so that consecutive calls never find their operand in L2."""
    return max(2, -(-4 * L2_BYTES // max(1, nbytes)))


def graph_time_us(fns, reps: int = 20, replays: int = 10, runs: int = 3) -> tuple[float, list[float]]:
    """Median time of one call (us): ``fns`` (callables, cycled) captured ``reps`` times into one
    CUDA graph, so launch overhead from Python is excluded as it is in the decode engine; timed
    over ``replays`` replays with CUDA events, ``runs`` times. -> (median, per-run list)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / (replays * reps))
    del g
    return statistics.median(out), out


def spread(xs: list[float]) -> float:
    return (max(xs) - min(xs)) / statistics.median(xs)
