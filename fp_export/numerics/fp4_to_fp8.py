"""Reference of the ``Fp4ToFp8`` op: packed FP4 E2M1 codes + per-group shifts -> FP8 E4M3 bits.

Integer operations only, the algorithm the CUDA kernel (``plugins/fp4_to_fp8.cu``) and the Triton
kernel run. An E2M1 code ``s e1 e0 m`` maps to E4M3 bits exactly (BRIEF section 2):
  e = 0: magnitude m * 0.5      -> 0 (bits 0) or 0.5 (exponent field 6, bits 0x30)
  e > 0: 2**(e-1) * (1 + m/2)   -> exponent field e + 6, mantissa m << 2
and multiplying by 2**shift adds ``shift`` to the exponent field (non-zero magnitudes only), which
stays in 1..15 without forming NaN for every shift in [SHIFT_MIN, SHIFT_MAX].
"""

from __future__ import annotations

import torch

from fp_export.numerics.formats import unpack_nibbles
from fp_export.numerics.scales import SHIFT_MAX, SHIFT_MIN


def fp4_code_to_fp8_bits(codes: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 E4M3 bits of FP4 ``codes`` (uint8, one per element) times 2**``shift`` (broadcast)."""
    c = codes.to(torch.int32)
    s = (c >> 3) & 1
    e = (c >> 1) & 3
    m = c & 1
    mag = torch.where(e == 0, m * 0x30, ((e + 6) << 3) | (m << 2))
    mag = torch.where(mag != 0, mag + (shift.to(torch.int32) << 3), mag)
    return ((s << 7) | mag).to(torch.uint8)


def fp4_to_fp8(packed: torch.Tensor, shift: torch.Tensor, group_size: int) -> torch.Tensor:
    """The op: ``packed`` uint8 [out, in/2], ``shift`` int8 [out, in/group_size] in
    [SHIFT_MIN, SHIFT_MAX] -> E4M3 bits uint8 [out, in] (view as torch.float8_e4m3fn)."""
    if shift.min() < SHIFT_MIN or shift.max() > SHIFT_MAX:
        raise ValueError(f"shift outside [{SHIFT_MIN}, {SHIFT_MAX}]")
    codes = unpack_nibbles(packed)
    if codes.shape[1] != shift.shape[1] * group_size:
        raise ValueError(f"{codes.shape[1]} columns but {shift.shape[1]} groups of {group_size}")
    return fp4_code_to_fp8_bits(codes, shift.repeat_interleave(group_size, dim=1))
