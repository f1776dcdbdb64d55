"""Decode-step attention on a CUDA GPU (writes <out>/attention.json + attention.md): the engine's
kernel for models without GQA (``runtime.decode_attention``, FP8 output for the o projection)
against what it runs with GQA, PyTorch's SDPA (cuDNN on Hopper) over the graph's whole length
bucket with an additive mask, followed by the token quantizer (``fused_quant.quantize_rows``). Both read a bf16 KV cache
[B, NKV, S, 128] at one step position; each call timed inside a CUDA graph (tools/bench_common.py),
median of 3 runs and their spread. Shapes: LLaMA-2-7B (32 heads, no GQA) and LLaMA-2-70B (64
query heads, 8 KV heads) at batch 1, 8, 32 and positions 100, 1000, 4000.
``--sweep`` also times the kernel's tuning constants (BLOCK_N x NUM_WARPS x PROGRAMS_PER_SM) on
the same cases, as time / SDPA's (in attention.json, and attention_sweep.md).

    PYTHONPATH=$PWD python tools/bench_attention.py --out benchmarks [--sweep]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import copies_for, graph_time_us, spread  # noqa: E402

from fp_export.runtime import decode_attention as A  # noqa: E402
from fp_export.runtime.engine import LEN_BUCKET  # noqa: E402
from fp_export.runtime.fused_quant import quantize_rows  # noqa: E402

MODELS = {"7B (32 heads)": (32, 32), "70B (64 heads, 8 KV)": (64, 8)}
BATCHES = (1, 8, 32)
POSITIONS = (100, 1000, 4000)  # the step's position (positions 0..pos written)
HEAD = 128


def one(nh: int, nkv: int, batch: int, pos: int, sweep: bool = False) -> dict:
    length = -(-(pos + 1) // LEN_BUCKET) * LEN_BUCKET
    g = torch.Generator(device="cuda").manual_seed(pos)
    nbytes = 2 * batch * nkv * length * HEAD * 2
    caches = [[torch.randn(batch, nkv, length, HEAD, device="cuda", generator=g).bfloat16() for _ in range(2)]
              for _ in range(copies_for(nbytes))]  # rotated so that each call finds its cache outside L2
    q = torch.randn(batch, nh, 1, HEAD, device="cuda", generator=g).bfloat16()
    p0 = torch.tensor([pos], device="cuda")
    mask = torch.zeros(length, dtype=torch.bfloat16, device="cuda")
    mask[pos + 1:] = float("-inf")

    def sdpa(kc, vc):
        a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask[None, None, None], enable_gqa=nkv != nh)
        return quantize_rows(a.transpose(1, 2).reshape(batch, -1))

    def ours(kc, vc):
        return A.decode_attention(q, kc, vc, p0, length, quantize=True)

    t_ref, runs_ref = graph_time_us([lambda c=c: sdpa(*c) for c in caches])
    t_ours, runs_ours = graph_time_us([lambda c=c: ours(*c) for c in caches])
    kv_bytes = 2 * batch * nkv * (pos + 1) * HEAD * 2
    row = {"batch": batch, "pos": pos, "length": length, "sdpa_quant_us": t_ref, "ours_us": t_ours,
           "speedup": t_ref / t_ours, "ours_gb_s": kv_bytes / t_ours / 1e3,
           "spread": max(spread(runs_ref), spread(runs_ours))}
    if sweep:
        row["variants"] = {}
        kept = A.BLOCK_N, A.NUM_WARPS, A.PROGRAMS_PER_SM
        for A.BLOCK_N, A.NUM_WARPS, A.PROGRAMS_PER_SM in SWEEP:
            row["variants"][_variant(A.BLOCK_N, A.NUM_WARPS, A.PROGRAMS_PER_SM)] = graph_time_us(
                [lambda c=c: ours(*c) for c in caches])[0] / t_ref
        A.BLOCK_N, A.NUM_WARPS, A.PROGRAMS_PER_SM = kept
    return row


SWEEP = list(itertools.product((32, 64), (4, 8), (2, 4, 8)))  # BLOCK_N, NUM_WARPS, PROGRAMS_PER_SM


def _variant(*constants: int) -> str:
    return "/".join(map(str, constants))


def sweep_markdown(res: dict) -> str:
    """Per case the time of each (BLOCK_N / NUM_WARPS / PROGRAMS_PER_SM) as a fraction of SDPA's."""
    names = [_variant(*v) for v in SWEEP]
    md = [f"# decode_attention tuning sweep on {res['device']}", "",
          "`tools/bench_attention.py --sweep`: the kernel's time as a fraction of SDPA + quantize's (lower is "
          "better) per BLOCK_N / NUM_WARPS / PROGRAMS_PER_SM; the committed constants are marked *.", "",
          "| model | batch | position | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for name, rows in res["models"].items():
        md += [f"| {name} | {r['batch']} | {r['pos']} | " + " | ".join(f"{r['variants'][v]:.2f}" for v in names) + " |"
               for r in rows]
    for name, rows in res["models"].items():
        md.append(f"| {name} | geometric mean | | " + " | ".join(
            f"{statistics.geometric_mean(r['variants'][v] for r in rows):.2f}" for v in names) + " |")
    committed = _variant(A.BLOCK_N, A.NUM_WARPS, A.PROGRAMS_PER_SM)
    return "\n".join(md).replace(f" {committed} |", f" {committed}* |", 1) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--sweep", action="store_true", help="also time the kernel's tuning constants")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "models": {}}
    for name, (nh, nkv) in MODELS.items():
        res["models"][name] = [one(nh, nkv, b, p, args.sweep) for b in BATCHES for p in POSITIONS]
        for r in res["models"][name]:
            print(name, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()
                                    if k != "variants"}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention.json").write_text(json.dumps(res, indent=1) + "\n")
    md = [f"# Decode-step attention on {res['device']}", "",
          f"torch {res['torch']}; `tools/bench_attention.py`: one step's attention for a bf16 KV cache (head size "
          f"{HEAD}) and the FP8 quantization of its output, in us per call (CUDA graph, caches rotated so that each "
          f"call reads them from HBM, median of 3 runs). SDPA = `F.scaled_dot_product_attention` (cuDNN) over the "
          f"{LEN_BUCKET}-position length bucket with an additive mask, then `quantize_rows`: what the engine runs "
          "with GQA; ours = `decode_attention(quantize=True)`, reading positions 0..pos only, what it runs without "
          "GQA. GB/s: K/V bytes read by ours per second.", ""]
    for name, rows in res["models"].items():
        md += [f"## {name}", "", "| batch | position | SDPA + quantize | ours | speedup | ours GB/s | spread |",
               "|---|---|---|---|---|---|---|"]
        md += [f"| {r['batch']} | {r['pos']} | {r['sdpa_quant_us']:.1f} | {r['ours_us']:.1f} | {r['speedup']:.2f}x | "
               f"{r['ours_gb_s']:.0f} | {r['spread']:.1%} |" for r in rows]
        md.append("")
    (args.out / "attention.md").write_text("\n".join(md))
    if args.sweep:
        (args.out / "attention_sweep.md").write_text(sweep_markdown(res))
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
