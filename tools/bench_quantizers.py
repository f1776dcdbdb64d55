"""Benchmark of the fused SiLU * mul + FP8 quantizer (``fp_export.runtime.fused_quant``) on a CUDA
GPU: rows split over programs (``split_rule``, as committed) against one program per row, measured
in the same run (writes benchmarks/quantizers.json + quantizers.md); beside it, for scale, the
other decode-step quantizers (one program per row): the residual add + RMSNorm + FP8 and the token
quantizer alone.

Row lengths: LLaMA-2-7B's MLP (11008) and LLaMA-2-70B's (28672); the norms at hidden 4096. M in
{1, 8, 32, 64} tokens. Each call is timed inside a CUDA graph (``bench_common.graph_time_us``:
median of 3 runs, spread (max - min) / median). Usage: python tools/bench_quantizers.py [--out benchmarks]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import graph_time_us, spread  # noqa: E402

from fp_export.runtime import fused_quant as F  # noqa: E402

MS = (1, 8, 32, 64)


def kernels(m: int, dev):
    """name -> (H, whether split_rule applies, the call) for m tokens."""
    g = torch.Generator(device=dev).manual_seed(m)
    h = (torch.randn(m, 4096, device=dev, generator=g) * 3).bfloat16()
    d = torch.randn(m, 4096, device=dev, generator=g).bfloat16()
    w = (torch.rand(4096, device=dev, generator=g) + 0.5).bfloat16()
    out = {}
    for mlp in (11008, 28672):
        gu = (torch.randn(m, 2 * mlp, device=dev, generator=g) * 2).bfloat16()
        out[f"SiLU * mul + FP8 ({mlp})"] = (mlp, True, lambda gu=gu, i=mlp: F.silu_mul_quant(gu[:, :i], gu[:, i:]))
    out["add + RMSNorm + FP8"] = (4096, False, lambda: F.add_rmsnorm_quant(h, d, w, 1e-5))
    out["token quantizer"] = (4096, False, lambda: F.quantize_rows(h))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    committed = F.split_rule
    rows = []
    for m in MS:
        for name, (hidden, splits, fn) in kernels(m, dev).items():
            F.split_rule = F.one_program_per_row
            base = graph_time_us([fn])
            F.split_rule = committed
            split = graph_time_us([fn]) if splits else base
            programs = committed(m, hidden, dev)[0] if splits else 1
            row = {"kernel": name, "M": m, "H": hidden, "programs_per_row": programs, "one_per_row_us": base[0],
                   "split_us": split[0], "one_per_row_runs_us": base[1], "split_runs_us": split[1],
                   "speedup": base[0] / split[0], "spread_max": max(spread(base[1]), spread(split[1]))}
            rows.append(row)
            print(f"{name:28s} M={m:3d} H={hidden:5d}: one per row {base[0]:6.2f} us, {programs:2d} per row "
                  f"{split[0]:6.2f} us ({row['speedup']:.2f}x)", flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": rows}
    lines = [f"# Fused FP8 token quantizers on {res['device']}", "",
             f"torch {res['torch']}, triton {res['triton']}; `tools/bench_quantizers.py`. us per call inside a CUDA "
             "graph, median of 3 runs; the row split by `fused_quant.split_rule` against one program per row, "
             "same run. The norm and the token quantizer are never split (both columns: one measurement).", "",
             "| kernel | M | H | programs per row | one per row (us) | split (us) | speedup | spread |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['M']} | {r['H']} | {r['programs_per_row']} | {r['one_per_row_us']:.2f} "
              f"| {r['split_us']:.2f} | {r['speedup']:.2f}x | {r['spread_max']:.1%} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantizers.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "quantizers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
