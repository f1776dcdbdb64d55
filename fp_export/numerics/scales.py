"""Scales: the absmax rule, groups, tokens, and the M1 / M2 power-of-two constraints.

The rule (``absmax_scale``, written once): a block of values with absolute maximum ``amax`` gets
``scale = amax / grid_max``, or ``1 / grid_max`` when ``amax`` is 0 (any scale quantizes zeros to
zero; a positive one keeps the division defined). Weights, tokens, LoRC factor rows and static
activation scales all use it; the ONNX graph computes it with ``absmax_scale_onnx``.

Weights are [out, in] float32; a group is ``group_size`` consecutive input columns of one row
(``group_size=None``: the whole row, per output channel). When ``group_size`` does not divide
``in``, the last group of each row is partial (``in % group_size`` columns): n = ceil(in / G)
groups. A weight of group g dequantizes as ``decode(code) * scale[o, g]``. Under the constraints
(FP4 weights only):

- M1: ``scale[o, g] = 2**scale_exp[o, g]``.
- M2: ``scale[o, g] = 2**scale_exp[o, g] * row_scale[o]`` with ``scale_exp <= 0``.

Exponents use ceil(log2(.)) so every group's absolute maximum lands inside the grid (no clipping).
Within a row, exponents span at most ``SHIFT_WINDOW`` consecutive values, the range of shifts the
``Fp4ToFp8`` op accepts; ``quant.weights.QuantizedWeight.to_shift_cast`` re-bases them into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fp_export.numerics.formats import Format
from fp_export.numerics.fp4_to_fp8 import SHIFT_MAX, SHIFT_MIN, group_columns

Constraint = Literal["none", "m1", "m2"]
SHIFT_WINDOW = SHIFT_MAX - SHIFT_MIN + 1
EXP_MIN, EXP_MAX = -128, 127


def absmax_scale(amax: torch.Tensor, grid_max: float) -> torch.Tensor:
    """The scale rule: ``amax / grid_max``, ``1 / grid_max`` where ``amax`` is 0 (same shape and
    dtype as ``amax``, float32 or float64)."""
    return torch.where(amax > 0, amax, torch.ones_like(amax)) / grid_max


def absmax_scale_onnx(g, amax: str, grid_max: float, name: str) -> str:
    """``absmax_scale`` as ONNX nodes on a float32 tensor ``amax`` (``g``: an export GraphBuilder)."""
    safe = g.op("Where", [g.op("Greater", [amax, g.const(0.0)], f"{name}.nonzero"), amax, g.const(1.0)],
                f"{name}.safe")
    return g.op("Div", [safe, g.const(grid_max)], name)


def ceil_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(a)) for positive finite float32 ``a``, as int32."""
    mant, e = torch.frexp(a)
    return torch.where(mant == 0.5, e - 1, e)


def n_groups(in_features: int, group_size: int | None) -> int:
    """Groups per row: ceil(in / G), 1 per channel."""
    return 1 if group_size is None else -(-in_features // group_size)


def group_amax(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Absolute maximum of each group: float32 [out, n_groups] ([out, 1] per channel); a partial
    last group covers the remaining columns."""
    out_f, in_f = w.shape
    a = w.float().abs()
    if group_size is None:
        return a.amax(dim=1, keepdim=True)
    n = n_groups(in_f, group_size)
    a = torch.nn.functional.pad(a, (0, n * group_size - in_f))
    return a.view(out_f, n, group_size).amax(dim=-1)


def expand_groups(per_group: torch.Tensor, group_size: int | None, in_features: int) -> torch.Tensor:
    """[out, n] -> [out, in_features]: each group's value repeated over its columns."""
    if group_size is None:
        return per_group[:, :1].expand(-1, in_features)
    return per_group[:, group_columns(in_features, group_size)]


def constrained_scale(scale_exp: torch.Tensor, row_scale: torch.Tensor | None) -> torch.Tensor:
    """float32 [out, n] group scales of M1 (``2**scale_exp``) or M2 (``2**scale_exp * row_scale``)."""
    scale = torch.ldexp(torch.ones(scale_exp.shape, device=scale_exp.device), scale_exp.float())
    return scale if row_scale is None else scale * row_scale[:, None]


@dataclass(frozen=True)
class RowReference:
    """What a constrained quantizer fixes per row before it sees the groups (from the original W).

    ``row_scale`` float32 [out] (M2: row absmax / fmt.max); ``row_exp`` int32 [out] (M1: the
    largest exponent the row may use)."""

    row_scale: torch.Tensor | None
    row_exp: torch.Tensor | None


def row_reference(w: torch.Tensor, fmt: Format, constraint: Constraint) -> RowReference:
    """Per-row anchor of the M1 / M2 exponents, computed from the unquantized weight [out, in]."""
    row_scale = absmax_scale(group_amax(w, None)[:, 0], fmt.max)
    if constraint == "m2":
        return RowReference(row_scale=row_scale, row_exp=None)
    if constraint == "m1":
        row_exp = ceil_log2(row_scale)
        lo, hi = int(row_exp.min()) - SHIFT_WINDOW + 1, int(row_exp.max())
        if lo < EXP_MIN or hi > EXP_MAX:  # group exponents lie in [row_exp - SHIFT_WINDOW + 1, row_exp]
            raise ValueError(f"M1 exponent out of int8 range ({lo}..{hi})")
        return RowReference(row_scale=None, row_exp=row_exp)
    return RowReference(row_scale=None, row_exp=None)


def group_scales(
    amax: torch.Tensor, fmt: Format, constraint: Constraint, ref: RowReference
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales for groups with absolute maxima ``amax`` [out, n].

    Returns (scale float32 [out, n], scale_exp int8 [out, n] or None when unconstrained).
    A zero group gets the smallest scale its row allows (unconstrained: the rule's 1 / max).
    No device synchronization (GPTQ calls it inside captured CUDA graphs)."""
    if constraint == "none":
        return absmax_scale(amax, fmt.max), None
    zero = amax == 0
    if constraint == "m2":
        rel = amax / (ref.row_scale[:, None] * fmt.max)
        exp = ceil_log2(torch.where(zero, torch.ones_like(rel), rel)).clamp(1 - SHIFT_WINDOW, 0)
        exp = torch.where(zero, torch.full_like(exp, 1 - SHIFT_WINDOW), exp)
    else:
        hi = ref.row_exp[:, None]
        exp = ceil_log2(absmax_scale(amax, fmt.max))
        exp = torch.minimum(torch.maximum(exp, hi - SHIFT_WINDOW + 1), hi)
        exp = torch.where(zero, (hi - SHIFT_WINDOW + 1).expand_as(exp), exp)
    exp = exp.to(torch.int8)
    return constrained_scale(exp, ref.row_scale), exp


def token_scales(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Dynamic per-token scales of activations [..., hidden]: [..., 1] by the absmax rule, in
    float32 (float64 for float64 ``x``: the float64 validation of ``validate.float64_model``)."""
    amax = (x if x.dtype == torch.float64 else x.float()).abs().amax(dim=-1, keepdim=True)
    return absmax_scale(amax, fmt.max)


def token_scales_onnx(g, x: str, fmt: Format, name: str) -> str:
    """``token_scales`` as ONNX nodes: [..., 1] float32 scales of activations ``x`` [..., hidden]."""
    amax = g.op("ReduceMax", [g.op("Abs", [x], f"{name}.abs"), g.const([-1], np.int64)], f"{name}.amax",
                keepdims=1)
    return absmax_scale_onnx(g, amax, fmt.max, name)
