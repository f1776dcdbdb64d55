"""Attention of a decode step (one query token per sequence) over the engine's static KV cache, in
one Triton kernel, split over cache positions (flash-decoding), with the o projection's FP8 token
quantization fused (CUDA tensors; Triton's interpreter on the CPU).

Program (b * NKV + j, part) computes the query heads of KV head j (all NH / NKV of them: the K/V
bytes are read once per group) of sequence b against positions [part * chunk, min((part + 1) *
chunk, pos0 + 1)): only the positions written so far are read, never the rest of the cache.
Q K^T on bf16 tensor cores (exact products, float32 sums), scaled by log2(e) / sqrt(D), softmax
in float32 with base-2 exponentials; P V on bf16 tensor cores with P split into two bf16 terms
(relative error 2^-17), float32 sums.

With several parts per KV head, each stores its (unnormalized sums [D], running maxima, sums of
weights) per query head and arrives at its KV head's counter; the last to arrive combines the
parts, one query head at a time. With ``quantize``, the program that completes a KV head stores its heads in bf16 and
arrives at its sequence's counter; the last of the sequence reads the bf16 row back and quantizes
it with the token quantizer of ``runtime.fused_quant`` (s = max|y| / 448, q = e4m3(y / s)): the
same bits as ``quantize_rows`` on the bf16 output. Arrival needs no program to wait for another
(the last one does the work), so any number of programs may be launched. Counters only grow
(``fused_quant.stream_scratch``), one set per (batch rounded up to a power of two, part count,
head counts).

The decode engine runs it for models without GQA; with GQA cuDNN's SDPA measured faster on the
H100 (benchmarks/attention.md: the per-head combine is a chain of L2 round trips).

Output: bf16 [B, NH * D] (heads concatenated, the o projection's input), or with ``quantize``
(float8_e4m3fn [B, NH * D], float32 [B]).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fp_export.runtime.fused_quant import (FP8_MAX, alloc_quantized, amax_of, dependent_launch, launch_options,
                                           multiprocessors, quant_store, round_bf16, stream_scratch)

# BLOCK_N, NUM_WARPS, PROGRAMS_PER_SM: of 32/64 x 4/8 x 2/4/8, the most even against cuDNN SDPA on
# the H100 over batch 1-32 and 100-4000 positions without GQA (benchmarks/attention.md)
BLOCK_N = 64  # cache positions per step of a program
NUM_WARPS = 4
PROGRAMS_PER_SM = 4  # parts are added until every multiprocessor has this many programs
MAX_PARTS = 64


@triton.jit
def _arrive(cnt_ptr, idx, n):
    """Arrival at counter ``idx`` after this program's stores; True for the last of ``n``."""
    tl.debug_barrier()  # the program's stores are issued before the arrival releases them
    seen = tl.atomic_add(cnt_ptr + idx, 1, sem="acq_rel", scope="gpu") + 1
    tl.debug_barrier()
    return seen % n == 0


@triton.jit
def _mm(a, b, F32: tl.constexpr):
    """a @ b with float32 sums: bf16 operands on the tensor cores, or converted to float32 (F32:
    Triton's interpreter multiplies bf16 operands as integers)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, q8_ptr, s_ptr, part_ptr, cnt_ptr, row_cnt_ptr,
                             NH, NKV, CHUNK, scale_log2, stride_qb, stride_qh, stride_cb, stride_ch, stride_cp,
                             stride_o, stride_q8, FMAX: tl.constexpr, QB: tl.constexpr, GROUP: tl.constexpr,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr,
                             PARTS_P2: tl.constexpr, QUANT: tl.constexpr, ROW: tl.constexpr, F32: tl.constexpr,
                             USE_GDC: tl.constexpr):
    dependent_launch(USE_GDC, True)
    kv_row = tl.program_id(0)  # b * NKV + KV head
    part = tl.program_id(1)
    b = kv_row // NKV
    kvh = kv_row % NKV
    r = tl.arange(0, QB)  # the KV head's query heads (GROUP of QB rows)
    rm = r < GROUP
    h = kvh * GROUP + r
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + d[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
    kv = b * stride_cb + kvh * stride_ch
    end = tl.minimum((part + 1) * CHUNK, tl.load(pos_ptr) + 1)
    m = tl.full([QB], float("-inf"), tl.float32)
    total = tl.zeros([QB], tl.float32)
    acc = tl.zeros([QB, BLOCK_D], tl.float32)
    n0 = part * CHUNK
    while n0 < end:  # (a while loop: Triton's interpreter cannot range over program-dependent bounds)
        n = n0 + tl.arange(0, BLOCK_N)
        ok = n < end
        at = kv + n[:, None] * stride_cp + d[None, :]
        k = tl.load(k_ptr + at, mask=ok[:, None] & dm[None, :], other=0.0)
        v = tl.load(v_ptr + at, mask=ok[:, None] & dm[None, :], other=0.0)
        score = tl.where(ok[None, :], _mm(q, tl.trans(k), F32) * scale_log2, float("-inf"))  # [QB, BLOCK_N]
        m_new = tl.maximum(m, tl.max(score, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(score - m_new[:, None])
        p_hi = p.to(tl.bfloat16)  # P V on bf16 tensor cores, P as the sum of two bf16 terms (2^-17 relative)
        p_lo = (p - p_hi.to(tl.float32)).to(tl.bfloat16)
        acc = acc * alpha[:, None] + _mm(p_hi, v, F32) + _mm(p_lo, v, F32)
        total = total * alpha + tl.sum(p, axis=1)
        m = m_new
        n0 += BLOCK_N
    base = b * stride_o + kvh * GROUP * D  # this KV head's query heads in the output row
    if PARTS == 1:
        y = round_bf16(acc / tl.where(rm, total, 1.0)[:, None])
        tl.store(o_ptr + base + r[:, None] * D + d[None, :], y.to(tl.bfloat16), mask=rm[:, None] & dm[None, :])
        done = True
    else:  # part_ptr float32 [b * NH + h, PARTS_P2, BLOCK_D + 2]: the sum, the max, the sum of weights
        mine = part_ptr + ((b * NH + h) * PARTS_P2 + part) * (BLOCK_D + 2)
        tl.store(mine[:, None] + d[None, :], acc, mask=rm[:, None])
        tl.store(mine + BLOCK_D, m, mask=rm)
        tl.store(mine + BLOCK_D + 1, total, mask=rm)
        done = _arrive(cnt_ptr, kv_row, PARTS)
        if done:  # the last part of the KV head combines the parts, one query head at a time
            j = tl.arange(0, PARTS_P2)
            for g in range(GROUP):
                theirs = part_ptr + ((b * NH + kvh * GROUP + g) * PARTS_P2 + j) * (BLOCK_D + 2)
                mj = tl.load(theirs + BLOCK_D, mask=j < PARTS, other=float("-inf"), cache_modifier=".cg")
                w = tl.exp2(mj - tl.max(mj, axis=0))  # part 0 holds position 0: the max is finite
                lj = tl.load(theirs + BLOCK_D + 1, mask=j < PARTS, other=0.0, cache_modifier=".cg")
                oj = tl.load(theirs[:, None] + d[None, :], mask=(j < PARTS)[:, None], other=0.0, cache_modifier=".cg")
                y = round_bf16(tl.sum(w[:, None] * oj, axis=0) / tl.sum(w * lj, axis=0))
                tl.store(o_ptr + base + g * D + d, y.to(tl.bfloat16), mask=dm)
    if QUANT:  # the last KV head of the sequence quantizes its row
        if done:
            if _arrive(row_cnt_ptr, b, NKV):
                i = tl.arange(0, ROW)
                ok_row = i < NH * D
                yr = tl.load(o_ptr + b * stride_o + i, mask=ok_row, other=0.0, cache_modifier=".cg").to(tl.float32)
                quant_store(yr, amax_of(yr, ok_row), i, ok_row, q8_ptr, s_ptr, b, stride_q8, True, FMAX)


def part_rule(batch: int, kv_heads: int, length: int, device: torch.device) -> tuple[int, int]:
    """(parts per KV head, positions per part) for ``length`` cache positions: the fewest parts
    that give every multiprocessor ``PROGRAMS_PER_SM`` programs, each part at least ``BLOCK_N``
    positions (a multiple of it), at most ``MAX_PARTS``; one part on the CPU."""
    want = -(-PROGRAMS_PER_SM * multiprocessors(device) // (batch * kv_heads)) if device.type == "cuda" else 1
    return _split(length, max(1, min(want, MAX_PARTS, -(-length // BLOCK_N))))


def _split(length: int, parts: int) -> tuple[int, int]:
    """(parts, positions per part) of ``length`` positions in at most ``parts`` parts of whole
    ``BLOCK_N`` steps (fewer where the rounding leaves the last ones empty)."""
    chunk = -(-length // (parts * BLOCK_N)) * BLOCK_N
    return -(-length // chunk), chunk


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos0: torch.Tensor,
                     length: int, quantize: bool = False, parts: int | None = None):
    """q bf16 [B, NH, 1, D] (the step's rotated queries; unit last stride), caches bf16 [>= B, NKV,
    S, D] (unit last stride; positions 0 .. pos0 written), pos0 int64 [1] (the step's position,
    pos0 < length <= S), ``length``: the positions the graph was sized for (sets the parts).
    -> bf16 [B, NH * D], or with ``quantize`` (float8_e4m3fn [B, NH * D], float32 [B]).
    ``parts``: parts per KV head (default ``part_rule``)."""
    b, nh, t, d = q.shape
    nkv, s_len = k_cache.shape[1], k_cache.shape[2]
    if t != 1 or nh % nkv or k_cache.shape[0] < b or k_cache.shape[3] != d or length > s_len:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} against a cache {tuple(k_cache.shape)} of "
                         f"{length} positions (one token per sequence, heads a multiple of KV heads)")
    parts, chunk = part_rule(b, nkv, length, q.device) if parts is None else _split(length, parts)
    block_d = triton.next_power_of_2(d)
    out = torch.empty(b, nh * d, dtype=torch.bfloat16, device=q.device)
    q8, s = alloc_quantized(b, nh * d, q.device) if quantize else (out, out)
    rows = triton.next_power_of_2(b)  # scratch for this many sequences (a key of its own: counters never mix)
    part_buf, cnt, row_cnt = stream_scratch(q.device, ("attention", rows, parts, nh, nkv, block_d), lambda: (
        torch.empty(rows * nh * triton.next_power_of_2(parts) * (block_d + 2), dtype=torch.float32, device=q.device),
        torch.zeros(rows * nkv, dtype=torch.int64, device=q.device),
        torch.zeros(rows, dtype=torch.int64, device=q.device)))
    _decode_attention_kernel[(b * nkv, parts)](
        q, k_cache, v_cache, pos0, out, q8, s, part_buf, cnt, row_cnt, nh, nkv, chunk,
        math.log2(math.e) / math.sqrt(d), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), out.stride(0), q8.stride(0), FMAX=FP8_MAX, QB=max(16, triton.next_power_of_2(nh // nkv)),
        GROUP=nh // nkv, D=d, BLOCK_D=block_d, BLOCK_N=BLOCK_N, PARTS=parts, PARTS_P2=triton.next_power_of_2(parts),
        QUANT=quantize, ROW=triton.next_power_of_2(nh * d), F32=not q.is_cuda, num_warps=NUM_WARPS, **launch_options(q))
    return (q8, s) if quantize else out


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               pos0: torch.Tensor) -> torch.Tensor:
    """``decode_attention``'s value in float64 (PyTorch ops, any device): float64 [B, NH * D]."""
    b, nh, _, d = q.shape
    n = int(pos0) + 1
    k, v = (c[:b, :, :n].double().repeat_interleave(nh // c.shape[1], dim=1) for c in (k_cache, v_cache))
    w = torch.softmax((q.double() @ k.transpose(-1, -2)) / math.sqrt(d), dim=-1)
    return (w @ v).reshape(b, nh * d)
