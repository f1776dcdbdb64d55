"""Scales: per-tensor, per-channel, per-group, per-token; and the M1 / M2 power-of-two constraints.

Weights are [out, in] float32; a group is ``group_size`` consecutive input columns of one row
(``group_size=None``: the whole row, i.e. per output channel). A weight of group g dequantizes as
``decode(code) * scale[o, g]``. Under the constraints (FP4 weights only):

- M1: ``scale[o, g] = 2**scale_exp[o, g]``.
- M2: ``scale[o, g] = 2**scale_exp[o, g] * row_scale[o]`` with ``scale_exp <= 0``.

Exponents use ceil(log2(.)) so every group's absolute maximum lands inside the grid (no clipping).
Within a row, exponents span at most ``SHIFT_WINDOW`` consecutive values; ``shift_cast_params``
re-bases them so the FP4 -> FP8 cast adds an integer in [SHIFT_MIN, SHIFT_MAX] to the E4M3 exponent
field, which is exact for every FP4 code (0.5 -> field 6, 6.0 -> field 9 mantissa 100: field + k
stays in 1..15 and never forms the NaN pattern). See BRIEF section 2 and ``tests/test_scales.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fp_export.numerics.formats import Format

Constraint = Literal["none", "m1", "m2"]
SHIFT_MIN, SHIFT_MAX = -5, 6
SHIFT_WINDOW = SHIFT_MAX - SHIFT_MIN + 1
EXP_MIN, EXP_MAX = -128, 127


def ceil_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(a)) for positive finite float32 ``a``, as int32."""
    mant, e = torch.frexp(a)
    return torch.where(mant == 0.5, e - 1, e)


def group_amax(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Absolute maximum of each group: float32 [out, in / group_size] ([out, 1] per channel)."""
    out_f, in_f = w.shape
    g = in_f if group_size is None else group_size
    if in_f % g:
        raise ValueError(f"group size {g} does not divide in_features {in_f}")
    return w.float().abs().view(out_f, in_f // g, g).amax(dim=-1)


@dataclass(frozen=True)
class RowReference:
    """What a constrained quantizer fixes per row before it sees the groups (from the original W).

    ``row_scale`` float32 [out] (M2: row absmax / fmt.max); ``row_exp`` int32 [out] (M1: the
    largest exponent the row may use)."""

    row_scale: torch.Tensor | None
    row_exp: torch.Tensor | None


def row_reference(w: torch.Tensor, fmt: Format, constraint: Constraint) -> RowReference:
    """Per-row anchor of the M1 / M2 exponents, computed from the unquantized weight [out, in]."""
    amax = group_amax(w, None)[:, 0]
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    if constraint == "m2":
        return RowReference(row_scale=safe / fmt.max, row_exp=None)
    if constraint == "m1":
        return RowReference(row_scale=None, row_exp=ceil_log2(safe / fmt.max))
    return RowReference(row_scale=None, row_exp=None)


def group_scales(
    amax: torch.Tensor, fmt: Format, constraint: Constraint, ref: RowReference
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales for groups with absolute maxima ``amax`` [out, n].

    Returns (scale float32 [out, n], scale_exp int8 [out, n] or None when unconstrained).
    A zero group gets the smallest scale its row allows (unconstrained: 1.0); any scale works."""
    zero = amax == 0
    if constraint == "none":
        return torch.where(zero, torch.ones_like(amax), amax / fmt.max), None
    if constraint == "m2":
        rel = amax / (ref.row_scale[:, None] * fmt.max)
        exp = ceil_log2(torch.where(zero, torch.ones_like(rel), rel)).clamp(1 - SHIFT_WINDOW, 0)
        exp = torch.where(zero, torch.full_like(exp, 1 - SHIFT_WINDOW), exp)
        scale = torch.ldexp(torch.ones_like(amax), exp.float()) * ref.row_scale[:, None]
    else:
        hi = ref.row_exp[:, None]
        exp = ceil_log2(torch.where(zero, torch.ones_like(amax), amax / fmt.max))
        exp = torch.minimum(torch.maximum(exp, hi - SHIFT_WINDOW + 1), hi)
        exp = torch.where(zero, (hi - SHIFT_WINDOW + 1).expand_as(exp), exp)
        if exp.min() < EXP_MIN or exp.max() > EXP_MAX:
            raise ValueError(f"M1 exponent out of int8 range ({int(exp.min())}..{int(exp.max())})")
        scale = torch.ldexp(torch.ones_like(amax), exp.float())
    return scale, exp.to(torch.int8)


def weight_scales(
    w: torch.Tensor, fmt: Format, group_size: int | None, constraint: Constraint
) -> tuple[torch.Tensor, torch.Tensor | None, RowReference]:
    """Round-to-nearest scales of a whole weight [out, in]: (scale, scale_exp, row reference)."""
    if constraint != "none" and fmt.name != "fp4_e2m1":
        raise ValueError(f"scale constraint {constraint} applies to fp4_e2m1 weights, not {fmt.name}")
    ref = row_reference(w, fmt, constraint)
    scale, exp = group_scales(group_amax(w, group_size), fmt, constraint, ref)
    return scale, exp, ref


def expand_groups(per_group: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, n] -> [out, in_features]: each group's value repeated over its columns."""
    return per_group.repeat_interleave(in_features // per_group.shape[1], dim=1)


def token_scales(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Dynamic per-token scales of activations [..., hidden]: [..., 1] = absmax / max, in float32
    (float64 for float64 ``x``: the float64 validation of ``fp_export.validate.float64_model``)."""
    amax = (x if x.dtype == torch.float64 else x.float()).abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > 0, amax, torch.ones_like(amax)) / fmt.max


def shift_cast_params(
    scale_exp: torch.Tensor, row_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-base M1 / M2 exponents for the shift cast.

    Returns (shift int8 [out, n] in [SHIFT_MIN, SHIFT_MAX], dq_scale float32 [out]) such that
    ``fp4 * 2**scale_exp (* row_scale) == e4m3(fp4 * 2**shift) * dq_scale`` exactly: the cast adds
    ``shift`` to the E4M3 exponent field, and the per-channel ``dq_scale`` is applied after the GEMM.
    M2 (``row_scale`` given): shift = exp + SHIFT_MAX, dq = row_scale * 2**-SHIFT_MAX.
    M1: shift = exp - max_row(exp) + SHIFT_MAX, dq = 2**(max_row(exp) - SHIFT_MAX)."""
    exp = scale_exp.to(torch.int32)
    base = exp.amax(dim=1) if row_scale is None else torch.zeros(exp.shape[0], dtype=torch.int32)
    shift = exp - base[:, None] + SHIFT_MAX
    if shift.min() < SHIFT_MIN or shift.max() > SHIFT_MAX:
        raise ValueError(
            f"scale exponents span {int(shift.min())}..{int(shift.max())} after re-basing; "
            f"the shift cast needs {SHIFT_MIN}..{SHIFT_MAX}"
        )
    dq = torch.ldexp(torch.ones(exp.shape[0]), (base - SHIFT_MAX).float())
    if row_scale is not None:
        dq = dq * row_scale.float()
    return shift.to(torch.int8), dq
