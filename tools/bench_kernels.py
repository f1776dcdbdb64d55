"""GEMM benchmark of the W4A8 path on a CUDA GPU (writes benchmarks/kernels.json + kernels.md).

Shapes: K = N in {4096, 8192} and the LLaMA-2-7B / LLaMA-2-70B linear shapes with q/k/v and
gate/up fused as the decode engine runs them; M in {1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096}. Per point:
- BF16: cuBLAS (torch.matmul) on bf16 weights;
- FP8: ``torch._scaled_mm`` on E4M3 weights with per-token / per-channel scales (W8A8);
- W4A8: ``fp_export.runtime.w4a8_gemm.gemm`` on the packed FP4 weights ("auto", ``auto_path``:
  the wgmma kernel up to ``MMA_M`` tokens, up to ``MMA_MAX_M`` for wide weights, its tiled form up
  to ``TILED_MAX_M``, FP4 -> FP8 cast into a workspace + ``_scaled_mm`` otherwise);
- W4A8 keep-FP8 (M > ``MMA_M_KEPT``): the same with the FP8 copy kept (no per-call cast);
- W4A8 mma and W4A8 cast (M > ``MMA_M_KEPT``): the wgmma kernel (its tiled form beyond
  ``MMA_MAX_M``) and the per-call cast + ``_scaled_mm`` forced, the evidence for the rule.
All take already-quantized FP8 activations (the quantizer is fused into the producing kernel in
the engine). Every call is timed inside a CUDA graph of 20 calls (no Python launch overhead, as in
the engine), weights rotating over enough copies that no call finds its weights in L2; median of
3 runs, with the spread (max - min) / median. HBM GB/s counts the weight bytes (+ activations and
output) once. Usage: python tools/bench_kernels.py [--out benchmarks]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import copies_for, graph_time_us, spread  # noqa: E402

from fp_export.runtime import w4a8_gemm as W  # noqa: E402
from fp_export.runtime.fused_quant import quantize_rows  # noqa: E402

GROUP = 256
MS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096)
SHAPES = {  # name: (N, K)
    "K=N=4096": (4096, 4096), "K=N=8192": (8192, 8192),
    "7B qkv": (12288, 4096), "7B gate_up": (22016, 4096), "7B down": (4096, 11008),
    "70B qkv": (10240, 8192), "70B gate_up": (57344, 8192), "70B down": (8192, 28672),
}


def random_weight(n, k, dev):
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
    shift = torch.randint(-2, 3, (n, k // GROUP), dtype=torch.int8, device=dev)
    return W.prepare(packed, shift, GROUP, torch.rand(n, device=dev) * 1e-3 + 1e-3)


def bench_shape(name, n, k, dev, copy_tbps):
    rows = []
    w4 = [random_weight(n, k, dev) for _ in range(copies_for(n * k // 2))]
    w8 = [W.weight_to_fp8(w).clone() for w in w4[: copies_for(n * k)]]
    wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
    for m in MS:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        xq, xs = quantize_rows(x)
        big = 2 * m * n * k > 2e11
        kw = dict(reps=4 if big else 20, replays=3 if big else 10)
        res = {}
        res["bf16"] = graph_time_us([lambda w=w: torch.matmul(x, w.t()) for w in wb], **kw)
        res["fp8"] = graph_time_us([lambda w=w, s=s: torch._scaled_mm(xq, w.t(), scale_a=xs[:, None], scale_b=s.w_scale[None, :],
                                                                      out_dtype=torch.bfloat16) for w, s in zip(w8, w4)], **kw)
        W.gemm(xq, xs, w4[0])  # sizes the workspaces before capture
        res["w4a8"] = graph_time_us([lambda w=w: W.gemm(xq, xs, w) for w in w4], **kw)
        if m > W.MMA_M_KEPT:
            res["w4a8_mma"] = graph_time_us([lambda w=w: W.gemm(xq, xs, w, path="mma") for w in w4], **kw)
            res["w4a8_cast"] = graph_time_us([lambda w=w: W.gemm(xq, xs, w, path="scaled_mm") for w in w4], **kw)
            kept = [W.W4A8Weight(w.wt, w.st, w.w_scale, w.n, w.k, w.sub, fp8=f) for w, f in zip(w4, w8)]
            res["w4a8_keep_fp8"] = graph_time_us([lambda w=w: W.gemm(xq, xs, w) for w in kept], **kw)
        wbytes = n * k // 2 + n * (k // GROUP)
        t = res["w4a8"][0]
        path = W.auto_path(m, n, k, False)
        row = {"shape": name, "M": m, "N": n, "K": k,
               "path": "cast+scaled_mm" if path == "scaled_mm" else "mma tiled" if m > W.MMA_MAX_M else "mma",
               **{f"{key}_us": v[0] for key, v in res.items()}, **{f"{key}_runs_us": v[1] for key, v in res.items()},
               "spread_max": max(spread(v[1]) for v in res.values()),
               "w4a8_vs_bf16": res["bf16"][0] / t, "w4a8_vs_fp8": res["fp8"][0] / t,
               "w4a8_GBps": (wbytes + m * k + 2 * m * n) / t / 1e3,
               "w4a8_frac_copy_bw": (wbytes + m * k + 2 * m * n) / t / 1e6 / copy_tbps,
               "fp8_GBps": (n * k + m * k + 2 * m * n) / res["fp8"][0] / 1e3,
               "bf16_GBps": (2 * n * k + 2 * m * k + 2 * m * n) / res["bf16"][0] / 1e3}
        if "w4a8_keep_fp8" in res:
            row["w4a8_keep_fp8_vs_fp8"] = res["fp8"][0] / res["w4a8_keep_fp8"][0]
        rows.append(row)
        print(f"{name:12s} M={m:5d}: bf16 {res['bf16'][0]:8.1f} fp8 {res['fp8'][0]:8.1f} w4a8 {t:8.1f} us "
              f"({row['w4a8_vs_bf16']:.2f}x bf16, {row['w4a8_vs_fp8']:.2f}x fp8, {row['w4a8_frac_copy_bw']:.0%} of copy BW)"
              + (f" keep-fp8 {res['w4a8_keep_fp8'][0]:.1f}" if "w4a8_keep_fp8" in res else "")
              + (f" mma {res['w4a8_mma'][0]:.1f} cast {res['w4a8_cast'][0]:.1f}" if "w4a8_mma" in res else ""), flush=True)
    del w4, w8, wb
    torch.cuda.empty_cache()
    return rows


def markdown(res):
    lines = [f"# W4A8 GEMM benchmark on {res['device']}", "",
             f"torch {res['torch']}; measured device-to-device copy bandwidth {res['copy_TBps']:.2f} TB/s (read + write). "
             "Times in us per call, each call timed inside a CUDA graph, weights L2-cold; median of 3 runs. "
             f"W4A8 = FP4 shift-cast weights (group {GROUP}) x FP8 activations: the wgmma kernel for M <= {W.MMA_M} "
             f"(<= {W.MMA_MAX_M} for K >= {W.MMA_WIDE_K} and N x K > {round(W.MMA_WIDE_WEIGHTS ** 0.5)}^2), its tiled form for "
             f"{W.MMA_MAX_M} < M <= {W.TILED_MAX_M}, cast + _scaled_mm otherwise (`auto_path`); "
             f"keep-FP8 = the FP8 copy kept (the wgmma kernel up to {W.MMA_M_KEPT} tokens, _scaled_mm beyond); "
             f"mma, cast = the wgmma kernel (tiled beyond {W.MMA_MAX_M} tokens), the per-call cast + _scaled_mm, "
             f"forced (from {W.MMA_M_KEPT + 1} tokens).", "",
             "| shape | M | BF16 | FP8 | W4A8 | W4A8 keep-FP8 | W4A8 mma | W4A8 cast | vs BF16 | vs FP8 | W4A8 GB/s | % copy BW | spread |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["gemm"]:
        keep = f"{r['w4a8_keep_fp8_us']:.1f}" if "w4a8_keep_fp8_us" in r else "-"
        mma = f"{r['w4a8_mma_us']:.1f}" if "w4a8_mma_us" in r else "-"
        cast = f"{r['w4a8_cast_us']:.1f}" if "w4a8_cast_us" in r else "-"
        lines.append(f"| {r['shape']} ({r['N']}x{r['K']}) | {r['M']} | {r['bf16_us']:.1f} | {r['fp8_us']:.1f} | {r['w4a8_us']:.1f} "
                     f"| {keep} | {mma} | {cast} | {r['w4a8_vs_bf16']:.2f}x | {r['w4a8_vs_fp8']:.2f}x | {r['w4a8_GBps']:.0f} "
                     f"| {r['w4a8_frac_copy_bw']:.0%} | {r['spread_max']:.1%} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(50):  # clocks up before the first measurement
        a @ a
    src = torch.empty(2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t, _ = graph_time_us([lambda: dst.copy_(src)], reps=10, replays=10)
    copy_tbps = 2 * 2**30 / t / 1e6
    del src, dst, a
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_TBps": copy_tbps, "gemm": []}
    for name in args.shapes:
        n, k = SHAPES[name]
        res["gemm"] += bench_shape(name, n, k, dev, copy_tbps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "kernels.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
