"""Launch each W4A8 kernel once at a fixed configuration, for Nsight Compute:

    ncu --kernel-name regex:w4a8 --section SpeedOfLight --section WarpStateStats \\
        python tools/profile_w4a8.py --m 1 --kn 8192

Fixed configurations (no autotuning) so the profiled launch is the one named here.
"""

from __future__ import annotations

import argparse

import torch
import triton

from fp_export.runtime.layout import repack_split
from fp_export.runtime.triton_w4a8 import _w4a8_kernel, _w4a8_small_m_kernel, quantize_rows_fp8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--kn", type=int, default=8192)
    ap.add_argument("--split-k", type=int, default=2)
    args = ap.parse_args()
    m, n, k, group = args.m, args.kn, args.kn, 256
    dev = "cuda"
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
    split = repack_split(packed)
    shift = torch.randint(-2, 3, (n, k // group), dtype=torch.int8, device=dev)
    w_scale = torch.rand(n, device=dev)
    xq, xs = quantize_rows_fp8(torch.randn(m, k, device=dev))
    c32 = torch.zeros(m, n, device=dev)
    bm = max(16, triton.next_power_of_2(m))
    _w4a8_small_m_kernel.fn[(triton.cdiv(n, 64), args.split_k)](
        xq, xs, split, shift, w_scale, w_scale, c32, m, n, k, xq.stride(0), split.stride(0), shift.stride(0),
        c32.stride(0), GROUP=group, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=64, SPLIT_K=args.split_k,
        num_warps=4, num_stages=4)
    c16 = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
    _w4a8_kernel.fn[(triton.cdiv(m, bm) * triton.cdiv(n, 32),)](
        xq, xs, split, shift, w_scale, w_scale, c16, m, n, k, xq.stride(0), split.stride(0), shift.stride(0),
        c16.stride(0), GROUP=group, HAS_BIAS=False, ASM=True, BLOCK_M=bm, BLOCK_N=32, num_warps=4, num_stages=4)
    torch.cuda.synchronize()
    print("ok", m, n, k)


if __name__ == "__main__":
    main()
