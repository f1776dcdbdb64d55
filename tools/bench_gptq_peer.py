"""GPTQ against a peer's GPTQ on the same work, on one GPU (issue 9, item 7).

The work: the seven linears of one LLaMA-2-7B-shaped (or 70B-shaped) decoder layer, random
weights (normal, std 0.02), each with the Hessian H = 2/n X^T X of ``--rows`` random calibration
rows whose channels have log-normal magnitudes (a few outlier channels, as real activations).
q/k/v share one Hessian, gate/up another, as in a real layer. Both implementations get the same
weights and Hessians and quantize to 4-bit groups:

- ours: ``fp_export.quant.gptq.gptq`` on INT4 groups (``int4``, group ``--group``) and on the
  deployable grid (FP4 E2M1, M2 scales, group 256; ``w4a8-fp4-m2-lorc`` without LoRC), each as
  it runs by default (blocks of columns as the fused Triton kernel ``quant.gptq_kernel``, one
  factorization per distinct Hessian) and with the kernel off (blocks as replayed CUDA graphs;
  the same bytes);
- llm-compressor's ``quantize_weight`` (``llmcompressor.modifiers.gptq.gptq_quantize``: static
  min-max observer scales, its Triton block kernel when it applies) on symmetric INT4 groups, the
  layer's seven linears batched the way its ``GPTQModifier`` batches same-shape modules.

Reported per implementation: GPTQ seconds per layer (median of ``--repeats`` runs, min..max; CUDA
synchronized, Hessian factorization included, Hessian accumulation excluded for both) and the
layer output error sum over linears of tr(E H E^T), E = W - dequant(Q), relative to RTN on the
same grid. Writes ``<out>/gptq_peer_<shape>.json`` and ``.md``.

    PYTHONPATH=$PWD python tools/bench_gptq_peer.py --shape 7b --out benchmarks
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import fp_export.quant.gptq as G
from fp_export.ptq.sequential import output_error
from fp_export.quant.gptq import HessianAccumulator, gptq
from fp_export.quant.quantizer import WeightQuantizer

GRAPHED = "fp-export GPTQ, kernel off (CUDA graphs), "
SHAPES = {"7b": (4096, 11008, 4096), "70b": (8192, 28672, 1024)}  # hidden, MLP, k/v width


def layer(shape: str, rows: int, seed: int = 0) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """[(name, weight [out, in] float32, Hessian [in, in] float64)] on the GPU."""
    h, m, kv = SHAPES[shape]
    gen = torch.Generator("cuda").manual_seed(seed)

    def hessian(width):
        mag = torch.exp(torch.randn(width, generator=gen, device="cuda"))
        acc = HessianAccumulator(width, "cuda")
        for _ in range(rows // 2048):
            acc.add(torch.randn(2048, width, generator=gen, device="cuda") * mag)
        return acc.hessian()

    def w(o, i):
        return torch.randn(o, i, generator=gen, device="cuda") * 0.02

    h_attn, h_o, h_mlp, h_down = hessian(h), hessian(h), hessian(h), hessian(m)
    return [("q_proj", w(h, h), h_attn), ("k_proj", w(kv, h), h_attn), ("v_proj", w(kv, h), h_attn),
            ("o_proj", w(h, h), h_o), ("gate_proj", w(m, h), h_mlp), ("up_proj", w(m, h), h_mlp),
            ("down_proj", w(h, m), h_down)]


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, out


def ours(lin, fmt: str, group: int, constraint: str, block_kernel: bool = True):
    """Our GPTQ on the layer; ``block_kernel`` False: every block of columns as a replayed CUDA
    graph instead of one Triton launch (``quant.gptq.BLOCK_KERNEL``)."""
    def run():
        saved, G.BLOCK_KERNEL = G.BLOCK_KERNEL, block_kernel
        try:
            return [gptq(w, H, WeightQuantizer(fmt, group, constraint)).dequantize() for _, w, H in lin]
        finally:
            G.BLOCK_KERNEL = saved
    return run


def ours_rtn(lin, fmt: str, group: int, constraint: str):
    return [WeightQuantizer(fmt, group, constraint).rtn(w).dequantize() for _, w, _ in lin]


def peer_args(group: int):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)


def peer_qparams(w: torch.Tensor, args):
    from compressed_tensors.quantization.utils import calculate_qparams

    g = w.view(w.shape[0], -1, args.group_size)
    return calculate_qparams(g.amin(-1), g.amax(-1), args)


def peer(lin, group: int):
    """llm-compressor's GPTQ, same-shape linears batched (q with o, k with v, gate with up)."""
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    args = peer_args(group)
    batches: dict[tuple, list] = {}
    for name, w, H in lin:
        batches.setdefault((tuple(w.shape), H.shape[0]), []).append((name, w, H))

    def run():
        out = {}
        for items in batches.values():
            qp = [peer_qparams(w, args) for _, w, _ in items]
            q, _losses, _fallback = quantize_weight(
                torch.stack([w for _, w, _ in items]), torch.stack([H.float() for _, _, H in items]),
                torch.stack([s for s, _ in qp]), torch.stack([z for _, z in qp]), None, args, 128, 0.01)
            out.update({name: q[i] for i, (name, _, _) in enumerate(items)})
        return [out[name] for name, _, _ in lin]
    return run


def peer_rtn(lin, group: int):
    from compressed_tensors.quantization import fake_quantize

    args = peer_args(group)
    out = []
    for _, w, _ in lin:
        s, z = peer_qparams(w, args)
        out.append(fake_quantize(w, s, z, args))
    return out


def error(lin, qs) -> float:
    return sum(output_error(w, q.float(), H) for (_, w, H), q in zip(lin, qs))


def profile(runs, path: Path) -> None:
    """One run of each implementation (but the CUDA-graph ones: thousands of launches, minutes
    under the profiler) under torch.profiler: its top CUDA kernels and CPU operators, as text in
    ``path``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    parts = []
    for name, fn, _ in runs:
        if name.startswith(GRAPHED):
            continue
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        ev = prof.key_averages()
        parts += [f"## {name}", ev.table(sort_by="cuda_time_total", row_limit=15),
                  ev.table(sort_by="self_cpu_time_total", row_limit=15)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--rows", type=int, default=16384, help="calibration rows per Hessian")
    ap.add_argument("--group", type=int, default=128, help="INT4 group size (both implementations)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--profile", action="store_true",
                    help="also one run of each implementation under torch.profiler: <out>/gptq_profile_<shape>.txt")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    lin = layer(args.shape, args.rows)
    rows = []
    runs = [("fp-export GPTQ, INT4 g%d" % args.group, ours(lin, "int4", args.group, "none"),
             ours_rtn(lin, "int4", args.group, "none")),
            ("fp-export GPTQ, FP4 E2M1 M2 g256 (w4a8-fp4-m2)", ours(lin, "fp4_e2m1", 256, "m2"),
             ours_rtn(lin, "fp4_e2m1", 256, "m2")),
            (GRAPHED + "INT4 g%d" % args.group, ours(lin, "int4", args.group, "none", False),
             ours_rtn(lin, "int4", args.group, "none")),
            (GRAPHED + "FP4 E2M1 M2 g256", ours(lin, "fp4_e2m1", 256, "m2", False),
             ours_rtn(lin, "fp4_e2m1", 256, "m2"))]
    try:
        import llmcompressor  # noqa: F401
        runs.append(("llm-compressor %s GPTQ, INT4 g%d" % (llmcompressor.__version__, args.group),
                     peer(lin, args.group), peer_rtn(lin, args.group)))
    except ImportError as e:
        print(f"llm-compressor not importable ({e}); its row is left out", flush=True)
    for name, fn, rtn in runs:
        fn()  # warm-up: CUDA graphs / Triton kernels compiled outside the timing
        times, qs = timed(fn, args.repeats)
        rows.append({"implementation": name, "seconds": times, "median_s": statistics.median(times),
                     "error_vs_rtn": error(lin, qs) / error(lin, rtn)})
        print(json.dumps(rows[-1]), flush=True)
    if args.profile:
        profile(runs, args.out / f"gptq_profile_{args.shape}.txt")
    peer_s = rows[-1]["median_s"] if rows[-1]["implementation"].startswith("llm-compressor") else None
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
              "linears": [(n, list(w.shape)) for n, w, _ in lin], "rows": args.rows, "group": args.group,
              "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gptq_peer_{args.shape}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# GPTQ per decoder layer vs llm-compressor: {report['device']}, {args.shape}-shaped layer", "",
          f"Seven linears ({', '.join(f'{n} {s[0]}x{s[1]}' for n, s in report['linears'])}), random weights, "
          f"Hessians of {args.rows} random rows with log-normal channel magnitudes; torch {report['torch']}; "
          f"{args.repeats} timed runs after a warm-up. `tools/bench_gptq_peer.py`.", "",
          "| implementation | seconds per layer (median, min..max) | speed vs llm-compressor | output error vs RTN |",
          "|---|---|---|---|"]
    for r in rows:
        speed = "-" if peer_s is None else f"{peer_s / r['median_s']:.2f}x"
        md.append(f"| {r['implementation']} | {r['median_s']:.3f} ({min(r['seconds']):.3f}..{max(r['seconds']):.3f})"
                  f" | {speed} | {r['error_vs_rtn']:.3f} |")
    (args.out / f"gptq_peer_{args.shape}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
