"""Offline tuning of the W4A8 wgmma kernel (``plugins/w4a8_gemm.cu``, issue 10) on one GPU.

Builds the kernel once per variant of its tuning macros, and ``--previous``, another version of the
source with the same C API and weight layout, in parallel, then times each variant in its own
process: M in ``--ms`` on the decode shapes (or ``--shapes``), over split-K counts around the
committed rule (``w4a8_gemm.default_splits``; or ``--splits``), weights L2-cold (rotated copies),
each call inside a CUDA graph, median of 3 runs (``tools/bench_common.py``). ``--kernel`` names the
token range:
- ``few`` (M <= 16): ``FPX_STAGES`` (128-wide K chunks per warpgroup ring) x ``FPX_ROTATE`` (each
  warpgroup starts at a different chunk of its K range); M 1, 4, 16 by default;
- ``wide`` (17-128 tokens): ``FPX_STAGES``; M 32, 64, 128 by default, split counts 1-8 around the
  rule, and FP8 ``_scaled_mm`` (W8A8) timed in the committed build's process as the baseline.
``--vary MACRO=V1,V2`` (repeatable) sweeps other macro values instead of the default set; ``--nws 1,2,4``
also times 64-row blocks per CTA (``w4a8_gemm.default_nw``; not for ``--previous``).
The committed build is also timed with programmatic dependent launch off (``FP_EXPORT_PDL=0``).
Writes ``<out>/w4a8_config[_wide].json`` and ``.md``: per variant and shape the best split count and
its time, against the committed build in the same run.

    PYTHONPATH=$PWD python tools/sweep_w4a8.py --out benchmarks [--kernel wide] [--vary FPX_STAGES=4,6]
        [--splits 1,2,4] [--nws 1,2,4] [--shapes "70B qkv,70B gate_up"]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SHAPES = {"K=N=8192": (8192, 8192), "7B qkv": (12288, 4096), "7B o": (4096, 4096), "7B gate_up": (22016, 4096),
          "7B down": (4096, 11008), "70B down": (8192, 28672)}
MORE_SHAPES = {"70B qkv": (10240, 8192), "70B gate_up": (57344, 8192)}  # with --shapes
VARIANTS = {  # kernel: (macro, values) pairs swept as a product
    "few": (("FPX_STAGES", (4, 6, 8)), ("FPX_ROTATE", (0, 1))),
    "wide": (("FPX_STAGES", (4, 6, 8)),),
}
DEFAULT_MS = {"few": "1,4,16", "wide": "32,64,128"}


def child(ms: list[int], kernel: str, baseline: bool, splits_list: list[int] | None, shapes: dict,
          nws: list[int] | None) -> None:
    """Time the library named by FP_EXPORT_W4A8_LIB; one JSON line per (shape, M, splits, row blocks)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import copies_for, graph_time_us, spread
    from bench_kernels import random_weight

    from fp_export.runtime import w4a8_gemm as W
    from fp_export.runtime.fused_quant import quantize_rows

    dev = "cuda"
    torch.manual_seed(0)
    for name, (n, k) in shapes.items():
        ws = [random_weight(n, k, dev) for _ in range(copies_for(n * k // 2))]
        for m in ms:
            xq, xs = quantize_rows(torch.randn(m, k, device=dev, dtype=torch.bfloat16))
            if baseline:  # W8A8 FP8 on the same shape, L2-cold, as tools/bench_kernels.py times it
                w8 = [W.weight_to_fp8(w).clone() for w in ws[: copies_for(n * k)]]
                t, runs = graph_time_us([lambda w=w, s=s: torch._scaled_mm(xq, w.t(), scale_a=xs[:, None],
                                                                           scale_b=s.w_scale[None, :],
                                                                           out_dtype=torch.bfloat16)
                                         for w, s in zip(w8, ws)])
                print(json.dumps({"shape": name, "N": n, "K": k, "M": m, "splits": 0, "default": False, "us": t,
                                  "spread": spread(runs), "fp8": True}), flush=True)
                del w8
            base = W.default_splits(m, n, k)
            base_nw = W.default_nw(m, n)
            near = set(splits_list) if splits_list else {max(1, base // 2), base, base * 2} | (
                {1, 2, 4, 8} if kernel == "wide" else set())
            for nw, splits in itertools.product(nws or [base_nw], sorted(x for x in near if x <= ws[0].kc)):
                kw = {"splits": splits, "path": "mma"} | ({"nw": nw} if nws else {})  # --previous: no nw
                try:  # sizes the workspace before capture; --previous may take fewer tokens
                    W.gemm(xq, xs, ws[0], **kw)
                except W.W4A8Unavailable:
                    continue
                t, runs = graph_time_us([lambda w=w: W.gemm(xq, xs, w, **kw) for w in ws])
                print(json.dumps({"shape": name, "N": n, "K": k, "M": m, "splits": splits, "nw": nw,
                                  "default": splits == base and nw == base_nw, "us": t, "spread": spread(runs)}),
                      flush=True)
        del ws
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sweep_w4a8"))
    ap.add_argument("--kernel", choices=tuple(VARIANTS), default="few")
    ap.add_argument("--ms", help="token counts (default by --kernel)")
    ap.add_argument("--previous", type=Path, help="another w4a8_gemm.cu to time beside the variants")
    ap.add_argument("--vary", action="append", metavar="MACRO=V1,V2", help="sweep these macros instead of the "
                    "kernel's default set (repeatable; swept as a product)")
    ap.add_argument("--splits", help="split counts to time (default: around the committed rule)")
    ap.add_argument("--nws", help="64-row blocks per CTA to time (default: the committed rule)")
    ap.add_argument("--shapes", help="comma-separated shape names (default: " + ", ".join(SHAPES) + "; also "
                    + ", ".join(MORE_SHAPES) + ")")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.ms = args.ms or DEFAULT_MS[args.kernel]
    ms = [int(m) for m in args.ms.split(",")]
    every = {**SHAPES, **MORE_SHAPES}
    shapes = {name: every[name] for name in args.shapes.split(",")} if args.shapes else SHAPES
    if args.child:
        return child(ms, args.kernel, args.baseline, [int(x) for x in args.splits.split(",")] if args.splits else None,
                     shapes, [int(x) for x in args.nws.split(",")] if args.nws else None)
    import torch

    from fp_export.runtime.kernels import compile_cuda
    from fp_export.runtime.w4a8_gemm import LIB_NAME, W4A8Unavailable, build_library

    macros = VARIANTS[args.kernel]
    if args.vary:
        macros = tuple((m, tuple(int(x) for x in v.split(","))) for m, v in (a.split("=", 1) for a in args.vary))
    variants = [None] + [dict(zip((m for m, _ in macros), vals)) for vals in itertools.product(*(v for _, v in macros))]
    names = ["committed"] + ["_".join(f"{k.split('_')[-1]}{x}" for k, x in v.items()) for v in variants[1:]]
    builds = [lambda nv=nv: build_library(args.workdir / nv[0], nv[1]) for nv in zip(names, variants)]
    if args.previous:  # a source with the same C API
        names.append("previous")
        variants.append(None)
        builds.append(lambda: compile_cuda(args.previous.resolve(), LIB_NAME, args.workdir / "previous", W4A8Unavailable))
    names.append("committed, no PDL")  # the committed library again
    variants.append(None)
    builds.append(lambda: None)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        libs = list(pool.map(lambda build: build(), builds))
    libs = [lib or libs[0] for lib in libs]
    rows = []
    for name, v, lib in zip(names, variants, libs):
        env = {**os.environ, "FP_EXPORT_W4A8_LIB": str(lib), "FP_EXPORT_PDL": "0" if "no PDL" in name else "1"}
        cmd = [sys.executable, __file__, "--child", "--kernel", args.kernel, "--ms", args.ms] + (
            ["--splits", args.splits] if args.splits else []) + (["--shapes", args.shapes] if args.shapes else []) + (
            ["--nws", args.nws] if args.nws and name != "previous" else [])
        r = subprocess.run(cmd + (["--baseline"] if name == "committed" and args.kernel == "wide" else []), env=env,
                           capture_output=True, text=True)
        if r.returncode:
            print(f"{name}: failed\n{r.stderr[-2000:]}", flush=True)
            continue
        for line in r.stdout.splitlines():
            row = json.loads(line)
            rows.append({"variant": "fp8" if row.pop("fp8", False) else name, "defines": v, **row})
        print(f"{name}: {len(r.stdout.splitlines())} timings", flush=True)
    best: dict = {}
    for r in rows:
        key = (r["variant"], r["shape"], r["M"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "w4a8_config" + ("_wide" if args.kernel == "wide" else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    shapes = list(shapes)
    md = [f"# W4A8 {args.kernel} kernel: tuning sweep on {report['device']}", "",
          "`tools/sweep_w4a8.py`: each variant built with its macros and timed in its own process (L2-cold weights, "
          "CUDA graphs, median of 3 runs); per shape and M the best split count's time in us, and in brackets the "
          "time at the committed split rule" + (" (with `--nws`: [splits x row blocks per CTA] of the best)" if args.nws
                                                 else "") + ". Ratio: committed build's best / the variant's best, "
          "geometric mean.", "",
          "| variant | " + " | ".join(f"{s} M={m}" for s in shapes for m in ms) + " | ratio |",
          "|---|" + "---|" * (len(shapes) * len(ms) + 1)]
    for name in names + (["fp8"] if args.kernel == "wide" else []):
        cells, ratios = [], []
        for s in shapes:
            for m in ms:
                b, c = best.get((name, s, m)), best.get(("committed", s, m))
                d = next((r for r in rows if r["variant"] == name and r["shape"] == s and r["M"] == m and r["default"]),
                         None)
                at = f" [{b['splits']}x{b['nw']}]" if b and args.nws and b["splits"] else ""
                cells.append("-" if b is None else f"{b['us']:.1f}{at} ({d['us']:.1f})" if d else f"{b['us']:.1f}{at}")
                if b and c:
                    ratios.append(c["us"] / b["us"])
        gm = 1.0
        for x in ratios:
            gm *= x ** (1 / len(ratios)) if ratios else 1
        md.append(f"| {name} | " + " | ".join(cells) + f" | {gm:.3f}x |")
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
