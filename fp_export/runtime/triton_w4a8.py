"""Fused W4A8 GEMM in Triton: packed FP4 weights are shift-cast to FP8 E4M3 in registers and fed
to FP8 ``tl.dot`` (Hopper tensor cores); token scales and per-channel weight scales are applied in
the epilogue. Also a one-pass token-wise FP8 activation quantizer.

C[m, n] = (sum_k A[m, k] * W8[n, k]) * a_scale[m] * w_scale[n] (+ bias[n]), in bf16, where A is FP8
E4M3 [M, K], W8 = e4m3(fp4(codes) * 2**shift) (``fp_export.shiftcast``), w_scale the dequantization
scale of ``scales.shift_cast_params``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _configs():
    out = []
    for bm, bn, bk, warps, stages in [
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 32, 256, 4, 4), (16, 64, 256, 4, 3),
        (32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 128, 4, 4),
        (128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 64, 4, 4), (64, 256, 128, 8, 3),
    ]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return out


def _prune(configs, named_args, **kwargs):
    M, G = named_args["M"], kwargs.get("GROUP", named_args.get("GROUP"))
    keep = [c for c in configs if G % c.kwargs["BLOCK_K"] == 0
            and (c.kwargs["BLOCK_M"] <= 32) == (M <= 32)]
    return keep or [c for c in configs if G % c.kwargs["BLOCK_K"] == 0]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "GROUP"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w4a8_kernel(a_ptr, a_scale_ptr, w_ptr, shift_ptr, w_scale_ptr, bias_ptr, c_ptr, M, N, K,
                 stride_am, stride_wn, stride_sn, stride_cm,
                 GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_blocks
    pid_n = pid % n_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kh = tl.arange(0, BLOCK_K // 2)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
        p = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_kh)[None, :], mask=n_ok[:, None], other=0)
        sh = tl.load(shift_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0).to(tl.int32)
        codes = tl.reshape(tl.join(p & 0xF, p >> 4), (BLOCK_N, BLOCK_K)).to(tl.int32)
        e = (codes >> 1) & 3
        mant = codes & 1
        mag = tl.where(e == 0, mant * 0x30, ((e + 6) << 3) | (mant << 2))
        mag = tl.where(mag != 0, mag + (sh[:, None] << 3), 0)
        bits = (((codes >> 3) & 1) << 7) | mag
        w = bits.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        acc = tl.dot(a, tl.trans(w), acc)
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
    acc = acc * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(tl.bfloat16),
             mask=m_ok[:, None] & n_ok[None, :])


def w4a8_matmul(a_fp8: torch.Tensor, a_scale: torch.Tensor, packed: torch.Tensor, shift: torch.Tensor,
                w_scale: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a_fp8 float8_e4m3fn [M, K], a_scale float32 [M], packed uint8 [N, K/2], shift int8 [N, K/G],
    w_scale float32 [N], bias float32 [N] or None -> bfloat16 [M, N]."""
    M, K = a_fp8.shape
    N = packed.shape[0]
    if packed.shape[1] * 2 != K or K % group_size or group_size % 64:
        raise ValueError(f"w4a8_matmul: K={K}, packed {tuple(packed.shape)}, group {group_size} (needs a multiple of 64)")
    c = torch.empty(M, N, dtype=torch.bfloat16, device=a_fp8.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _w4a8_kernel[grid](a_fp8, a_scale, packed, shift, w_scale, bias if bias is not None else w_scale, c, M, N, K,
                       a_fp8.stride(0), packed.stride(0), shift.stride(0), c.stride(0),
                       GROUP=group_size, HAS_BIAS=bias is not None)
    return c


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, FMAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    m = tl.max(amax, axis=0)
    s = tl.where(m > 0, m, 1.0) / FMAX
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        y = tl.clamp(tl.math.div_rn(x, s), -FMAX, FMAX)
        tl.store(q_ptr + row * stride_q + offs, y.to(tl.float8e4nv), mask=offs < K)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise FP8 E4M3 quantization of x [M, K] (any float dtype) in one kernel:
    (float8_e4m3fn [M, K], scale float32 [M]) with scale = max|x| / 448 (1/448 for a zero row),
    values round-to-nearest-even and saturated, as ``formats.round_to_grid``."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    _quant_rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), FMAX=448.0, BLOCK=1024)
    return q, s
