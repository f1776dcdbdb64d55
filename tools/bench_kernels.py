"""H100 benchmarks of the W4A8 path (run on a CUDA machine; writes JSON + Markdown).

1. Shift-cast kernel bandwidth (bytes read + written / time) vs a device-to-device copy.
2. GEMMs at K = N in {4096, 8192}, M in {1, 16, 128, 4096}: cuBLAS BF16 (torch.matmul), FP8
   ``torch._scaled_mm`` on pre-cast FP8 weights, shift-cast kernel + ``_scaled_mm``, and the fused
   Triton W4A8 kernel (swapped split-K kernel up to 64 tokens, tile kernel beyond; the ablation
   column is the tile kernel with plain Triton integer decode). FP8 variants take already-quantized FP8 activations (the token quantizer is
   timed separately). Every ratio is against a baseline timed in the same run.
3. Greedy decode tokens/s, W4A8 (fused) vs BF16: the embedded default model and a larger randomly
   initialized LLaMA-shaped model.

Timing: triton.testing.do_bench medians; weights rotate over enough copies to exceed the L2 cache.
Usage: python tools/bench_kernels.py --out benchmarks/
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from triton.testing import do_bench

from fp_export.runtime.kernels import fp4_to_fp8
from fp_export.runtime.layout import repack_split
from fp_export.runtime.linear import GpuQuantLinear, to_gpu_runtime
from fp_export.runtime.triton_w4a8 import quantize_rows_fp8, w4a8_matmul

L2_BYTES = 50 * 2**20
GROUP = 256


def median_ms(fn) -> float:
    return float(do_bench(fn, warmup=50, rep=200, return_mode="median"))


def copies_for(nbytes: int) -> int:
    return max(2, -(-4 * L2_BYTES // nbytes))


def random_fp4(n: int, k: int, dev: str):
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
    shift = torch.randint(-2, 3, (n, k // GROUP), dtype=torch.int8, device=dev)
    scale = torch.rand(n, device=dev) * 1e-3 + 1e-3
    return packed, shift, scale


def bench_cast(sizes, dev):
    rows = []
    for n, k in sizes:
        bufs = [random_fp4(n, k, dev) for _ in range(copies_for(n * k // 2))]
        outs = [torch.empty(n, k, dtype=torch.uint8, device=dev) for _ in range(2)]
        it = itertools.cycle(range(len(bufs)))
        t_cast = median_ms(lambda: fp4_to_fp8(bufs[(i := next(it))][0], bufs[i][1], GROUP, out=outs[i % 2]))
        moved = n * k // 2 + n * k // GROUP + n * k
        src = [torch.empty(n * k, dtype=torch.uint8, device=dev) for _ in range(copies_for(n * k))]
        dst = torch.empty(n * k, dtype=torch.uint8, device=dev)
        it2 = itertools.cycle(src)
        t_copy = median_ms(lambda: dst.copy_(next(it2)))
        cast_bw, copy_bw = moved / t_cast / 1e9, 2 * n * k / t_copy / 1e9
        rows.append({"rows": n, "cols": k, "cast_ms": t_cast, "cast_TBps": cast_bw, "copy_TBps": copy_bw,
                     "cast_vs_copy": cast_bw / copy_bw})
        print(f"cast {n}x{k}: {cast_bw:.2f} TB/s vs copy {copy_bw:.2f} TB/s ({cast_bw / copy_bw:.2f}x)", flush=True)
    return rows


def bench_gemm(dev):
    rows = []
    for kn in (4096, 8192):
        n = k = kn
        w_bytes = n * k // 2
        nbuf = copies_for(w_bytes)
        fp4 = [random_fp4(n, k, dev) for _ in range(nbuf)]
        split = [repack_split(p) for p, _, _ in fp4]
        fp8 = [fp4_to_fp8(p, s, GROUP).view(torch.float8_e4m3fn) for p, s, _ in fp4]
        bf16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies_for(2 * n * k))]
        for m in (1, 16, 128, 4096):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq, xs = quantize_rows_fp8(x)
            ib, i8, i4 = itertools.cycle(bf16), itertools.cycle(range(nbuf)), itertools.cycle(range(nbuf))
            i4c = itertools.cycle(range(nbuf))
            t_bf16 = median_ms(lambda: torch.matmul(x, next(ib).t()))

            def scaled(j):
                return torch._scaled_mm(xq, fp8[j].t(), scale_a=xs[:, None], scale_b=fp4[j][2][None, :],
                                        out_dtype=torch.bfloat16)

            t_fp8 = median_ms(lambda: scaled(next(i8)))

            def cast_then_mm(j):
                p, s, sc = fp4[j]
                w = fp4_to_fp8(p, s, GROUP).view(torch.float8_e4m3fn)
                return torch._scaled_mm(xq, w.t(), scale_a=xs[:, None], scale_b=sc[None, :], out_dtype=torch.bfloat16)

            t_cast_mm = median_ms(lambda: cast_then_mm(next(i4c)))
            t_fused = median_ms(lambda: w4a8_matmul(xq, xs, split[(j := next(i4))], fp4[j][1], fp4[j][2], GROUP))
            t_fused_int = median_ms(lambda: w4a8_matmul(xq, xs, split[(j := next(i4))], fp4[j][1], fp4[j][2], GROUP,
                                                        asm=False))
            t_quant = median_ms(lambda: quantize_rows_fp8(x))
            flops = 2 * m * n * k
            row = {"M": m, "N": n, "K": k, "bf16_ms": t_bf16, "fp8_scaled_mm_ms": t_fp8, "cast_scaled_mm_ms": t_cast_mm,
                   "fused_w4a8_ms": t_fused, "tile_kernel_int_decode_ms": t_fused_int, "act_quant_ms": t_quant,
                   "best_w4a8_ms": min(t_fused, t_cast_mm), "best_vs_fp8": t_fp8 / min(t_fused, t_cast_mm),
                   "fused_TFLOPs": flops / t_fused / 1e9, "fused_vs_bf16": t_bf16 / t_fused,
                   "fused_vs_fp8": t_fp8 / t_fused, "cast_mm_vs_bf16": t_bf16 / t_cast_mm}
            rows.append(row)
            print(f"M={m:5d} K=N={kn}: bf16 {t_bf16:.4f} fp8 {t_fp8:.4f} cast+mm {t_cast_mm:.4f} fused {t_fused:.4f} "
                  f"(tile kernel, int decode {t_fused_int:.4f}) ms"
                  f" -> fused {row['fused_vs_bf16']:.2f}x bf16, {row['fused_vs_fp8']:.2f}x fp8", flush=True)
    return rows


@torch.no_grad()
def decode_tps(model, vocab: int, new_tokens: int, dev: str) -> float:
    ids = torch.randint(0, vocab, (1, 16), device=dev)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t0)


def pair(base, w4, vocab: int, new_tokens: int, dev: str) -> dict:
    """Best of two alternating measurements of each model (W4A8, BF16, W4A8, BF16)."""
    w, b = [], []
    for _ in range(2):
        w.append(decode_tps(w4, vocab, new_tokens, dev))
        b.append(decode_tps(base, vocab, new_tokens, dev))
    return {"bf16_tok_s": max(b), "w4a8_tok_s": max(w), "runs_bf16": b, "runs_w4a8": w}


def large_models(dev: str, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(dev):
        base = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    w4 = LlamaForCausalLM(cfg).to(device=dev, dtype=torch.bfloat16).eval()
    w4.load_state_dict(base.state_dict())
    for layer in w4.model.layers:
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                n, k = mod.weight.shape
                q = GpuQuantLinear.from_packed(*random_fp4(n, k, dev))
                parent, _, leaf = name.rpartition(".")
                setattr(layer.get_submodule(parent), leaf, q.to(dev))
    return cfg, base, w4


def bench_decode(dev: str, layers: int, new_tokens: int):
    from fp_export.checkpoint.layout import load_checkpoint
    from fp_export.hf.loading import DEFAULT_MODEL, load_model
    from fp_export.ptq.job import quantize_to_checkpoint
    from fp_export.ptq.recipe import load_recipe

    out = {}
    qdir = Path("/tmp/fp_export_bench_q")
    if not qdir.exists():
        r = load_recipe("w4a8-fp4-m2-lorc")
        r = r.model_copy(update={"calibration": r.calibration.model_copy(update={"nsamples": 16})})
        quantize_to_checkpoint(DEFAULT_MODEL, r, qdir, eval_text=None)
    base = load_model(DEFAULT_MODEL)[0].to(dev, torch.bfloat16)
    w4 = to_gpu_runtime(load_checkpoint(qdir)[0], mode="fused")
    out["default_model"] = pair(base, w4, base.config.vocab_size, new_tokens, dev)
    cfg, base, w4 = large_models(dev, layers)
    out["large_model"] = {"config": {"hidden": 4096, "mlp": 11008, "layers": layers, "heads": 32, "kv_heads": 8},
                          **pair(base, w4, cfg.vocab_size, new_tokens, dev)}
    for k in ("default_model", "large_model"):
        out[k]["w4a8_vs_bf16"] = out[k]["w4a8_tok_s"] / out[k]["bf16_tok_s"]
        print(f"decode {k}: bf16 {out[k]['bf16_tok_s']:.1f} tok/s, w4a8 {out[k]['w4a8_tok_s']:.1f} tok/s", flush=True)
    return out


def markdown(res: dict) -> str:
    lines = [f"# fp-export kernel benchmarks on {res['device']}", "",
             f"torch {res['torch']}, triton {res['triton']}; medians of triton.testing.do_bench; group size {GROUP}.", "",
             "## Shift-cast kernel (FP4 -> FP8) vs device-to-device copy", "",
             "| rows x cols | cast TB/s | copy TB/s | cast / copy |", "|---|---|---|---|"]
    for r in res["cast"]:
        lines.append(f"| {r['rows']}x{r['cols']} | {r['cast_TBps']:.2f} | {r['copy_TBps']:.2f} | {r['cast_vs_copy']:.2f} |")
    lines += ["", "## GEMM (ms; ratios are speed-ups of the fused W4A8 kernel)", "",
              "| M | K=N | BF16 cuBLAS | FP8 _scaled_mm | cast + _scaled_mm | fused W4A8 | ablation: tile kernel, int decode "
              "| fused vs BF16 | fused vs FP8 | best W4A8 vs FP8 | act quant |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["gemm"]:
        lines.append(f"| {r['M']} | {r['K']} | {r['bf16_ms']:.4f} | {r['fp8_scaled_mm_ms']:.4f} | {r['cast_scaled_mm_ms']:.4f} "
                     f"| {r['fused_w4a8_ms']:.4f} | {r['tile_kernel_int_decode_ms']:.4f} | {r['fused_vs_bf16']:.2f}x "
                     f"| {r['fused_vs_fp8']:.2f}x | {r['best_vs_fp8']:.2f}x | {r['act_quant_ms']:.4f} |")
    if "decode" in res:
        lines += ["", "## Greedy decode, batch 1 (HF generate, eager)", "", "| model | BF16 tok/s | W4A8 tok/s | ratio |",
                  "|---|---|---|---|"]
        for k, d in res["decode"].items():
            lines.append(f"| {k} | {d['bf16_tok_s']:.1f} | {d['w4a8_tok_s']:.1f} | {d['w4a8_vs_bf16']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--layers", type=int, default=8, help="layers of the large random model")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    import triton

    dev = "cuda"
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    res["cast"] = bench_cast([(4096, 4096), (8192, 8192), (32768, 8192)], dev)
    res["gemm"] = bench_gemm(dev)
    if not args.skip_decode:
        res["decode"] = bench_decode(dev, args.layers, args.new_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "kernels.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
