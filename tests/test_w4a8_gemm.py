"""The W4A8 GEMM (plugins/w4a8_gemm.cu via fp_export.runtime.w4a8_gemm) and the fused activation
quantizers: CPU tests of the weight layout and the float64 reference; GPU tests (skipped without
CUDA) against that reference at M = 1, 16, 100, 512, 4096, odd K/N and every group layout."""

import importlib.util

import pytest
import torch

from fp_export.numerics.formats import FP8_E4M3, decode, round_to_grid
from fp_export.numerics.fp4_to_fp8 import fp4_to_fp8 as reference_cast
from fp_export.numerics.fp4_to_fp8 import SHIFT_MAX, SHIFT_MIN
from fp_export.runtime import w4a8_gemm as W

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (N, K, group): odd N, K not a multiple of 128, groups of 32 / 64 / >= 128 (sub = 4, 2, 1), per channel,
# a partial last group (576 = 2 * 256 + 64)
SHAPES = [(384, 1024, 256), (200, 576, 64), (17, 96, 32), (96, 256, 256), (45, 640, 640), (40, 576, 256)]


def random_weight(n, k, g, seed, lorc=False, bias=True, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    shift = torch.randint(SHIFT_MIN, SHIFT_MAX + 1, (n, -(-k // g)), dtype=torch.int8, generator=gen)
    w_scale = torch.rand(n, generator=gen) * 1e-3 + 1e-4
    b = torch.randn(n, generator=gen) if bias else None
    u = torch.randn(n, 8, generator=gen) * 0.1 if lorc else None
    v = torch.randn(8, k, generator=gen) * 0.1 if lorc else None
    w = W.prepare(packed.to(device), shift.to(device), g, w_scale.to(device), b, u, v)
    return w.to(device), packed, shift, w_scale, b, u, v


@pytest.mark.parametrize("n,k,g", SHAPES)
def test_layout_round_trip_and_sub(n, k, g):
    w, packed, shift, *_ = random_weight(n, k, g, seed=n)
    p, s32 = W.unprepare(w)
    assert torch.equal(p, packed) and torch.equal(s32, shift.repeat_interleave(g // 32, dim=1)[:, : k // 32])
    assert w.sub == {32: 4, 64: 2}.get(g, 1 if k % g == 0 or (k % g) % 128 == 0 else 2)
    assert w.wt.shape[:2] == (-(-n // 16), -(-k // 128)) and w.st.shape == (-(-n // 16), -(-k // 128), 16, w.sub)


def test_layout_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiples of 32"):
        W.prepare(torch.zeros(4, 24, dtype=torch.uint8), torch.zeros(4, 3, dtype=torch.int8), 16, torch.ones(4))
    with pytest.raises(ValueError, match="ceil"):
        W.prepare(torch.zeros(4, 64, dtype=torch.uint8), torch.zeros(4, 3, dtype=torch.int8), 64, torch.ones(4))


@pytest.mark.parametrize("n,k,g", SHAPES[:3])
def test_reference_matches_independent_dequantization(n, k, g):
    """The layout-based float64 reference equals x @ (fp4 * 2**shift * w_scale)^T computed from the
    standard packing with ml_dtypes-independent decode of the cast reference."""
    w, packed, shift, w_scale, b, u, v = random_weight(n, k, g, seed=k, lorc=True)
    a = round_to_grid(torch.randn(5, k, dtype=torch.float64).float() * 50, FP8_E4M3).double()
    s = torch.rand(5, dtype=torch.float64) + 0.5
    wf = decode(reference_cast(packed, shift, g), FP8_E4M3).double() * w_scale.double()[:, None]
    ref = (a @ wf.T) * s[:, None] + ((a @ v.double().T) @ u.double().T) * s[:, None] + b.double()
    got = W.reference(a, s, w)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-9)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 24, 40, 100, 200, 512, 4096])
@pytest.mark.parametrize("n,k,g", SHAPES)
def test_gemm_matches_float64_reference(m, n, k, g):
    from fp_export.runtime.fused_quant import quantize_rows

    w = random_weight(n, k, g, seed=m + n, lorc=(m % 2 == 0), device="cuda")[0]
    x = torch.randn(m, k, device="cuda") * torch.logspace(-2, 2, m, device="cuda")[:, None]
    xq, xs = quantize_rows(x)
    ref = W.reference(xq.float().cpu(), xs.cpu(), w)
    paths = ["mma", "scaled_mm"]
    launches = [(s, nw) for s in (1, 2, 3, 4, 8) for nw in (1, 2, 4)]  # K parts x 64-row blocks per CTA
    for path in paths:
        for splits, nw in (launches if path == "mma" and m <= W.MMA_MAX_M else [(None, None)]):
            kw = dict(splits=splits, path=path, nw=nw)
            y = W.gemm(xq, xs, w, out_dtype=torch.float32, **kw)
            # both run on FP8 wgmma, whose fused k32 sums keep 13 bits below their largest term (measured on
            # the H100: <= 1.2e-4 for the mma path with its 32-code groups scaled in FP32, <= 2e-4 for cuBLASLt)
            rel = ((y.cpu().double() - ref).norm() / ref.norm()).item()
            assert rel < 5e-4, (kw, rel)
            assert torch.equal(y, W.gemm(xq, xs, w, out_dtype=torch.float32, **kw))
            yb = W.gemm(xq, xs, w, out_dtype=torch.bfloat16, **kw)
            assert ((yb.cpu().double() - ref).norm() / ref.norm()).item() < 4e-3


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 40])
def test_k_parts_over_ctas(m):
    """K parts over CTAs: two as one cluster (sums added through distributed shared memory), more
    through the workspace and its arrival counter; every reduction in part order, call after call and
    replayed from a CUDA graph."""
    from fp_export.runtime.fused_quant import quantize_rows

    n, k, g = 200, 2304, 64  # 18 chunks
    w = random_weight(n, k, g, seed=m, lorc=True, device="cuda")[0]
    xq, xs = quantize_rows(torch.randn(m, k, device="cuda"))
    ref = W.reference(xq.float().cpu(), xs.cpu(), w)
    # CTAs per column block (K parts / parts per CTA): 1 at (2, 1); 2 at (8, 1), (4, 2), (2, 4) up to 16
    # tokens; more at (8, 4), (9, 1), (18, 2)
    for splits, nw in ((2, 1), (8, 1), (4, 2), (2, 4), (8, 4), (9, 1), (18, 2)):
        kw = dict(out_dtype=torch.float32, path="mma", splits=splits, nw=nw)
        y = W.gemm(xq, xs, w, **kw)
        assert ((y.cpu().double() - ref).norm() / ref.norm()).item() < 5e-4, (splits, nw)
        for _ in range(2):
            assert torch.equal(y, W.gemm(xq, xs, w, **kw))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = W.gemm(xq, xs, w, **kw)
        g.replay()
        assert torch.equal(y, yg), (splits, nw)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,g", SHAPES)
def test_weight_to_fp8_is_exact(n, k, g):
    w, packed, shift, *_ = random_weight(n, k, g, seed=3, device="cuda")
    assert torch.equal(W.weight_to_fp8(w).view(torch.uint8).cpu(), reference_cast(packed, shift, g))


@gpu
@pytest.mark.gpu
def test_fused_quantizers_match_unfused():
    from fp_export.runtime.fused_quant import quantize_rows, rmsnorm_quant, silu_mul_quant

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(33, 1000, device="cuda", generator=g) * 4).bfloat16()
    x[3] = 0
    q, s = quantize_rows(x)
    amax = x.float().cpu().abs().amax(-1)  # CPU: CUDA divides by a scalar through its reciprocal
    ref_s = torch.where(amax > 0, amax, torch.ones_like(amax)) / 448
    assert torch.equal(s.cpu(), ref_s)
    assert torch.equal(q.float().cpu(), round_to_grid(x.float().cpu() / ref_s[:, None], FP8_E4M3))
    wn = (torch.rand(1000, device="cuda", generator=g) + 0.5).bfloat16()
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * wn
    q2, s2, y2 = rmsnorm_quant(x, wn, 1e-6, return_norm=True)
    assert (y2.float() - h.float()).abs().max() <= h.float().abs().max() * 2**-7  # rsqrt: at most 1 bf16 ulp
    qr, sr = quantize_rows(y2)
    assert torch.equal(s2, sr) and torch.equal(q2.float(), qr.float())
    gate, up = x[:, :500], x[:, 500:]
    ref = torch.nn.functional.silu(gate) * up
    q3, s3 = silu_mul_quant(gate, up)
    qr, sr = quantize_rows(ref)
    assert torch.allclose(s3, sr, rtol=2**-7) and (q3.float() != qr.float()).float().mean() < 0.01


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,h", [(1, 11008), (1, 4096), (5, 5000), (16, 11008), (64, 4096), (1, 32768)])
def test_split_rows_match_one_program_per_row(monkeypatch, m, h):
    """SiLU * mul + FP8 with rows split over programs (few rows, ``split_rule``) has the bits of
    one program per row: call after call (the arrival counters carry over), and replayed from a
    CUDA graph."""
    from fp_export.runtime import fused_quant as F

    assert F.split_rule(m, h, torch.device("cuda"))[0] > 1
    g = torch.Generator(device="cuda").manual_seed(h)
    x = (torch.randn(m, 2 * h, device="cuda", generator=g) * torch.logspace(-1, 2, 2 * h, device="cuda")).bfloat16()
    x[-1, : h // 3] = 0
    if m > 1:
        x[0, :h] = 0  # an all-zero row: scale 1/448

    def run():
        q, s = F.silu_mul_quant(x[:, :h], x[:, h:])
        return q.view(torch.uint8), s

    calls = [run() for _ in range(3)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append([o.clone() for o in captured])
    monkeypatch.setattr(F, "split_rule", F.one_program_per_row)
    q1, s1 = run()
    for q, s in calls + replays:
        assert torch.equal(q, q1) and torch.equal(s, s1)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")
def test_split_rule_keeps_every_program_resident(monkeypatch):
    """Split rows: at most one program per multiprocessor, parts of >= SPLIT_BLOCK values covering
    the row; one program per row on the CPU and when the rows alone fill the GPU."""
    from fp_export.runtime import fused_quant as F

    monkeypatch.setattr(F, "multiprocessors", lambda device: 132)
    cuda = torch.device("cuda")
    assert F.split_rule(1, 11008, cuda) == (11, 1024) and F.split_rule(16, 11008, cuda) == (6, 2048)
    assert F.split_rule(1, 11008, torch.device("cpu")) == (1, 16384) and F.split_rule(67, 11008, cuda) == (1, 16384)
    assert F.split_rule(8, 1000, cuda) == (1, 1024)
    for m in (1, 2, 7, 16, 33, 65):
        for h in (1000, 1025, 4096, 5000, 11008, 32768):
            split, part = F.split_rule(m, h, cuda)
            assert split * part >= h and (split == 1 or (m * split <= 132 and part >= F.SPLIT_BLOCK
                                                         and (split - 1) * part < h))
            assert split * F.SPLIT_BLOCK <= F.MAX_ROW  # a counter row per split count


def test_pdl_switch(monkeypatch):
    """Programmatic dependent launch: CUDA devices of capability >= 9.0 only, off with FP_EXPORT_PDL=0."""
    from fp_export.runtime import pdl

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("FP_EXPORT_PDL", raising=False)
    assert pdl.enabled("cuda:0") and not pdl.enabled("cpu")
    monkeypatch.setenv("FP_EXPORT_PDL", "0")
    assert not pdl.enabled("cuda:0")
    monkeypatch.setenv("FP_EXPORT_PDL", "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not pdl.enabled("cuda:0")


def test_launch_rule_fits_the_kernel():
    """The default launch shape stays within what plugins/w4a8_gemm.cu builds: row blocks from 9
    tokens on, the parts that one CTA's ``cta_warpgroups`` cannot hold over at most ``CLUSTER`` CTAs
    (one cluster), every part at least ``MIN_CHUNKS`` chunks; and it is the H100 sweep's best (within
    3%) on the decode shapes (benchmarks/w4a8_config_cluster.md)."""
    for m in (1, 8, 9, 16, 17, 32, 33, 64):
        for sub in (1, 2, 4):
            for n, k in ((8192, 8192), (12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (8192, 28672),
                         (96, 256), (17, 4096)):
                splits, nw = W.default_splits(m, n, k, sub), W.default_nw(m, n, sub)
                assert nw == 1 or (m > 8 and nw <= W.cta_warpgroups(m, sub)), (m, sub, n, k, nw)
                assert -(-splits // max(1, W.cta_warpgroups(m, sub) // nw)) <= W.CLUSTER, (m, sub, n, k, splits, nw)
                assert splits == 1 or -(-k // 128) // splits >= W.MIN_CHUNKS
    best = {(8192, 8192, 16): (4, 2), (8192, 8192, 32): (4, 2), (8192, 8192, 64): (2, 2), (12288, 4096, 16): (2, 2),
            (4096, 4096, 32): (4, 1), (22016, 4096, 32): (1, 4), (4096, 11008, 16): (4, 1), (22016, 4096, 64): (1, 2),
            (8192, 28672, 32): (4, 2), (8192, 28672, 64): (2, 2), (10240, 8192, 32): (2, 2)}
    for (n, k, m), launch in best.items():
        assert (W.default_splits(m, n, k), W.default_nw(m, n)) == launch, (n, k, m)


def test_auto_path_rule():
    """The wgmma kernel up to 64 tokens, up to 128 for the wide 70B weights (faster than the per-call
    cast on the H100), the cast beyond 64 for K=N=8192 and the 7B shapes; the tiled kernel from 129 to
    256 tokens, the cast beyond; up to 32 tokens with a kept FP8 copy (benchmarks/kernels.md)."""
    shapes = {(4096, 4096): False, (8192, 8192): False, (12288, 4096): False, (22016, 4096): False,
              (4096, 11008): False, (10240, 8192): True, (57344, 8192): True, (8192, 28672): True}
    for (n, k), wide in shapes.items():
        assert W.auto_path(64, n, k, False) == "mma" and W.auto_path(128, n, k, False) == ("mma" if wide else "scaled_mm")
        assert W.auto_path(129, n, k, False) == "mma" and W.auto_path(256, n, k, False) == "mma"
        assert W.auto_path(257, n, k, False) == "scaled_mm" and W.auto_path(4096, n, k, False) == "scaled_mm"
        assert W.auto_path(32, n, k, True) == "mma" and W.auto_path(33, n, k, True) == "scaled_mm"
        assert W.auto_path(256, n, k, True) == "scaled_mm"


def test_tiled_launch_rejects_a_split():
    """Beyond MMA_MAX_M tokens the mma path is one tiled launch: K parts or other row blocks are refused
    before anything runs."""
    w = random_weight(96, 256, 256, seed=1)[0]
    m = W.MMA_MAX_M + 1
    a = torch.zeros(m, 256).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="tiled"):
        W.gemm(a, torch.ones(m), w, path="mma", splits=2)
    with pytest.raises(ValueError, match="tiled"):
        W.gemm(a, torch.ones(m), w, path="mma", nw=4)
