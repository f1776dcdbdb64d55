"""Rotary position embedding and the KV-cache write of a decode or prefill step in one Triton
kernel (CUDA tensors; Triton's interpreter on the CPU).

Numerics are Hugging Face ``apply_rotary_pos_emb`` on bf16 tensors, op by op: q * cos and
rotate_half(q) * sin each rounded to bf16, their sum rounded to bf16 (rotate_half(x) =
cat(-x[d/2:], x[:d/2])). One program per (token, head) of the fused q|k|v projection output:
query heads are written rotated to ``q`` [B, NH, T, D], key heads rotated and value heads as they
are to the caches at positions pos0 .. pos0 + T - 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp_export.runtime.fused_quant import round_bf16


@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, T, NH, NKV,
                       stride_row, stride_cs, stride_qb, stride_qh, stride_qt, stride_cb, stride_ch, stride_cp,
                       D: tl.constexpr):
    row = tl.program_id(0)  # b * T + t
    head = tl.program_id(1)  # query heads, then key heads, then value heads
    b = row // T
    t = row % T
    d = tl.arange(0, D)
    src = qkv_ptr + row * stride_row + head * D
    x = tl.load(src + d).to(tl.float32)
    pos = tl.load(pos_ptr) + t
    if head < NH + NKV:
        half = D // 2
        partner = tl.load(src + (d + half) % D).to(tl.float32)
        rot = tl.where(d < half, -partner, partner)
        c = tl.load(cos_ptr + row * stride_cs + d).to(tl.float32)
        s = tl.load(sin_ptr + row * stride_cs + d).to(tl.float32)
        y = round_bf16(round_bf16(x * c) + round_bf16(rot * s)).to(tl.bfloat16)
        if head < NH:
            tl.store(q_ptr + b * stride_qb + head * stride_qh + t * stride_qt + d, y)
        else:
            tl.store(kc_ptr + b * stride_cb + (head - NH) * stride_ch + pos * stride_cp + d, y)
    else:
        tl.store(vc_ptr + b * stride_cb + (head - NH - NKV) * stride_ch + pos * stride_cp + d, x.to(tl.bfloat16))


def rope_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos0: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, batch: int, heads: int, kv_heads: int) -> torch.Tensor:
    """qkv bf16 [B*T, (NH + 2*NKV) * D] (rows b-major; unit column stride), cos/sin bf16 [B, T, D]
    (contiguous), pos0 int64 [1] (position of token 0), caches bf16 [>= B, NKV, S, D] (unit last
    stride; S > pos0 + T - 1) -> q bf16 [B, NH, T, D]; writes K (rotated) and V into the caches.
    A head size that is not a power of two takes ``rope_cache_reference``."""
    rows, width = qkv.shape
    d = cos.shape[-1]
    if d & (d - 1):  # tl.arange needs a power of two
        return rope_cache_reference(qkv, cos, sin, pos0, k_cache, v_cache, batch, heads, kv_heads)
    if width != (heads + 2 * kv_heads) * d or qkv.stride(1) != 1 or rows % batch:
        raise ValueError(f"rope_cache: qkv {tuple(qkv.shape)} is not {batch} x T rows of {heads}+2*{kv_heads} heads of {d}")
    t = rows // batch
    cos, sin = cos.contiguous(), sin.contiguous()
    q = torch.empty(batch, heads, t, d, dtype=torch.bfloat16, device=qkv.device)
    _rope_cache_kernel[(rows, heads + 2 * kv_heads)](
        qkv, cos, sin, pos0, q, k_cache, v_cache, t, heads, kv_heads, qkv.stride(0), cos.stride(1),
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), D=d)
    return q


def rope_cache_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos0: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, batch: int, heads: int,
                         kv_heads: int) -> torch.Tensor:
    """``rope_cache`` in PyTorch ops (Hugging Face ``apply_rotary_pos_emb``, ``index_copy_``): any
    device, any head size; q contiguous."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d = cos.shape[-1]
    t = qkv.shape[0] // batch
    q, k, v = (x.reshape(batch, t, n, d).transpose(1, 2)
               for x, n in zip(qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1), (heads, kv_heads, kv_heads)))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    pos = pos0 + torch.arange(t, device=qkv.device)
    k_cache[:batch].index_copy_(2, pos, k.to(k_cache.dtype))
    v_cache[:batch].index_copy_(2, pos, v.to(v_cache.dtype))
    return q.contiguous()
