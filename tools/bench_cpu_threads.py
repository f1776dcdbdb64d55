"""GPTQ time per decoder layer on the CPU against torch's intra-op thread count.

Variants: torch threads N for everything (``gptq.COLUMN_THREADS = None``, the behaviour before
issue 9), and N threads with the per-column loop on 1 (``COLUMN_THREADS = 1``, the default now).

A SmolLM2-135M-shaped layer (hidden 576, MLP 1536, 9 heads / 3 KV heads of 64: q/k/v/o, gate/up/down)
with random weights and a Hessian from random inputs; each linear quantized by the
w4a8-fp4-m2 weight rule (FP4, group 256, M2) through ``quant.gptq``. For every thread count the
layer is timed ``--repeats`` times (median, min, max), and the codes are compared with the
1-thread run (bit identity across thread counts). Writes ``benchmarks/cpu_threads.{json,md}``.

    PYTHONPATH=$PWD python tools/bench_cpu_threads.py [--threads 1 2 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import fp_export.quant.gptq as gptq_module
from fp_export.quant.gptq import HessianAccumulator, gptq
from fp_export.quant.quantizer import WeightQuantizer

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def problem(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    hessians = {}
    for n in (576, 1536):
        acc = HessianAccumulator(n)
        acc.add(torch.randn(4096, n, generator=g) @ (torch.eye(n) + 0.1 * torch.randn(n, n, generator=g)))
        hessians[n] = acc.hessian()
    return {k: (torch.randn(o, i, generator=g) * 0.02, hessians[i]) for k, (o, i) in SHAPES.items()}


def run_layer(prob) -> tuple[float, dict[str, torch.Tensor]]:
    t0 = time.perf_counter()
    codes = {k: gptq(w, h, WeightQuantizer("fp4_e2m1", 256, "m2")).codes for k, (w, h) in prob.items()}
    return time.perf_counter() - t0, codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = ap.parse_args()
    prob = problem()
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    gptq_module.COLUMN_THREADS = None
    run_layer(prob)  # warm-up
    _, ref_codes = run_layer(prob)
    rows = []
    variants = [(n, None) for n in args.threads] + [(n, 1) for n in args.threads if n > 1]
    for n, column in variants:
        torch.set_num_threads(n)
        gptq_module.COLUMN_THREADS = column
        times, same = [], True
        for _ in range(args.repeats):
            t, codes = run_layer(prob)
            times.append(t)
            same &= all(torch.equal(codes[k], ref_codes[k]) for k in codes)
        rows.append({"threads": n, "column_loop_threads": column or n, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                     "codes_equal_to_1_thread": same})
    base = rows[0]["median_s"]
    for r in rows:
        r["ratio_vs_first"] = r["median_s"] / base
    device = f"CPU {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} usable cores"
    report = {"device": device, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "torch": torch.__version__, "layer": "SmolLM2-135M-shaped decoder layer, 7 linears",
              "recipe": "fp4_e2m1 group 256 m2, GPTQ block 128, damp 0.01", "repeats": args.repeats, "rows": rows}
    args.out.mkdir(exist_ok=True)
    (args.out / "cpu_threads.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# GPTQ per-layer time vs torch threads ({device})", "",
          f"{report['layer']}; {report['recipe']}; torch {torch.__version__}; median of {args.repeats} "
          f"(min-max); ratio vs {rows[0]['threads']} thread(s) in the same run. 1-minute load average "
          f"{load_before[0]:.1f} before, {report['loadavg_after'][0]:.1f} after (the machine is shared).", "",
          "| torch threads | column-loop threads | median s | min-max s | ratio | codes = 1-thread codes |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['threads']} | {r['column_loop_threads']} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | {r['ratio_vs_first']:.2f} "
           f"| {r['codes_equal_to_1_thread']} |" for r in rows]
    (args.out / "cpu_threads.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
