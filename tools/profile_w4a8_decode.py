"""A few calls of the W4A8 decode kernel at M=1 and M=16, K=N=8192 (for ncu)."""
import torch

from fp_export.runtime import w4a8_gemm as W
from fp_export.runtime.fused_quant import quantize_rows

n = k = 8192
w = W.prepare(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda"),
              torch.randint(-2, 3, (n, k // 256), dtype=torch.int8, device="cuda"), 256, torch.rand(n, device="cuda"))
for m in (1, 16, 1):
    xq, xs = quantize_rows(torch.randn(m, k, device="cuda"))
    W.gemm(xq, xs, w)
torch.cuda.synchronize()
