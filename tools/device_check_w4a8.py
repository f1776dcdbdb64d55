"""Device session script: build the W4A8 library, check it against the float64 reference, and
sweep the split-K count on L2-cold weights, timed inside CUDA graphs (results under $OUT). Used to
fix the committed split rule (``w4a8_gemm.default_splits``)."""
import itertools, json, os, sys, time
import torch
from fp_export.runtime import w4a8_gemm as W
from fp_export.runtime.fused_quant import quantize_rows

out = os.environ.get("OUT", "/tmp")
t0 = time.time(); W.build_library(); print("build", time.time() - t0, flush=True)
dev = "cuda"
res = {"device": torch.cuda.get_device_name(), "checks": [], "sweep": []}

def rand_w(n, k, g, gen=None):
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
    shift = torch.randint(-5, 7, (n, k // g), dtype=torch.int8, device=dev)
    scale = torch.rand(n, device=dev) * 1e-3 + 1e-4
    return packed, shift, scale

torch.manual_seed(0)
for (m, n, k, g, bias, lorc) in ([] if os.environ.get('SKIP_CHECKS') else [(1, 384, 1024, 256, True, False), (16, 384, 1024, 32, False, True), (100, 200, 576, 64, True, True),
                                 (512, 256, 1024, 1024, True, False), (4096, 96, 256, 128, False, False), (5, 1000, 8192, 256, True, False),
                                 (33, 17, 96, 32, True, True), (64, 4096, 4096, 256, False, False), (9, 4096, 11008, 256, False, False)]):
    packed, shift, scale = rand_w(n, k, g)
    b = torch.randn(n, device=dev) if bias else None
    lu = torch.randn(n, 8, device=dev) * 0.1 if lorc else None
    lv = torch.randn(8, k, device=dev) * 0.1 if lorc else None
    w = W.prepare(packed, shift, g, scale, b, lu, lv)
    x = torch.randn(m, k, device=dev) * 3
    xq, xs = quantize_rows(x)
    ref = W.reference(xq.float().cpu(), xs.cpu(), w)
    for path in (["mma", "scaled_mm"] if m <= W.MMA_MAX_M else ["scaled_mm"]):
        for sp in ([1, 3, 8] if path == "mma" else [None]):
            for dt in (torch.float32, torch.bfloat16):
                y = W.gemm(xq, xs, w, out_dtype=dt, splits=sp, path=path)
                y2 = W.gemm(xq, xs, w, out_dtype=dt, splits=sp, path=path)
                rel = float((y.double().cpu() - ref).norm() / ref.norm())
                det = bool(torch.equal(y, y2))
                res["checks"].append(dict(m=m, n=n, k=k, g=g, sub=w.sub, path=path, splits=sp, dtype=str(dt), rel=rel, deterministic=det))
                print(f"check m={m} n={n} k={k} g={g} sub={w.sub} {path} sp={sp} {dt}: rel {rel:.2e} det {det}", flush=True)
    f8 = W.weight_to_fp8(w).view(torch.uint8).cpu()
    from fp_export.numerics.fp4_to_fp8 import fp4_to_fp8 as rc
    print("cast exact", torch.equal(f8, rc(packed.cpu(), shift.cpu(), g)), flush=True)

L2 = 50 * 2**20
sys.path.insert(0, os.path.dirname(__file__))
from bench_common import graph_time_us
def med(fn): return graph_time_us([fn])[0] / 1e3  # ms per call inside a CUDA graph (weights rotate at capture)
for (n, k) in [(8192, 8192), (4096, 4096), (12288, 4096), (4096, 11008), (22016, 4096)]:
    nb = max(2, -(-4 * L2 // (n * k // 2)))
    ws = []
    for _ in range(nb):
        pk, sh, sc = rand_w(n, k, 256)
        ws.append(W.prepare(pk, sh, 256, sc))
    nb16 = max(2, -(-4 * L2 // (n * k * 2)))
    wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(nb16)]
    w8 = [w.to(dev) for w in ws[: max(2, -(-4 * L2 // (n * k)))]]
    f8 = [W.weight_to_fp8(w) for w in w8]
    for m in (1, 16, 32):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        xq, xs = quantize_rows(x)
        it = itertools.cycle(range(nb)); itb = itertools.cycle(wb); it8 = itertools.cycle(range(len(f8)))
        tb = med(lambda: torch.matmul(x, next(itb).t()))
        t8 = med(lambda: torch._scaled_mm(xq, f8[(j := next(it8))].t(), scale_a=xs[:, None], scale_b=ws[j].w_scale[None, :], out_dtype=torch.bfloat16))
        row = dict(m=m, n=n, k=k, bf16=tb, fp8=t8, default=W.default_splits(m, n, k))
        for sp in (1, 2, 4, 8, 16, 32):
            if sp > ws[0].kc: continue
            row[f"sp{sp}"] = med(lambda: W.gemm(xq, xs, ws[next(it)], splits=sp))
        best = min((v, kk) for kk, v in row.items() if kk.startswith("sp"))
        row["best"] = best[1]; row["best_ms"] = best[0]
        row["default_ms"] = row[f"sp{row['default']}"] if f"sp{row['default']}" in row else None
        wbytes = n * k / 2
        print(f"M={m:3d} N={n} K={k}: bf16 {tb*1e3:.1f} fp8 {t8*1e3:.1f} us | " + " ".join(f"{kk}={row[kk]*1e3:.1f}" for kk in row if kk.startswith("sp"))
              + f" | best {best[1]} {wbytes/best[0]/1e9:.2f} TB/s {tb/best[0]:.2f}x bf16 {t8/best[0]:.2f}x fp8; default sp{row['default']}", flush=True)
        res["sweep"].append(row)
    del ws, wb, w8, f8
    torch.cuda.empty_cache()
src = torch.empty(2**30, dtype=torch.uint8, device=dev); dst = torch.empty_like(src)
tc = med(lambda: dst.copy_(src)); res["copy_TBps"] = 2 * 2**30 / tc / 1e9
print("copy TB/s", res["copy_TBps"])
json.dump(res, open(os.path.join(out, "w4a8_check.json"), "w"), indent=1)
