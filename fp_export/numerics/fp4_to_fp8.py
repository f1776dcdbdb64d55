"""The ``Fp4ToFp8`` op, its one owner: identity, legal shifts, torch reference, ONNX reference lowering.

``Fp4ToFp8(packed uint8 [rows, cols/2], shift int8 [rows, ceil(cols/G)]) -> E4M3 bits [rows, cols]``:
packed FP4 E2M1 codes (element 2i in the low nibble) times 2**shift of their group of G columns.
An E2M1 code ``s e1 e0 m`` maps to E4M3 bits exactly (BRIEF section 2):
  e = 0: magnitude m * 0.5      -> 0 (bits 0) or 0.5 (exponent field 6, bits 0x30)
  e > 0: 2**(e-1) * (1 + m/2)   -> exponent field e + 6, mantissa m << 2
i.e. the 8-entry magnitude table ``E4M3_MAGNITUDE``, and multiplying by 2**shift adds ``shift`` to
the exponent field of every non-zero entry, which stays in 1..15 without forming NaN for every
shift in [SHIFT_MIN, SHIFT_MAX]. The CUDA kernel (``plugins/fp4_to_fp8.cu``), the TensorRT plugin
and the Triton kernel hold the same table as packed constants; tests check them against this one.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from fp_export.numerics.formats import FP4_E2M1, decode_table, unpack_nibbles

OP_TYPE = "Fp4ToFp8"
DOMAIN = "fp_export"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "fp_export"
PLUGIN_VERSION = "1"
SHIFT_MIN, SHIFT_MAX = -5, 6
E4M3_MAGNITUDE = (0x00, 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48, 0x4C)  # |FP4| 0, 0.5, 1, 1.5, 2, 3, 4, 6


def group_columns(cols: int, group_size: int) -> torch.Tensor:
    """int64 [cols]: the group of each column (groups of ``group_size``, the last one may be partial)."""
    return torch.arange(cols) // group_size


def fp4_code_to_fp8_bits(codes: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 E4M3 bits of FP4 ``codes`` (uint8, one per element) times 2**``shift`` (broadcast)."""
    c = codes.to(torch.int64)
    mag = torch.tensor(E4M3_MAGNITUDE, dtype=torch.int32)[c & 7]
    mag = torch.where(mag != 0, mag + (shift.to(torch.int32) << 3), mag)
    return (((c >> 3).to(torch.int32) << 7) | mag).to(torch.uint8)


def check_shift(shift: torch.Tensor) -> None:
    if shift.numel() and (shift.min() < SHIFT_MIN or shift.max() > SHIFT_MAX):
        raise ValueError(f"shift outside [{SHIFT_MIN}, {SHIFT_MAX}] ({int(shift.min())}..{int(shift.max())})")


def fp4_to_fp8(packed: torch.Tensor, shift: torch.Tensor, group_size: int) -> torch.Tensor:
    """The op's reference: ``packed`` uint8 [rows, cols/2], ``shift`` int8 [rows, ceil(cols/G)] in
    [SHIFT_MIN, SHIFT_MAX] -> E4M3 bits uint8 [rows, cols] (view as torch.float8_e4m3fn)."""
    check_shift(shift)
    codes = unpack_nibbles(packed)
    cols = codes.shape[1]
    if shift.shape[1] != -(-cols // group_size):
        raise ValueError(f"{cols} columns need {-(-cols // group_size)} groups of {group_size}, got {shift.shape[1]}")
    return fp4_code_to_fp8_bits(codes, shift[:, group_columns(cols, group_size)])


def fp4_values_onnx(g, packed: str, rows: int, cols: int, name: str) -> str:
    """Standard-op decode of packed FP4 codes uint8 [rows, cols/2] -> float32 [rows, cols]: nibble
    unpacking (BitwiseAnd, BitShift) and a Gather from the 16-entry E2M1 value table.
    ``g`` is an ``export.graph.GraphBuilder``."""
    lo = g.op("BitwiseAnd", [packed, g.const(0x0F, np.uint8)], f"{name}.lo")
    hi = g.op("BitShift", [packed, g.const(4, np.uint8)], f"{name}.hi", direction="RIGHT")
    ax = g.const([-1], np.int64)
    both = g.op("Concat", [g.op("Unsqueeze", [lo, ax], f"{name}.lo3"),
                           g.op("Unsqueeze", [hi, ax], f"{name}.hi3")], f"{name}.pairs", axis=-1)
    codes = g.op("Reshape", [both, g.const([rows, cols], np.int64)], f"{name}.codes")
    idx = g.op("Cast", [codes], f"{name}.idx", to=TensorProto.INT64)
    return g.op("Gather", [g.const(decode_table(FP4_E2M1).numpy()), idx], f"{name}.values", axis=0)


def per_group_onnx(g, values: str, factor: str, rows: int, cols: int, group_size: int, name: str,
                   output: str | None = None) -> str:
    """values float32 [rows, cols] times factor [rows, ceil(cols / group_size)] (or [rows]) over each
    group's columns (the last group partial): the factor is gathered per column."""
    groups = -(-cols // group_size)
    f2 = g.op("Reshape", [factor, g.const([rows, groups], np.int64)], f"{name}.f2")
    per_col = g.op("Gather", [f2, g.const(group_columns(cols, group_size).numpy(), np.int64)], f"{name}.per_col",
                   axis=1)
    return g.op("Mul", [values, per_col], f"{name}.dequant", output=output)


def onnx_reference(g, packed: str, shift: str, rows: int, cols: int, group: int, name: str,
                   output: str | None = None) -> str:
    """The op in standard ONNX ops (what ONNX Runtime runs): decoded values times Pow(2, shift) per
    group, Cast to FLOAT8E4M3FN. Every product is an E4M3 value, so the Cast is exact and its bits
    equal ``fp4_to_fp8``'s integer shift."""
    pow2 = g.op("Pow", [g.const(2.0), g.op("Cast", [shift], f"{name}.shift_f", to=TensorProto.FLOAT)], f"{name}.pow2")
    shifted = per_group_onnx(g, fp4_values_onnx(g, packed, rows, cols, name), pow2, rows, cols, group,
                             f"{name}.shifted")
    return g.op("Cast", [shifted], f"{name}.fp8", to=TensorProto.FLOAT8E4M3FN, output=output)
