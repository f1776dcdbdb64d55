"""Token-wise FP8 E4M3 activation quantization fused into the kernels that produce the GEMM inputs
(Triton, CUDA tensors):

- ``rmsnorm_quant``: LLaMA RMSNorm (bf16 in/out semantics of Hugging Face ``LlamaRMSNorm``:
  normalize in float32, round to bf16, multiply by the bf16 weight, round to bf16) followed by the
  token quantizer, in one pass over the row; ``add_rmsnorm_quant`` adds the residual first (the
  sum rounded to bf16 and stored); ``rmsnorm``, the same norm (and add) without quantization, for
  the BF16 engine;
- ``silu_mul_quant``: SiLU(gate) * up in bf16 semantics (each op rounded to bf16, as eager
  PyTorch does) followed by the token quantizer;
- ``quantize_rows``: the token quantizer alone (one pass while the row fits in registers).

One program per row, except SiLU * mul with few rows (decode): there the row's elementwise work,
not its bytes, takes the time (11008 values in one program: about 7 us on an H100), so the row is
split over several programs of ``BLOCK`` values (``split_rule``). Each computes its part's max |y|,
stores it, arrives at the row's counter and waits for the others (all resident: at most one
program per multiprocessor is launched), then quantizes its part with the row's scale. The
counters only grow: each call adds its program count to each of its rows, so a call ends on a
multiple of it and the next call counts on from there; nothing is reset between calls, and CUDA
graphs replay them. One set of counters per (device, stream), so kernels on different streams
never share one. (The norm and the token quantizer alone measured slower split: their rows are
short enough that the barrier costs more than it saves; benchmarks/w4a8_notes.md.)

On Hopper the kernels launch with programmatic dependent launch (``runtime.pdl``): each waits for
its producer, then lets the GEMM it feeds be scheduled, so the GEMM reads its weights meanwhile. A
split row lets it be scheduled only once its programs have passed their barrier: earlier, the
GEMM's CTAs beside the waiting programs slowed the 7B decode at batch 32 by 1.1x (1.5x with the
norms split too).

Token quantizer (``runtime.linear.quantize_tokens`` / ``numerics.scales.token_scales``):
s = max|y| / 448 (1/448 for an all-zero row), q = e4m3(y / s) round-to-nearest-even and saturated.
Outputs: q float8_e4m3fn [M, H], s float32 [M] (and for ``rmsnorm_quant`` optionally the bf16 norm).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import triton
import triton.language as tl

from fp_export.runtime import pdl

FP8_MAX = 448.0
MAX_ROW = 32768  # rows up to this length are held in registers (one program per row)
SPLIT_BLOCK = 1024  # values per program at least, when a row is split over programs


@triton.jit
def round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), as float32; by its bits, so that
    Triton's interpreter rounds as the GPU does (finite x)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dependent_launch(USE_GDC: tl.constexpr, TRIGGER: tl.constexpr):
    """With programmatic dependent launch: wait for the producing kernel, then (TRIGGER) let the
    consumer be scheduled (it waits for this kernel before it reads what this one writes)."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        if TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def amax_of(y, ok):
    return tl.max(tl.where(ok, tl.abs(y), 0.0), axis=0)


@triton.jit
def _row_max(amax, row, part_ptr, cnt_ptr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr):
    """The max of ``amax`` (float32 scalar: this program's part) over the SPLIT programs of the row
    (program_id(1)); part_ptr float32 [rows * SPLIT] and cnt_ptr int64 [rows]: the scratch."""
    tl.store(part_ptr + row * SPLIT + tl.program_id(1), amax)
    tl.debug_barrier()  # the part is written before the arrival releases it
    seen = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu") + 1
    done = ((seen - 1) // SPLIT + 1) * SPLIT  # the count at which this call's row is complete
    while seen < done:
        seen = tl.atomic_add(cnt_ptr + row, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    i = tl.arange(0, SPLIT_P2)
    return tl.max(tl.load(part_ptr + row * SPLIT + i, mask=i < SPLIT, other=0.0, cache_modifier=".cg"), axis=0)


@triton.jit
def quant_store(y, amax, offs, ok, q_ptr, s_ptr, row, stride_q, lead, FMAX: tl.constexpr):
    """Quantizes y (this program's values of the row) by the row's max |y|; ``lead`` (one program
    of the row) stores its scale."""
    s = tl.math.div_rn(tl.where(amax > 0, amax, 1.0), FMAX)
    q = tl.clamp(tl.math.div_rn(y, s), -FMAX, FMAX)
    tl.store(q_ptr + row * stride_q + offs, q.to(tl.float8e4nv), mask=ok)
    tl.store(s_ptr + row, s, mask=lead)


@triton.jit
def _rmsnorm_kernel(x_ptr, d_ptr, w_ptr, h_ptr, q_ptr, s_ptr, y_ptr, H, eps, stride_x, stride_d, stride_h, stride_q,
                    stride_y, FMAX: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr, QUANT: tl.constexpr,
                    WRITE_Y: tl.constexpr, USE_GDC: tl.constexpr):
    dependent_launch(USE_GDC, True)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    if ADD:  # the residual add, rounded to bf16 as eager PyTorch does, then stored
        x = round_bf16(x + tl.load(d_ptr + row * stride_d + offs, mask=ok, other=0.0).to(tl.float32))
        tl.store(h_ptr + row * stride_h + offs, x.to(tl.bfloat16), mask=ok)
    var = tl.sum(x * x, axis=0) / H
    h = round_bf16(x * tl.math.rsqrt(var + eps))
    w = round_bf16(tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32))
    y = round_bf16(h * w)
    if WRITE_Y:
        tl.store(y_ptr + row * stride_y + offs, y.to(tl.bfloat16), mask=ok)
    if QUANT:
        quant_store(y, amax_of(y, ok), offs, ok, q_ptr, s_ptr, row, stride_q, True, FMAX)


@triton.jit
def _silu_mul_quant_kernel(g_ptr, u_ptr, q_ptr, s_ptr, part_ptr, cnt_ptr, H, stride_g, stride_u, stride_q,
                           FMAX: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
                           USE_GDC: tl.constexpr):
    dependent_launch(USE_GDC, SPLIT == 1)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < H
    g = tl.load(g_ptr + row * stride_g + offs, mask=ok, other=0.0).to(tl.float32)
    u = round_bf16(tl.load(u_ptr + row * stride_u + offs, mask=ok, other=0.0).to(tl.float32))
    a = round_bf16(g / (1.0 + tl.exp(-g)))
    y = round_bf16(a * u)
    amax = amax_of(y, ok)
    if SPLIT > 1:
        amax = _row_max(amax, row, part_ptr, cnt_ptr, SPLIT, SPLIT_P2)
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()
    quant_store(y, amax, offs, ok, q_ptr, s_ptr, row, stride_q, tl.program_id(1) == 0, FMAX)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, H, stride_x, stride_q, FMAX: tl.constexpr, BLOCK: tl.constexpr,
                       USE_GDC: tl.constexpr):
    dependent_launch(USE_GDC, True)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < H
    y = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    quant_store(y, amax_of(y, ok), offs, ok, q_ptr, s_ptr, row, stride_q, True, FMAX)


def alloc_quantized(m: int, h: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if h > MAX_ROW:
        raise ValueError(f"fused quantization: rows of {h} > {MAX_ROW} elements")
    # rows padded to 16 bytes so the W4A8 kernel can load 16-byte vectors
    q = torch.empty(m, -(-h // 16) * 16, dtype=torch.float8_e4m3fn, device=device)[:, :h]
    return q, torch.empty(m, dtype=torch.float32, device=device)


def _warps(block: int) -> int:
    return max(1, min(16, block // 512))


@lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def one_program_per_row(m: int, h: int, device: torch.device) -> tuple[int, int]:
    """The unsplit ``split_rule``: (1, h padded to a power of two)."""
    return 1, triton.next_power_of_2(h)


def split_rule(m: int, h: int, device: torch.device) -> tuple[int, int]:
    """(programs per row, values per program) of ``silu_mul_quant`` for m rows of h values: the
    fewest programs of at least ``SPLIT_BLOCK`` (a power of two) values that keep m * programs
    within the multiprocessor count; one program of the whole row (padded to a power of two) when
    that is one program (``one_program_per_row``), and always on the CPU (Triton's interpreter runs
    programs one after another: they cannot wait for each other)."""
    per_row = multiprocessors(device) // m if device.type == "cuda" else 1
    if per_row < 2:
        return one_program_per_row(m, h, device)
    part = max(SPLIT_BLOCK, triton.next_power_of_2(-(-h // per_row)))
    return (-(-h // part), part) if part < h else one_program_per_row(m, h, device)


_SCRATCH: dict = {}


def stream_scratch(device: torch.device, key: tuple, make: Callable[[], tuple]) -> tuple:
    """The scratch tensors ``make()`` (arrival counters start at zero) of ``key`` on ``device``'s
    current stream, made on first use. Counters only grow: each call adds its program count, so
    that a call ends on a multiple of it; kernels on different streams never share them."""
    full = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0, *key)
    if full not in _SCRATCH:
        _SCRATCH[full] = make()
    return _SCRATCH[full]


def _scratch(x: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(parts float32 [multiprocessors], counters int64 [multiprocessors]) for rows split over
    ``split`` programs on x's device and current stream; x twice for unsplit rows (not touched)."""
    if split == 1:
        return x, x
    n = multiprocessors(x.device)
    parts, counters = stream_scratch(x.device, ("rows",), lambda: (
        torch.empty(n, dtype=torch.float32, device=x.device),
        torch.zeros(MAX_ROW // SPLIT_BLOCK + 1, n, dtype=torch.int64, device=x.device)))
    return parts, counters[split]  # one row of counters per program count: every call adds `split`


def launch_options(x: torch.Tensor) -> dict:
    """Launch options: programmatic dependent launch where ``runtime.pdl`` enables it."""
    return dict(USE_GDC=True, launch_pdl=True) if pdl.enabled(x.device) else dict(USE_GDC=False)


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, return_norm: bool = False):
    """x bf16 [M, H], weight [H] -> (q float8_e4m3fn [M, H], s float32 [M]) (+ the bf16 norm [M, H]
    when ``return_norm``)."""
    _, q, s, y = _rmsnorm(x, None, weight, eps, quant=True, norm=return_norm)
    return (q, s, y) if return_norm else (q, s)


def add_rmsnorm_quant(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and ``rmsnorm_quant`` in one pass: x, delta bf16 [M, H] -> (x + delta bf16
    [M, H], q float8_e4m3fn [M, H], s float32 [M]) of the sum's norm."""
    h, q, s, _ = _rmsnorm(x, delta, weight, eps, quant=True, norm=False)
    return h, q, s


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None):
    """LLaMA RMSNorm of x (+ ``delta``) bf16 [M, H] -> the bf16 norm [M, H]; with ``delta``
    (x + delta, the norm of the sum)."""
    h, _, _, y = _rmsnorm(x, delta, weight, eps, quant=False, norm=True)
    return y if delta is None else (h, y)


def _rmsnorm(x, delta, weight, eps, quant: bool, norm: bool):
    m, h = x.shape
    q, s = alloc_quantized(m, h, x.device) if quant else (x, x)
    y = torch.empty(m, h, dtype=torch.bfloat16, device=x.device) if norm else x
    out = torch.empty(m, h, dtype=torch.bfloat16, device=x.device) if delta is not None else x
    d = x if delta is None else delta
    block = triton.next_power_of_2(h)
    _rmsnorm_kernel[(m,)](x, d, weight, out, q, s, y, h, eps, x.stride(0), d.stride(0), out.stride(0), q.stride(0),
                          y.stride(0), FMAX=FP8_MAX, BLOCK=block, ADD=delta is not None, QUANT=quant, WRITE_Y=norm,
                          num_warps=_warps(block), **launch_options(x))
    return out, (q if quant else None), (s if quant else None), (y if norm else None)


def silu_mul_quant(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up bf16 [M, H] (views allowed, unit column stride) -> FP8 of SiLU(gate) * up and scales."""
    m, h = gate.shape
    q, s = alloc_quantized(m, h, gate.device)
    split, block = split_rule(m, h, gate.device)
    parts, counters = _scratch(gate, split)
    warps = _warps(block) if split == 1 else min(16, max(4, block // 128))
    _silu_mul_quant_kernel[(m, split)](gate, up, q, s, parts, counters, h, gate.stride(0), up.stride(0), q.stride(0),
                                       FMAX=FP8_MAX, BLOCK=block, SPLIT=split, SPLIT_P2=triton.next_power_of_2(split),
                                       num_warps=warps, **launch_options(gate))
    return q, s


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, H] any float dtype (unit column stride) -> (float8_e4m3fn [M, H], float32 [M])."""
    m, h = x.shape
    q, s = alloc_quantized(m, h, x.device)
    block = triton.next_power_of_2(h)
    _quant_rows_kernel[(m,)](x, q, s, h, x.stride(0), q.stride(0), FMAX=FP8_MAX, BLOCK=block, num_warps=_warps(block),
                             **launch_options(x))
    return q, s
