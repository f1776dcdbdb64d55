"""End-to-end decode benchmark on a CUDA GPU (writes benchmarks/decode.json + decode.md).

W4A8 (FP4 M2 shift-cast weights, FP8 token-wise activations) vs W8A8-FP8 (``_scaled_mm``) vs BF16,
all through ``fp_export.runtime.engine.DecodeEngine`` (static KV cache, one CUDA graph per decode
step, fused RMSNorm/SiLU-mul FP8 quantization), on
- a LLaMA-2-7B-shaped model with random weights (32 layers, hidden 4096, MLP 11008, 32 heads,
  vocab 32000; W4A8 weights are random FP4 codes with random shifts);
- the embedded default model (W4A8 from an fp-export checkpoint, ``--checkpoint``).
Decode: greedy, prompt of 32 random tokens, ``--steps`` timed steps after a warm-up generation;
tokens/s = batch * steps / time, latency = time / steps (sampling and Python included).
Prefill: one 2048-token sequence, eager (no graph), tokens/s, median of 7 runs (eager launches from
Python: on the H100 machine single runs take up to 2.9x the median, two or three in a row at times).
Decode: 3 runs each; median and spread.
W4A8 also runs without programmatic dependent launch (``FP_EXPORT_PDL=0`` while that engine is built
and timed), the A/B of ``runtime.pdl`` in the same run.
Usage: python tools/bench_decode.py --checkpoint CKPT [--out benchmarks]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import spread  # noqa: E402

from fp_export.runtime.engine import DecodeEngine  # noqa: E402

BATCHES = (1, 8, 32)


def random_w4a8_linears(cfg, dev, seed=0):
    """{(layer, name): W4A8 part} of random FP4 codes / shifts, group 256, for every projection."""
    g = torch.Generator(device=dev).manual_seed(seed)
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    kvd = cfg.num_key_value_heads * hd
    shapes = {"q": (h, h), "k": (kvd, h), "v": (kvd, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}
    out = {}
    for layer in range(cfg.num_hidden_layers):
        for name, (n, k) in shapes.items():
            out[(layer, name)] = dict(kind="w4a8", group=256, bias=None, u=None, v=None,
                                      packed=torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev, generator=g),
                                      shift=torch.randint(-1, 2, (n, k // 256), dtype=torch.int8, device=dev, generator=g) + 4,
                                      w_scale=torch.full((n,), 0.02 / 6 / 16, device=dev))
    return out


def time_decode(eng: DecodeEngine, vocab: int, batch: int, steps: int, runs: int = 3) -> dict:
    ids = torch.randint(0, vocab, (batch, 32))
    eng.generate(ids, steps + 1)  # captures the graphs
    per_run = []
    for _ in range(runs):
        logits, bucket = eng.prefill(ids, steps + 1)
        tok = logits.argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            tok = eng.step(tok, 32 + i, bucket).argmax(-1)
        torch.cuda.synchronize()
        per_run.append((time.perf_counter() - t0) / steps)
    lat = statistics.median(per_run)
    return {"batch": batch, "ms_per_step": lat * 1e3, "tok_s": batch / lat, "spread": spread(per_run),
            "runs_ms": [x * 1e3 for x in per_run]}


@contextlib.contextmanager
def pdl_env(on: bool):
    """FP_EXPORT_PDL=0 inside the block when ``on`` is false (``runtime.pdl`` reads it per launch)."""
    before = os.environ.get("FP_EXPORT_PDL")
    if not on:
        os.environ["FP_EXPORT_PDL"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FP_EXPORT_PDL", None)
        else:
            os.environ["FP_EXPORT_PDL"] = before


def time_prefill(engines: dict, vocab: int, tokens: int = 2048, rounds: int = 7) -> dict:
    """Prefill of one ``tokens``-token prompt per engine ({kind: (engine, pdl)}), timed in
    ``rounds`` rounds that take the engines in turn, so that drifting GPU clocks and power reach
    every kind alike. -> {kind: {"tokens", "ms" (median), "tok_s", "spread"}}."""
    ids = torch.randint(0, vocab, (1, tokens))
    per_run = {kind: [] for kind in engines}
    for r in range(rounds + 1):  # round 0 warms up (kernels, workspaces, the cache)
        for kind, (eng, on) in engines.items():
            with pdl_env(on):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                eng.prefill(ids, 1)
                torch.cuda.synchronize()
                if r:
                    per_run[kind].append(time.perf_counter() - t0)
    out = {}
    for kind, xs in per_run.items():
        t = statistics.median(xs)
        out[kind] = {"tokens": tokens, "ms": t * 1e3, "tok_s": tokens / t, "spread": spread(xs)}
    return out


def bench_model(name, model, kinds: dict, vocab: int, steps: int, prefill: bool) -> dict:
    """Decode timings of each kind ({kind: DecodeEngine kwargs, "pdl": False to turn PDL off}),
    one engine at a time; with ``prefill``, the engines are kept (their KV caches and graphs freed)
    and their prefills timed in turn afterwards (``time_prefill``)."""
    res, engines = {}, {}
    for kind, kw in kinds.items():
        kw = dict(kw)
        on = kw.pop("pdl", True)
        with pdl_env(on):
            eng = DecodeEngine(model, **kw)
            res[kind] = {"decode": [time_decode(eng, vocab, b, steps) for b in BATCHES]}
        eng.release()
        if prefill:
            engines[kind] = (eng, on)
        del eng
        torch.cuda.empty_cache()
        print(name, kind, " ".join(f"b{d['batch']}: {d['tok_s']:.0f} tok/s {d['ms_per_step']:.2f} ms"
                                   for d in res[kind]["decode"]), flush=True)
    if prefill:
        for kind, p in time_prefill(engines, vocab).items():
            res[kind]["prefill"] = p
            print(name, kind, f"prefill {p['tok_s']:.0f} tok/s", flush=True)
        for eng, _ in engines.values():
            eng.release()
    return res


def markdown(res: dict) -> str:
    lines = [f"# Decode benchmark on {res['device']}", "", f"torch {res['torch']}; {res['note']}", ""]
    for model, r in res["models"].items():
        lines += [f"## {model}", "", "| batch | BF16 tok/s | W8A8-FP8 tok/s | W4A8 tok/s | W4A8 ms/token step | W4A8 vs BF16 "
                  "| W4A8 vs FP8 | spread (max of 3 runs) |", "|---|---|---|---|---|---|---|---|"]
        for i, b in enumerate(BATCHES):
            d = {k: r[k]["decode"][i] for k in r}
            sp = max(x["spread"] for x in d.values())
            lines.append(f"| {b} | {d['bf16']['tok_s']:.0f} | {d['fp8']['tok_s']:.0f} | {d['w4a8']['tok_s']:.0f} | "
                         f"{d['w4a8']['ms_per_step']:.2f} | {d['w4a8']['tok_s'] / d['bf16']['tok_s']:.2f}x | "
                         f"{d['w4a8']['tok_s'] / d['fp8']['tok_s']:.2f}x | {sp:.1%} |")
        if "w4a8_keep_fp8" in r:
            lines += ["", "W4A8 with a kept FP8 copy of the weights (1.5 bytes per weight; batches > 16 and prefill "
                      "on `_scaled_mm`): " + ", ".join(f"batch {d['batch']}: {d['tok_s']:.0f} tok/s "
                                                       f"({d['tok_s'] / f['tok_s']:.2f}x FP8)"
                                                       for d, f in zip(r["w4a8_keep_fp8"]["decode"], r["fp8"]["decode"]))]
        if "w4a8_no_pdl" in r:
            lines += ["", "W4A8 without programmatic dependent launch: " + ", ".join(
                f"batch {d['batch']}: {d['tok_s']:.0f} tok/s (PDL: {w['tok_s'] / d['tok_s']:.2f}x)"
                for d, w in zip(r["w4a8_no_pdl"]["decode"], r["w4a8"]["decode"]))]
        if "prefill" in r["bf16"]:
            p = {k: r[k]["prefill"] for k in r if "prefill" in r[k]}
            lines += ["", "Prefill, 2048 tokens (eager; median of 7 rounds that take the kinds in turn): " + ", ".join(
                f"{k} {p[k]['tok_s']:.0f} tok/s" for k in p) + f"; W4A8 vs FP8 {p['w4a8']['tok_s'] / p['fp8']['tok_s']:.2f}x"
                f" (spread up to {max(x['spread'] for x in p.values()):.0%})", ""]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--checkpoint", type=Path, help="fp-export W4A8 checkpoint of the default model")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cuda"
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "models": {},
           "note": f"CUDA graphs per decode step; greedy; prompt 32 tokens, {args.steps} timed steps; median of 3 runs"}
    if args.checkpoint:
        from fp_export.checkpoint.layout import load_checkpoint
        from fp_export.hf.loading import DEFAULT_MODEL, load_model

        base = load_model(DEFAULT_MODEL)[0]
        q = load_checkpoint(args.checkpoint)[0]
        v = base.config.vocab_size
        r = {}
        for kind, m in (("bf16", base), ("fp8", base), ("w4a8", q)):
            r.update(bench_model("default", m, {kind: {"kind": kind}}, v, args.steps, prefill=False))
        res["models"]["default model (kjv-llama-15m; W4A8 = w4a8-fp4-m2-lorc checkpoint)"] = r
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    lin = random_w4a8_linears(cfg, dev)
    r = bench_model("7B", model, {"bf16": {"kind": "bf16"}, "fp8": {"kind": "fp8"},
                                  "w4a8": {"kind": "w4a8", "linears": lin},
                                  "w4a8_keep_fp8": {"kind": "w4a8", "linears": lin, "keep_fp8": True},
                                  "w4a8_no_pdl": {"kind": "w4a8", "linears": lin, "pdl": False}},
                    cfg.vocab_size, args.steps, prefill=True)
    res["models"][f"LLaMA-2-7B-shaped, random weights ({args.layers} layers, hidden 4096, MLP 11008, 32 heads)"] = r
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "decode.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
