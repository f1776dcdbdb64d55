"""One block of GPTQ columns as one Triton kernel: ``quant.gptq._quantize_block`` for blocks whose
group scales are all fixed before the block's first column, bit for bit.

Each program owns ``ROWS`` rows of the block [out, b <= 128] in registers and runs the column loop
on them: round column i onto the grid with its group's scale, write its code and scaled error
(w - q) / Hinv[i, i], and subtract err * Hinv[i, j] from every column j >= i. Rows are independent
in GPTQ, so the programs never communicate; the per-column launches of the eager loop (about
eight per column) become one launch per block.

Bit-exactness with the eager loop, which the tests check on the GPU (and in Triton's interpreter
on the CPU): divisions are IEEE round-to-nearest (``tl.div_rn``), multiply-subtract is not fused
into FMA (``enable_fp_fusion=False``), round-half-to-even is the float32 2**23 addition, and
powers of two are built from their bits; the column is read from the register tile with ``max``
over a one-hot mask, which keeps the sign of zero.

Which blocks qualify (``quant.gptq._BlockPlan.scales_before``): static groups (act-order, per
channel), or groups that begin at the block's first column; a group fitted mid-block (groups
narrower than the block, or a group boundary inside it) takes the eager or graphed loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp_export.quant.quantizer import WeightQuantizer

ROWS = 16  # rows per program: a [16, 128] float32 tile is 16 registers a thread at 4 warps
COLUMNS = 128  # the widest block (quant.gptq's block_size), the tile's width
_CONSTRAINT = {"none": 0, "m1": 1, "m2": 2}


@triton.jit
def _pow2(k):
    """2.0**k for int32 k in [-126, 127], exact (built from the exponent bits)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _floor_log2(a):
    """floor(log2(a)) for normal positive float32 a, int32."""
    return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _rint(a):
    """Round-half-to-even of float32 0 <= a < 2**22 (the 2**23 addition rounds to an integer)."""
    return (a + 8388608.0) - 8388608.0


@triton.jit
def _with_sign_of(mag, x):
    """copysign(mag, x) for float32 mag >= 0."""
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _round_encode(x, IS_INT: tl.constexpr, BITS: tl.constexpr, MAXV: tl.constexpr, MBITS: tl.constexpr,
                  MIN_EXP: tl.constexpr, BIAS: tl.constexpr):
    """``numerics.formats.encode`` and ``decode`` of float32 x: (codes int32, decoded values)."""
    if IS_INT:
        q = _rint(tl.minimum(tl.abs(x), MAXV))
        qi = tl.where(x < 0, -q, q).to(tl.int32)
        code = qi & ((1 << BITS) - 1)
        value = qi.to(tl.float32)
    else:
        a = tl.minimum(tl.abs(x), MAXV)
        e = tl.maximum(_floor_log2(tl.maximum(a, 1.1754943508222875e-38)), MIN_EXP)
        quantum = _pow2(e - MBITS)
        q = tl.minimum(_rint(tl.div_rn(a, quantum)) * quantum, MAXV)
        eq = _floor_log2(tl.maximum(q, 1.1754943508222875e-38))
        normal = eq >= MIN_EXP
        eq = tl.where(normal, eq, MIN_EXP)
        mant = (q * _pow2(MBITS - eq)).to(tl.int32)
        mant = tl.where(normal, mant - (1 << MBITS), mant)
        efield = tl.where(normal, eq + BIAS, 0)
        sign = (x.to(tl.int32, bitcast=True) >> 31) & 1
        code = (sign << (BITS - 1)) | (efield << MBITS) | mant
        value = _with_sign_of(q, x)
    return code, value


@triton.jit
def _gptq_block(W, Err, Codes, Hinv, Scale, Exp, RowScale, Group, out_f,
                stride_w, stride_e, stride_c, stride_h, stride_s, stride_x,
                b: tl.constexpr, ROWS: tl.constexpr, B: tl.constexpr, IS_INT: tl.constexpr, BITS: tl.constexpr,
                MAXV: tl.constexpr, MBITS: tl.constexpr, MIN_EXP: tl.constexpr, BIAS: tl.constexpr,
                CONSTRAINT: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, B)
    rm = r < out_f
    m = rm[:, None] & (c < b)[None, :]
    w = tl.load(W + r[:, None] * stride_w + c[None, :], mask=m, other=0.0)
    err_t = tl.zeros([ROWS, B], tl.float32)
    code_t = tl.zeros([ROWS, B], tl.int32)
    if CONSTRAINT == 2:
        row_scale = tl.load(RowScale + r, mask=rm, other=1.0)
    for i in range(b):
        col = tl.max(tl.where(c[None, :] == i, w, float("-inf")), axis=1)
        g = tl.load(Group + i)
        s = tl.load(Scale + r * stride_s + g, mask=rm, other=1.0)
        code, q = _round_encode(tl.div_rn(col, s), IS_INT, BITS, MAXV, MBITS, MIN_EXP, BIAS)
        if CONSTRAINT == 0:
            dq = q * s
        else:  # ldexp(q, e) in two exact steps, then (M2) times the row scale
            e = tl.load(Exp + r * stride_x + g, mask=rm, other=0).to(tl.int32)
            half = e >> 1
            dq = q * _pow2(half) * _pow2(e - half)
            if CONSTRAINT == 2:
                dq = dq * row_scale
        err = tl.div_rn(col - dq, tl.load(Hinv + i * stride_h + i))
        h = tl.load(Hinv + i * stride_h + c, mask=(c >= i) & (c < b), other=0.0)
        w = tl.where(c[None, :] >= i, w - err[:, None] * h[None, :], w)
        err_t = tl.where(c[None, :] == i, err[:, None], err_t)
        code_t = tl.where(c[None, :] == i, code[:, None], code_t)
    tl.store(Err + r[:, None] * stride_e + c[None, :], err_t, mask=m)
    tl.store(Codes + r[:, None] * stride_c + c[None, :], code_t.to(tl.uint8), mask=m)


def quantize_block(W1: torch.Tensor, Hinv1: torch.Tensor, quantizer: WeightQuantizer, col_group: torch.Tensor,
                   Err1: torch.Tensor, codes1: torch.Tensor) -> None:
    """The column loop of one GPTQ block whose scales are all in ``quantizer`` already: W1 [out, b <= COLUMNS]
    float32 (read only), Hinv1 [b, b] float32, ``col_group`` int32 [b] each column's group in the
    quantizer's tables; writes Err1 [out, b] float32 and codes1 [out, b] uint8. Any row strides;
    unit column strides."""
    out_f, b = W1.shape
    if b > COLUMNS or any(t.stride(1) != 1 for t in (W1, Hinv1, Err1, codes1)):
        raise ValueError(f"block of {b} columns with strides {W1.stride()}, {Hinv1.stride()}: not supported")
    fmt, scale = quantizer.fmt, quantizer.scale
    exp = scale if quantizer.exp is None else quantizer.exp
    row_scale = scale if quantizer.ref.row_scale is None else quantizer.ref.row_scale
    _gptq_block[(triton.cdiv(out_f, ROWS),)](
        W1, Err1, codes1, Hinv1, scale, exp, row_scale, col_group, out_f,
        W1.stride(0), Err1.stride(0), codes1.stride(0), Hinv1.stride(0), scale.stride(0), exp.stride(0),
        b=b, ROWS=ROWS, B=COLUMNS, IS_INT=fmt.kind == "int", BITS=fmt.bits, MAXV=fmt.max, MBITS=fmt.mbits,
        MIN_EXP=fmt.min_normal_exp, BIAS=fmt.bias,
        CONSTRAINT=_CONSTRAINT[quantizer.constraint], enable_fp_fusion=False,
    )
