"""Fused W4A8 GEMM in Triton: packed FP4 weights are shift-cast to FP8 E4M3 in registers and fed
to FP8 ``tl.dot`` (Hopper tensor cores); token scales and per-channel weight scales are applied in
the epilogue. Also a one-pass token-wise FP8 activation quantizer.

C[m, n] = (sum_k A[m, k] * W8[n, k]) * a_scale[m] * w_scale[n] (+ bias[n]), in bf16, where A is FP8
E4M3 [M, K], W8 = e4m3(fp4(codes) * 2**shift) (``fp_export.numerics.fp4_to_fp8``), w_scale the dequantization
scale of ``scales.shift_cast_params``. The weights are repacked once (``repack_split``) so that
each byte's two nibbles belong to the two halves of a 128-wide K block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp_export.runtime.layout import BLOCK_K


# Eight FP4 codes (one 32-bit word of the split layout: byte j = low code j, high code j + 64) and
# the group's shift k (replicated in each byte of $3) -> two words of four E4M3 bytes. The 8-entry
# magnitude table {0, 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48, 0x4C} gets k << 3 added to its non-zero
# bytes (carry-free per-byte add), and PRMT looks up four 3-bit selectors at once.
_DECODE_ASM = tl.constexpr("""
{
.reg .b32 add, hb, tlo, thi, x, y, sel, mag, sgn;
shl.b32 add, $3, 3;
and.b32 add, add, 0xF8F8F8F8;
and.b32 hb, add, 0x80808080;
and.b32 x, add, 0x7F7F7F00;
add.u32 tlo, x, 0x3C383000;
and.b32 x, hb, 0xFFFFFF00;
xor.b32 tlo, tlo, x;
and.b32 x, add, 0x7F7F7F7F;
add.u32 thi, x, 0x4C484440;
xor.b32 thi, thi, hb;
and.b32 x, $2, 0x07070707;
shr.u32 y, x, 4;
or.b32 y, x, y;
shr.u32 x, y, 8;
and.b32 x, x, 0xFF00;
and.b32 y, y, 0xFF;
or.b32 sel, x, y;
prmt.b32 mag, tlo, thi, sel;
shl.b32 sgn, $2, 4;
and.b32 sgn, sgn, 0x80808080;
or.b32 $0, mag, sgn;
shr.u32 x, $2, 4;
and.b32 x, x, 0x07070707;
shr.u32 y, x, 4;
or.b32 y, x, y;
shr.u32 x, y, 8;
and.b32 x, x, 0xFF00;
and.b32 y, y, 0xFF;
or.b32 sel, x, y;
prmt.b32 mag, tlo, thi, sel;
and.b32 sgn, $2, 0x80808080;
or.b32 $1, mag, sgn;
}
""")


@triton.jit
def _decode_int(codes, k):
    """E4M3 bits (int32) of 4-bit codes (int32) times 2**k, by integer arithmetic."""
    x = codes & 7
    mag = tl.where(x < 2, x * 0x30, (x << 2) + 0x30)
    mag = tl.where(x != 0, mag + (k << 3), 0)
    return mag | ((codes & 8) << 4)


def _configs():
    out = []
    for bm, bn, warps, stages in [(16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 4), (16, 64, 4, 6),
                                  (64, 64, 4, 4), (64, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3)]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return out


def _prune(configs, named_args, **kwargs):
    M = named_args["M"]
    small = [c for c in configs if c.kwargs["BLOCK_M"] == 16]
    return small if M <= 16 else [c for c in configs if c.kwargs["BLOCK_M"] > 16 or M <= 64]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "GROUP", "ASM"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _w4a8_kernel(a_ptr, a_scale_ptr, w_ptr, shift_ptr, w_scale_ptr, bias_ptr, c_ptr, M, N, K,
                 stride_am, stride_wn, stride_sn, stride_cm,
                 GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr = BLOCK_K):
    HALF: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_blocks
    pid_n = pid % n_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_lo = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_h)[None, :], mask=m_ok[:, None], other=0.0)
        a_hi = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + HALF + offs_h)[None, :], mask=m_ok[:, None],
                       other=0.0)
        p = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_h)[None, :], mask=n_ok[:, None], other=0)
        k = tl.load(shift_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0)
        if ASM:
            kb = tl.broadcast_to(k[:, None], (BLOCK_N, HALF)).to(tl.uint8, bitcast=True)
            w_lo, w_hi = tl.inline_asm_elementwise(_DECODE_ASM, "=r,=r,r,r", [p, kb],
                                                   dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
        else:
            codes = p.to(tl.int32)
            k32 = k.to(tl.int32)[:, None]
            w_lo = _decode_int(codes & 0xF, k32).to(tl.uint8)
            w_hi = _decode_int(codes >> 4, k32).to(tl.uint8)
        acc = tl.dot(a_lo, tl.trans(w_lo.to(tl.float8e4nv, bitcast=True)), acc)
        acc = tl.dot(a_hi, tl.trans(w_hi.to(tl.float8e4nv, bitcast=True)), acc)
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
    acc = acc * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(tl.bfloat16),
             mask=m_ok[:, None] & n_ok[None, :])


def _small_configs():
    return [triton.Config({"BLOCK_N": bn, "SPLIT_K": sk}, num_warps=4, num_stages=st)
            for bn in (64, 128) for sk in (1, 2, 4, 8) for st in (4, 6)]


def _small_prune(configs, named_args, **kwargs):
    K = named_args["K"]
    return [c for c in configs if K % (c.kwargs["SPLIT_K"] * BLOCK_K) == 0]


@triton.autotune(configs=_small_configs(), key=["M", "N", "K", "GROUP"], reset_to_zero=["c_ptr"],
                 prune_configs_by={"early_config_prune": _small_prune})
@triton.jit
def _w4a8_small_m_kernel(a_ptr, a_scale_ptr, w_ptr, shift_ptr, w_scale_ptr, bias_ptr, c_ptr, M, N, K,
                         stride_am, stride_wn, stride_sn, stride_cm,
                         GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr = BLOCK_K):
    """Few tokens: C^T = W A^T, so the decoded weights are the MMA's M side (64+ rows per
    warpgroup) and the tokens its N side; K split over SPLIT_K programs that add into float32 C."""
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, HALF)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_len = K // SPLIT_K
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(pid_k * k_len, (pid_k + 1) * k_len, BLOCK_K):
        a_lo = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_h)[None, :], mask=m_ok[:, None], other=0.0)
        a_hi = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + HALF + offs_h)[None, :], mask=m_ok[:, None],
                       other=0.0)
        p = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_h)[None, :], mask=n_ok[:, None], other=0)
        k = tl.load(shift_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0)
        kb = tl.broadcast_to(k[:, None], (BLOCK_N, HALF)).to(tl.uint8, bitcast=True)
        w_lo, w_hi = tl.inline_asm_elementwise(_DECODE_ASM, "=r,=r,r,r", [p, kb],
                                               dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
        acc = tl.dot(w_lo.to(tl.float8e4nv, bitcast=True), tl.trans(a_lo), acc)
        acc = tl.dot(w_hi.to(tl.float8e4nv, bitcast=True), tl.trans(a_hi), acc)
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
    acc = acc * w_scale[:, None] * a_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok & (pid_k == 0), other=0.0)
        acc += bias[:, None]
    ptrs = c_ptr + offs_m[None, :] * stride_cm + offs_n[:, None]
    mask = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


SMALL_M = 64  # at most this many tokens may take the swapped, split-K kernel
SPLIT_MIN_WEIGHTS = 48 * 2**20  # ... when the weight has at least this many elements (H100: 8192^2 yes, 4096^2 no)


def w4a8_matmul(a_fp8: torch.Tensor, a_scale: torch.Tensor, split: torch.Tensor, shift: torch.Tensor,
                w_scale: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                asm: bool = True, kernel: str = "auto") -> torch.Tensor:
    """a_fp8 float8_e4m3fn [M, K], a_scale float32 [M], split uint8 [N, K/2] (``repack_split`` of
    the standard packing), shift int8 [N, K/G], w_scale float32 [N], bias float32 [N] or None ->
    [M, N]. ``kernel``: "split" (swapped split-K, float32 out; float atomics, so the summation
    order may vary between runs), "tile" (bfloat16 out) or "auto" (split for at most SMALL_M tokens
    and weights of at least SPLIT_MIN_WEIGHTS elements, as measured in tools/bench_kernels.py).
    ``asm``: tile kernel decodes with the packed PTX routine (else plain Triton integer ops)."""
    M, K = a_fp8.shape
    N = split.shape[0]
    if split.shape[1] * 2 != K or K % group_size or group_size % BLOCK_K:
        raise ValueError(f"w4a8_matmul: K={K}, weights {tuple(split.shape)}, group {group_size} "
                         f"(needs a multiple of {BLOCK_K})")
    bias_arg = bias if bias is not None else w_scale
    if kernel == "auto":
        kernel = "split" if M <= SMALL_M and N * K >= SPLIT_MIN_WEIGHTS and asm else "tile"
    if kernel == "split":
        c = torch.zeros(M, N, dtype=torch.float32, device=a_fp8.device)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _w4a8_small_m_kernel[grid](a_fp8, a_scale, split, shift, w_scale, bias_arg, c, M, N, K,
                                   a_fp8.stride(0), split.stride(0), shift.stride(0), c.stride(0),
                                   GROUP=group_size, HAS_BIAS=bias is not None,
                                   BLOCK_M=max(16, triton.next_power_of_2(M)))
        return c
    c = torch.empty(M, N, dtype=torch.bfloat16, device=a_fp8.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _w4a8_kernel[grid](a_fp8, a_scale, split, shift, w_scale, bias_arg, c, M, N, K,
                       a_fp8.stride(0), split.stride(0), shift.stride(0), c.stride(0),
                       GROUP=group_size, HAS_BIAS=bias is not None, ASM=asm)
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
    s = tl.math.div_rn(tl.where(m > 0, m, 1.0), FMAX)
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
