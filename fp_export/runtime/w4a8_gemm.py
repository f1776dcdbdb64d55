"""W4A8 GEMM on Hopper: FP4 (M1/M2 shift-cast) weights x FP8 E4M3 token-wise activations.

    y[m, n] = acc[m, n] * a_scale[m] * w_scale[n] + a_scale[m] * (t[m] . u[n]) (+ bias[n]),
    acc[m, n] = sum_k a[m, k] * e4m3(fp4(code[n, k]) * 2**shift[n, k // G])

a: float8_e4m3fn [M, K] (the token-quantized activations on the unit grid), a_scale float32 [M],
w_scale float32 [N] (``dq_scale`` of ``QuantizedWeight.to_shift_cast()``),
t = a @ lorc_v^T float32 [M, r] and u = lorc_u [N, r] the optional LoRC factors, bias float32 [N].

Three paths, chosen by the number of tokens M (fixed rules, no run-time tuning; ``auto_path``):
- M <= ``MMA_M`` (``MMA_MAX_M`` for wide weights, ``MMA_M_KEPT`` with a kept FP8
  copy; decode, small batches): ``plugins/w4a8_gemm.cu``,
  FP8 tensor cores through wgmma (m64nNk32, E5M2 x E4M3, FP32 accumulators) with the weights as
  wgmma's 64-row side in registers: each warp decodes its 16 rows' FP4 codes to E5M2 with one mask
  or two shifts and masks per four codes, the activations are read from shared memory as they were
  quantized. The 4-bit weights stream once through shared memory with cp.async (evict-first).
  From 9 tokens on, ``nw`` blocks of 64 rows (``default_nw``) share a CTA and one copy of the
  activations, which are as large as a chunk's weights at 32 tokens. K is split into ``splits``
  parts (``default_splits``): as many as fit go to the warpgroups of one CTA (four warpgroups in
  all up to 16 tokens, and up to 32 for scale groups >= 128; two beyond), whose sums are added in
  shared memory, the rest to ``CLUSTER`` CTAs of a thread-block cluster, whose sums are added
  through distributed shared memory (more CTAs, only on request: through a workspace); every
  reduction has a fixed order.
  Each 32-code group's sum starts at zero and is scaled into FP32 accumulators: Hopper's FP8 wgmma
  truncates its fused sums to 13 bits below their largest term, so the result's relative error is
  about 1e-4 (that of cuBLASLt FP8 GEMMs), not FP32's.
- ``MMA_MAX_M`` < M <= ``TILED_MAX_M``: the same kernel's tiled form (``w4a8_tiled_kernel``): a CTA
  takes 128 rows and a block of 128 tokens (64 for groups of 64 codes, 32 for groups of 32) over all
  of K; a producer warp fills 4 shared-memory stages with the Tensor Memory Accelerator (weights,
  shifts and activations, the activations in wgmma's 128-byte swizzle) and two warpgroups multiply
  them as above (H100, 256 tokens: 1.12-1.87x the per-call cast on seven of the eight benchmark
  shapes, benchmarks/kernels.md).
- otherwise (prefill): the weights are cast to FP8 once per call (``weight_to_fp8``, the same
  decode, at 87% of copy bandwidth on the H100) into a shared workspace, or taken from a kept FP8
  copy, and multiplied with ``torch._scaled_mm`` (cuBLASLt, FP8 wgmma).

Layout (``prepare``, pure torch, so it is tested on the CPU): the weight rows are padded to a
multiple of 16 and K to a multiple of 128 with zero codes; for 16-row tile T and 128-wide chunk c,
``wt[T, c, h, 4g + t]`` holds 16 bytes, four little-endian 32-bit words, of row 16T + 8h + g: word j
(wgmma step j of the chunk) holds codes i = 0..3 at k = 128c + 32j + 4t + i and codes i = 4..7 at
k = 128c + 32j + 16 + 4t + (i - 4), the lane's part of wgmma's register fragment; code i's
magnitude bits (e1 e0 m) at bit ``MAG_AT[i]`` and its sign at bit ``SIGN_AT[i]``, so that byte i
holds codes i and i + 4 and the kernel's ``decode`` turns a word into two registers of E5M2 bytes
s << 7 | (e1 e0 m) << 1, the codes' values times 2^-14 (tests/test_architecture.py checks the
emulated decode against torch.float8_e5m2). Shifts are expanded to 32-code granularity and stored
per (tile, chunk) as ``st[T, c, r, 0:sub]`` (sub = 1, 2 or 4 shifts per row and chunk: the fewest
that represent the groups). Needs K % 32 == 0 and group_size % 32 == 0 (a partial last group is
fine).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from fp_export.numerics.formats import FP8_E4M3, decode, pack_nibbles, unpack_nibbles
from fp_export.numerics.fp4_to_fp8 import check_shift
from fp_export.numerics.fp4_to_fp8 import fp4_to_fp8 as reference_cast
from fp_export.runtime import pdl
from fp_export.runtime.kernels import PLUGINS, compile_cuda

LIB_NAME = "libfp_export_w4a8.so"
MMA_MAX_M = 128  # the wgmma kernel's launches of up to 64 tokens take up to this many; beyond, its tiled form
TILED_NW = 2  # the tiled form: 128 rows (two 64-row blocks) per CTA, one K part
TILED_MAX_M = 256  # "auto": the tiled form up to this many tokens, the per-call cast + _scaled_mm beyond
MMA_M = 64  # "auto": the wgmma kernel up to this many tokens (MMA_MAX_M for wide weights; ``auto_path``)
MMA_WIDE_K, MMA_WIDE_WEIGHTS = 8192, 8192 * 8192  # wide: K >= this and N * K > that
MMA_M_KEPT = 32  # ... and up to this many when the weight keeps an FP8 copy
TILE_N, CHUNK_K = 16, 128
MAG_AT = (1, 9, 17, 25, 4, 12, 20, 28)  # lowest bit of code i's 3 magnitude bits in its layout word
SIGN_AT = (7, 15, 23, 31, 0, 8, 16, 24)  # bit of code i's sign


class W4A8Unavailable(RuntimeError):
    """No CUDA device, no nvcc, or the library failed to build or load."""


@dataclass
class W4A8Weight:
    """A prepared weight. wt uint8 [tiles, kc, 2, 32, 16]; st int8 [tiles, kc, 16, sub];
    w_scale float32 [n]; bias float32 [n] or None; lorc_u float32 [n, r] and lorc_v float32 [r, k]
    or None; fp8: a kept E4M3 copy [n, k] (prefill without the per-call cast) or None."""

    wt: torch.Tensor
    st: torch.Tensor
    w_scale: torch.Tensor
    n: int
    k: int
    sub: int
    bias: torch.Tensor | None = None
    lorc_u: torch.Tensor | None = None
    lorc_v: torch.Tensor | None = None
    fp8: torch.Tensor | None = None

    @property
    def kc(self) -> int:
        return self.wt.shape[1]

    def to(self, device) -> "W4A8Weight":
        mv = lambda x: None if x is None else x.to(device)  # noqa: E731
        return W4A8Weight(self.wt.to(device), self.st.to(device), self.w_scale.to(device), self.n, self.k, self.sub,
                          mv(self.bias), mv(self.lorc_u), mv(self.lorc_v), mv(self.fp8))

    def keep_fp8(self) -> "W4A8Weight":
        """Keep an E4M3 copy (1 byte per weight more) so large-M calls skip the per-call cast."""
        self.fp8 = weight_to_fp8(self)
        return self


def _check(packed: torch.Tensor, shift: torch.Tensor, group_size: int) -> tuple[int, int]:
    n, half = packed.shape
    k = 2 * half
    if packed.dtype != torch.uint8 or shift.dtype != torch.int8:
        raise ValueError(f"W4A8 weight: packed must be uint8 and shift int8, got {packed.dtype}, {shift.dtype}")
    if k % 32 or group_size % 32 or shift.shape != (n, -(-k // group_size)):
        raise ValueError(f"W4A8 weight: K={k}, group_size={group_size}, shift {tuple(shift.shape)}: needs K and "
                         f"group_size multiples of 32 and shift [{n}, ceil({k}/group_size)]")
    check_shift(shift)
    return n, k


def prepare(packed: torch.Tensor, shift: torch.Tensor, group_size: int, w_scale: torch.Tensor,
            bias: torch.Tensor | None = None, lorc_u: torch.Tensor | None = None,
            lorc_v: torch.Tensor | None = None) -> W4A8Weight:
    """packed uint8 [N, K/2] (standard nibble packing), shift int8 [N, ceil(K/group_size)] (the last
    group may be partial), w_scale float32 [N] -> the kernel layout (on the inputs' device)."""
    n, k = _check(packed, shift, group_size)
    tiles, kc = -(-n // TILE_N), -(-k // CHUNK_K)
    np_, kp = tiles * TILE_N, kc * CHUNK_K
    p = torch.zeros(np_, kp // 2, dtype=torch.uint8, device=packed.device)
    p[:n, : k // 2] = packed
    codes = unpack_nibbles(p).view(tiles, 2, 8, kc, 4, 2, 4, 4).to(torch.int64)  # [T, h, g, c, j, u, t, i]
    codes = codes.permute(0, 3, 1, 2, 6, 4, 5, 7).reshape(tiles, kc, 2, 8, 4, 4, 8)  # [T, c, h, g, t, j, 4u + i]
    mag_at = torch.tensor(MAG_AT, device=packed.device)
    sign_at = torch.tensor(SIGN_AT, device=packed.device)
    words = (((codes & 7) << mag_at) | ((codes >> 3) << sign_at)).sum(-1)  # disjoint bits: sum = or
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    wt = words.contiguous().view(torch.uint8).view(tiles, kc, 2, 32, 16)
    s32 = torch.zeros(np_, kp // 32, dtype=torch.int8, device=packed.device)
    s32[:n, : k // 32] = shift.repeat_interleave(group_size // 32, dim=1)[:, : k // 32]  # last group may be partial
    s4 = s32.view(np_, kc, 4)
    if bool((s4 == s4[:, :, :1]).all()):
        s, sub = s4[:, :, :1], 1
    elif bool((s4[:, :, 0::2] == s4[:, :, 1::2]).all()):
        s, sub = s4[:, :, 0::2], 2
    else:
        s, sub = s4, 4
    st = s.reshape(tiles, TILE_N, kc, sub).permute(0, 2, 1, 3).contiguous()
    f32 = lambda x: None if x is None else x.detach().float().contiguous()  # noqa: E731
    return W4A8Weight(wt, st, f32(w_scale), n, k, sub, f32(bias), f32(lorc_u), f32(lorc_v))


def unprepare(w: W4A8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``prepare``'s layout: (packed uint8 [N, K/2], shift per 32 codes int8 [N, K/32])."""
    tiles, kc = w.wt.shape[:2]
    words = w.wt.contiguous().view(torch.int32).view(tiles, kc, 2, 8, 4, 4, 1).to(torch.int64) & 0xFFFFFFFF
    mag_at = torch.tensor(MAG_AT, device=w.wt.device)
    sign_at = torch.tensor(SIGN_AT, device=w.wt.device)
    codes = ((words >> mag_at) & 7) | (((words >> sign_at) & 1) << 3)  # [T, c, h, g, t, j, 4u + i]
    codes = codes.view(tiles, kc, 2, 8, 4, 4, 2, 4).permute(0, 2, 3, 1, 5, 6, 4, 7)  # [T, h, g, c, j, u, t, i]
    codes = codes.reshape(tiles * TILE_N, kc * CHUNK_K).to(torch.uint8)
    p = pack_nibbles(codes)[: w.n, : w.k // 2]
    s = w.st.permute(0, 2, 1, 3).reshape(tiles * TILE_N, kc, w.sub)
    s32 = s.repeat_interleave(4 // w.sub, dim=2).reshape(tiles * TILE_N, kc * 4)[: w.n, : w.k // 32]
    return p.contiguous(), s32.contiguous()


def reference(a_codes: torch.Tensor, a_scale: torch.Tensor, w: W4A8Weight, lorc_t: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The GEMM in ``dtype`` on the CPU from the prepared layout (``unprepare`` + the integer
    reference cast of ``numerics.fp4_to_fp8``). a_codes: activation values on the FP8 grid [M, K]."""
    packed, s32 = unprepare(w.to("cpu"))
    wf = decode(reference_cast(packed, s32, 32), FP8_E4M3).to(dtype)
    s = a_scale.cpu().to(dtype)[:, None]
    y = (a_codes.cpu().to(dtype) @ wf.T) * s * w.w_scale.cpu().to(dtype)[None, :]
    if w.lorc_u is not None:
        t = lorc_t if lorc_t is not None else a_codes.cpu().to(dtype) @ w.lorc_v.cpu().to(dtype).T
        y = y + (t.cpu().to(dtype) @ w.lorc_u.cpu().to(dtype).T) * s
    if w.bias is not None:
        y = y + w.bias.cpu().to(dtype)
    return y


# ---------------------------------------------------------------------------------------------
# CUDA library


def build_library(out_dir: Path = PLUGINS / "build", defines: dict[str, int] | None = None) -> Path:
    """Compile ``w4a8_gemm.cu`` into ``out_dir/libfp_export_w4a8.so`` (``defines``: its tuning
    macros, for ``tools/sweep_w4a8.py``; the committed defaults otherwise)."""
    return compile_cuda("w4a8_gemm.cu", LIB_NAME, out_dir, W4A8Unavailable, defines)


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    env = os.environ.get("FP_EXPORT_W4A8_LIB")
    path = Path(env) if env else PLUGINS / "build" / LIB_NAME
    if not path.is_file():
        path = build_library()
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.fp_export_w4a8_gemm.argtypes = [p, p, p, p, p, p, p, p, i, p, i, p, p, i, i, i, i, i, i, i, i, i, i, p]
    lib.fp_export_w4a8_gemm.restype = i
    lib.fp_export_w4a8_weight_to_fp8.argtypes = [p, p, p, i, i, i, i, p]
    lib.fp_export_w4a8_weight_to_fp8.restype = i
    return lib


class _Workspace:
    """Split-K partial sums (float32, grown on demand, never while a CUDA graph is captured) and
    the arrival counters (int32, zero, left zero by the kernel); the FP8 weight buffer of the
    large-M path. One per device; kernels on one stream use them in turn."""

    def __init__(self, device: torch.device):
        self.device = device
        self.partial = torch.empty(0, dtype=torch.float32, device=device)
        self.counters = torch.zeros(1 << 16, dtype=torch.int32, device=device)
        self.fp8 = torch.empty(0, dtype=torch.uint8, device=device)

    def grow(self, name: str, numel: int) -> torch.Tensor:
        buf = getattr(self, name)
        if buf.numel() < numel:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"W4A8 workspace '{name}' must hold {numel} elements before CUDA graph capture: "
                                   "run the largest call once before capturing")
            buf = torch.empty(numel, dtype=buf.dtype, device=self.device)
            setattr(self, name, buf)
        return buf


_WS: dict[torch.device, _Workspace] = {}


def workspace(device: torch.device) -> _Workspace:
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _WS:
        _WS[device] = _Workspace(device)
    return _WS[device]


def default_splits(m: int, n: int, k: int, sub: int = 1, sms: int = 132) -> int:
    """K parts of the wgmma kernel: the most of 1, 2 and 4 (1 and 2 where a CTA holds two
    warpgroups, ``cta_warpgroups``) that keep the warpgroups (64 rows and one part each) within
    ``WG_PER_SM`` (``WG_PER_SM_WIDE`` where a CTA holds two) per multiprocessor, at least
    ``MIN_CHUNKS`` 128-wide K chunks each. The parts go to the warpgroups of one CTA as far as
    ``cta_warpgroups`` allows with ``default_nw`` row blocks, the rest to the CTAs of a cluster of
    ``CLUSTER`` (the rule never needs more). Fixed rule, fitted to the H100 sweeps of
    benchmarks/w4a8_config.json (M = 1, 4, 16: 7B gate_up's 344 blocks of 64 rows best at 1 part,
    7B qkv's 192 at 2, K=N=8192's 128 and 7B o's 64 at 4; 8 parts slower on every shape) and
    w4a8_config_cluster.md (M = 1-64 with row blocks and parts over a cluster: the rule's launch
    within 3% of the best cell except 7B qkv at 32 tokens, 17.4 us against 16.9 at one part, and
    7B down at 64, 37.1 against 34.2 with two row blocks)."""
    kc = -(-k // CHUNK_K)
    blocks = -(-n // ROWS)
    splits, limit = (4, WG_PER_SM) if cta_warpgroups(m, sub) == 4 else (2, WG_PER_SM_WIDE)
    while splits > 1 and blocks * splits > limit * sms:
        splits //= 2
    return max(1, min(splits, kc // MIN_CHUNKS if kc >= MIN_CHUNKS else 1))


def default_nw(m: int, n: int, sub: int = 1) -> int:
    """64-row blocks per CTA of the wgmma kernel, which share one copy of the activations (from 9
    tokens on): the most of 4 and 2 within ``cta_warpgroups`` that leave at least ``MIN_CTAS``
    CTAs. Fixed rule, fitted to the H100 sweep of benchmarks/w4a8_config_nw.md (16-64 tokens:
    two blocks best for K=N=8192, 7B qkv and 70B down, four for 7B gate_up at 32 tokens, one
    for the 64 blocks of 7B o and down)."""
    if m <= 8:
        return 1
    blocks = -(-n // ROWS)
    return next((nw for nw in (4, 2) if nw <= cta_warpgroups(m, sub) and blocks // nw >= MIN_CTAS), 1)


def cta_warpgroups(m: int, sub: int) -> int:
    """Warpgroups one CTA of the wgmma kernel may hold at M tokens (``fits`` in w4a8_gemm.cu: four
    have 128 registers per thread, enough up to 16 tokens, and up to 32 with ``sub`` = 1)."""
    return 4 if m <= 16 or (m <= 32 and sub == 1) else 2


WG_PER_SM, WG_PER_SM_WIDE = 4, 2
MIN_CHUNKS = 4
MIN_CTAS = 64
CLUSTER = 2  # K parts over this many CTAs are added in a thread-block cluster (MAX_CLUSTER in w4a8_gemm.cu)
ROWS = 64  # weight rows per row block (wgmma's M; WG_TILES 16-row tiles in plugins/w4a8_gemm.cu)


def weight_to_fp8(w: W4A8Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """E4M3 weight [N, K] of a prepared weight: float8_e4m3fn from the CUDA kernel, uint8 bits
    from the integer reference on CPU tensors."""
    if not w.wt.is_cuda:
        packed, s32 = unprepare(w)
        return reference_cast(packed, s32, 32)
    if out is None:
        out = torch.empty(w.n, w.k, dtype=torch.uint8, device=w.wt.device)
    rc = load_library().fp_export_w4a8_weight_to_fp8(w.wt.data_ptr(), w.st.data_ptr(), out.data_ptr(), w.n, w.k,
                                                     w.kc, w.sub, torch.cuda.current_stream(w.wt.device).cuda_stream)
    if rc != 0:
        raise W4A8Unavailable(f"fp_export_w4a8_weight_to_fp8 failed with CUDA error {rc}")
    return out.view(torch.float8_e4m3fn)


def auto_path(m: int, n: int, k: int, kept_fp8: bool) -> str:
    """The "auto" path for M tokens and an N x K weight: "mma" (the wgmma kernel, tiled beyond
    ``MMA_MAX_M``) or "scaled_mm". H100 (benchmarks/kernels.json, L2-cold weights): the wgmma kernel
    is faster than FP8 ``_scaled_mm`` on a kept FP8 copy up to 32 tokens (1.2-2.0x on the eight
    shapes) and faster than the per-call FP4 -> FP8 cast up to 64 tokens; up to ``MMA_MAX_M`` (two
    launches) for weights longer than ``MMA_WIDE_K`` and larger than ``MMA_WIDE_WEIGHTS`` (at 128
    tokens 1.06-1.26x the cast on the three 70B shapes), not for the others, where the cast was
    1.0-1.8x faster (K=N=8192 and 7B qkv 1.13x and 1.14x, 7B gate_up 1.05x, K=N=4096 and 7B down
    1.8x and 1.5x). The tiled form beats the cast at 256 tokens on seven of the eight shapes
    (1.06-1.83x; K=N=4096, 64 CTAs, 0.85x) and up to ``TILED_MAX_M``; at 512 it is 0.90-1.04x, beyond
    ``_scaled_mm``'s tensor-core rate outweighs the cast (0.49-0.87x at 1024 and 4096). These are the
    thirteenth session's run, which set the rule; the committed kernels.json, after the cluster
    reduction, also has the kernel 1.22x the cast at 128 tokens on K=N=8192 (not in the rule)."""
    if kept_fp8:
        return "mma" if m <= MMA_M_KEPT else "scaled_mm"
    if m > MMA_MAX_M:
        return "mma" if m <= TILED_MAX_M else "scaled_mm"
    wide = k >= MMA_WIDE_K and n * k > MMA_WIDE_WEIGHTS
    return "mma" if m <= (MMA_MAX_M if wide else MMA_M) else "scaled_mm"


def gemm(a: torch.Tensor, a_scale: torch.Tensor, w: W4A8Weight, out_dtype: torch.dtype = torch.bfloat16,
         splits: int | None = None, path: str = "auto", nw: int | None = None) -> torch.Tensor:
    """y [M, N] (``out_dtype`` bfloat16 or float32) of a float8_e4m3fn [M, K] (row stride a
    multiple of 16), a_scale float32 [M]; see the module docstring. ``path``: "auto" (by M),
    "mma" (the wgmma kernel; tiled beyond ``MMA_MAX_M`` tokens) or "scaled_mm". ``splits`` and ``nw``
    (64-row blocks per CTA, 1, 2 or 4): the mma path's launch shape, ``default_splits`` and
    ``default_nw`` by default (the tiled form takes 1 and ``TILED_NW`` only)."""
    m, k = a.shape
    if k != w.k:
        raise ValueError(f"W4A8 gemm: activations have K={k}, the weight K={w.k}")
    if path == "auto":
        path = auto_path(m, w.n, w.k, w.fp8 is not None)
    lorc_t = None
    if w.lorc_u is not None:
        lorc_t = torch.mm(a.float(), w.lorc_v.T)
    if path == "scaled_mm":
        ws = workspace(a.device)
        fp8 = w.fp8 if w.fp8 is not None else weight_to_fp8(w, ws.grow("fp8", w.n * w.k)[: w.n * w.k].view(w.n, w.k))
        if w.n % 16 or k % 16:  # cuBLASLt FP8 needs multiples of 16: exact float32 products instead
            y = (a.float() @ fp8.float().T) * a_scale[:, None] * w.w_scale[None, :]
        else:
            y = torch._scaled_mm(a.contiguous(), fp8.t(), scale_a=a_scale[:, None], scale_b=w.w_scale[None, :],
                                 out_dtype=torch.float32 if (lorc_t is not None or out_dtype == torch.float32)
                                 else torch.bfloat16)
        if lorc_t is not None:
            y = y + torch.mm(lorc_t, w.lorc_u.T) * a_scale[:, None]
        if w.bias is not None:
            y = y + w.bias
        return y.to(out_dtype)
    if a.stride(1) != 1 or a.stride(0) % 16 or a.data_ptr() % 16:
        raise ValueError(f"W4A8 mma path: needs 16-byte aligned rows (strides {a.stride()})")
    if m > MMA_MAX_M:
        if splits not in (None, 1) or nw not in (None, TILED_NW):
            raise ValueError(f"W4A8 mma path beyond {MMA_MAX_M} tokens (M={m}) is tiled: one K part and {TILED_NW} "
                             f"row blocks per CTA (got splits={splits}, nw={nw})")
        splits, nw = 1, TILED_NW
    if splits is None:
        splits = default_splits(m, w.n, w.k, w.sub)
    if nw is None:
        nw = default_nw(m, w.n, w.sub)
    if nw not in (1, 2, 4):
        raise ValueError(f"W4A8 mma path: nw must be 1, 2 or 4 row blocks per CTA, got {nw}")
    splits = max(1, min(splits, w.kc))
    ws = workspace(a.device)
    part = ws.grow("partial", splits * m * w.wt.shape[0] * TILE_N) if splits > 1 else ws.partial
    out = torch.empty(m, w.n, dtype=out_dtype, device=a.device)
    a_scale = a_scale.contiguous()
    rank = 0 if lorc_t is None else lorc_t.shape[1]
    ptr = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
    rc = load_library().fp_export_w4a8_gemm(
        w.wt.data_ptr(), w.st.data_ptr(), a.data_ptr(), a_scale.data_ptr(), w.w_scale.data_ptr(), ptr(w.bias),
        ptr(lorc_t), ptr(w.lorc_u), rank, out.data_ptr(), int(out_dtype == torch.bfloat16), part.data_ptr(),
        ws.counters.data_ptr(), m, w.n, w.k, a.stride(0), out.stride(0), w.kc, w.sub, splits, nw, int(pdl.enabled(a.device)),
        torch.cuda.current_stream(a.device).cuda_stream)
    if rc != 0:
        raise W4A8Unavailable(f"fp_export_w4a8_gemm failed with CUDA error {rc}")
    return out
