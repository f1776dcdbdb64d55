"""Where a decode step's time goes (issue 10): the LLaMA-2-7B-shaped model of tools/bench_decode.py
at one batch size (``--batch``, default 1), one eager decode step per engine kind under
torch.profiler, GPU kernel time summed by category (the kernels are those the step's CUDA graph
replays), beside the graph-replayed step time of the same engine (the difference: gaps between
kernels, and kernels overlapped by programmatic dependent launch). Writes
``<out>/decode_profile.json`` and ``.md`` (``decode_profile_b<batch>.*`` beyond batch 1).

    PYTHONPATH=$PWD python tools/profile_decode.py --out benchmarks [--batch 32]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import random_w4a8_linears, time_decode  # noqa: E402

from fp_export.runtime.engine import DecodeEngine  # noqa: E402

CATEGORIES = [  # (category, kernel-name pattern), first match wins
    ("W4A8 GEMM (ours)", r"w4a8_gemm_(wide_)?kernel"),
    ("RoPE + KV write (ours)", r"_rope_cache"),
    ("norm / SiLU / FP8 quantizers (ours)", r"_rmsnorm_kernel|_silu_mul_quant|_quant_rows"),
    ("attention (ours: with the o projection's FP8 quantization)", r"fmha|attention|flash|softmax|Attention"),
    ("cuBLAS / cuBLASLt GEMM", r"gemm|xmma|cutlass|nvjet|Kernel2|splitK"),
    ("other (embedding, residual, final norm, casts)", r"."),
]


def profile_step(eng: DecodeEngine, vocab: int, batch: int) -> dict:
    """GPU time (us) of one decode step of ``batch`` sequences at position 32, by category and by
    kernel."""
    ids = torch.randint(0, vocab, (batch, 32))
    eng.prefill(ids, 8)
    step_ids = torch.randint(0, vocab, (batch, 1), device="cuda")
    pos = torch.full((1,), 32, dtype=torch.long, device="cuda")
    with torch.no_grad():
        for _ in range(2):
            eng._forward(step_ids, pos, 256)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eng._forward(step_ids, pos, 256)
            torch.cuda.synchronize()
    kernels: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name][0] += e.device_time
            kernels[e.name][1] += 1
    cats: dict[str, list] = {c: [0.0, 0] for c, _ in CATEGORIES}
    for name, (us, n) in kernels.items():
        cat = next(c for c, pat in CATEGORIES if re.search(pat, name))
        cats[cat][0] += us
        cats[cat][1] += n
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]
    return {"categories": {c: {"us": v[0], "kernels": v[1]} for c, v in cats.items()},
            "total_us": sum(v[0] for v in cats.values()), "kernels": sum(v[1] for v in cats.values()),
            "top": [{"name": n[:120], "us": v[0], "calls": v[1]} for n, v in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    lin = random_w4a8_linears(cfg, "cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
           "batch": args.batch, "kinds": {}}
    for kind, kw in (("bf16", {}), ("fp8", {}), ("w4a8", {"linears": lin})):
        eng = DecodeEngine(model, kind, **kw)
        r = profile_step(eng, cfg.vocab_size, args.batch)
        r["graph_step_us"] = time_decode(eng, cfg.vocab_size, args.batch, 32)["ms_per_step"] * 1e3
        eng.release()
        del eng
        torch.cuda.empty_cache()
        res["kinds"][kind] = r
        print(kind, json.dumps({c: round(v["us"]) for c, v in r["categories"].items()}), round(r["graph_step_us"]),
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "decode_profile" if args.batch == 1 else f"decode_profile_b{args.batch}"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    kinds = list(res["kinds"])
    md = [f"# One decode step, batch {args.batch}, LLaMA-2-7B-shaped ({args.layers} layers): {res['device']}", "",
          f"torch {res['torch']}; `tools/profile_decode.py`: GPU kernel time of one eager step under torch.profiler "
          "(the kernels the step's CUDA graph replays), by category; us (kernels).", "",
          "| category | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for c, _ in CATEGORIES:
        md.append(f"| {c} | " + " | ".join(f"{res['kinds'][k]['categories'][c]['us']:.0f} "
                                            f"({res['kinds'][k]['categories'][c]['kernels']})" for k in kinds) + " |")
    md.append("| **kernel time** | " + " | ".join(f"**{res['kinds'][k]['total_us']:.0f}** ({res['kinds'][k]['kernels']})"
                                               for k in kinds) + " |")
    md.append("| step replayed as a CUDA graph (tools/bench_decode.py timing) | "
              + " | ".join(f"{res['kinds'][k]['graph_step_us']:.0f}" for k in kinds) + " |")
    md += ["", "Top W4A8 kernels:", "", "| kernel | us | calls |", "|---|---|---|"]
    md += [f"| `{t['name']}` | {t['us']:.0f} | {t['calls']} |" for t in res["kinds"]["w4a8"]["top"]]
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
