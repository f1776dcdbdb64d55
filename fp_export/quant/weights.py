"""Quantized weight tensors: the record every quantizer returns, its dequantization, its
checkpoint tensors, and its lowering to the ``Fp4ToFp8`` shift cast.

Dequantization rule (float32, in this order, exactly what checkpoints document):
  q = decode(codes)                                   # numerics.formats.decode, exact
  unconstrained: W[o, i] = q[o, i] * scale[o, i // G]
  M1:            W[o, i] = q[o, i] * 2**scale_exp[o, i // G]
  M2:            W[o, i] = (q[o, i] * 2**scale_exp[o, i // G]) * row_scale[o]
with G = group_size (the last group of a row partial when G does not divide in), or G = in_features
per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp_export.numerics.formats import Format, decode, get_format, pack_nibbles, unpack_nibbles
from fp_export.numerics.fp4_to_fp8 import SHIFT_MAX, check_shift
from fp_export.numerics.scales import Constraint, constrained_scale, expand_groups, n_groups


@dataclass(frozen=True)
class ShiftCastWeight:
    """An M1/M2 FP4 weight as the ``Fp4ToFp8`` op consumes it: ``packed`` uint8 [out, in/2], ``shift``
    int8 [out, n] in [SHIFT_MIN, SHIFT_MAX], ``dq_scale`` float32 [out] applied after the GEMM, and
    the op's ``group_size`` (columns per shift; in_features per channel). For every element
    ``fp8(fp4 * 2**shift) * dq_scale`` equals ``QuantizedWeight.dequantize()`` exactly."""

    packed: torch.Tensor
    shift: torch.Tensor
    dq_scale: torch.Tensor
    group_size: int


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes uint8 [out, in] (one per element; 4-bit ones pack two per byte in ``tensors``), per-group
    scales float32 [out, n], and for M1/M2 ``scale_exp`` int8 [out, n] (M2 also ``row_scale`` [out])."""

    fmt: Format
    group_size: int | None
    constraint: Constraint
    codes: torch.Tensor
    scale: torch.Tensor
    scale_exp: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in] by the module docstring's rule."""
        return dequantize(self.codes, self.fmt, self.group_size, self.scale, self.scale_exp, self.row_scale)

    def to_shift_cast(self) -> ShiftCastWeight | None:
        """The shift-cast lowering (FP4 under M1/M2; None for every other weight). M2: shift =
        exp + SHIFT_MAX, dq = row_scale * 2**-SHIFT_MAX. M1: shift = exp - max_row(exp) + SHIFT_MAX,
        dq = 2**(max_row(exp) - SHIFT_MAX). Both are exact re-basings of the stored exponents."""
        if self.fmt.name != "fp4_e2m1" or self.constraint == "none":
            return None
        exp = self.scale_exp.to(torch.int32)
        m2 = self.row_scale is not None
        base = torch.zeros(exp.shape[0], dtype=torch.int32) if m2 else exp.amax(dim=1)
        shift = exp - base[:, None] + SHIFT_MAX
        check_shift(shift)
        dq = torch.ldexp(torch.ones(exp.shape[0]), (base - SHIFT_MAX).float())
        if m2:
            dq = dq * self.row_scale.float()
        return ShiftCastWeight(pack_nibbles(self.codes), shift.to(torch.int8), dq,
                               self.group_size or self.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of this weight, by suffix (``qweight``, ``scale`` ...)."""
        out = {"qweight": pack_nibbles(self.codes) if self.fmt.packed else self.codes}
        if self.constraint == "none":
            out["scale"] = self.scale
        else:
            out["scale_exp"] = self.scale_exp
        if self.constraint == "m2":
            out["row_scale"] = self.row_scale
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(
        cls, t: dict[str, torch.Tensor], fmt_name: str, group_size: int | None, constraint: Constraint,
        in_features: int,
    ) -> "QuantizedWeight":
        """The inverse of ``tensors``; shapes are checked against ``in_features`` and the groups."""
        fmt = get_format(fmt_name)
        codes = unpack_nibbles(t["qweight"]) if fmt.packed else t["qweight"]
        if codes.shape[1] != in_features:
            raise ValueError(f"qweight decodes to {codes.shape[1]} columns, expected {in_features}")
        exp, row = t.get("scale_exp"), t.get("row_scale")
        scale = t["scale"] if constraint == "none" else constrained_scale(exp, row)
        if scale.shape[1] != n_groups(in_features, group_size):
            raise ValueError(f"{scale.shape[1]} scale groups, expected {n_groups(in_features, group_size)} "
                             f"for in_features {in_features} and group size {group_size}")
        return cls(fmt, group_size, constraint, codes, scale, exp, row)


def dequantize(
    codes: torch.Tensor,
    fmt: Format,
    group_size: int | None,
    scale: torch.Tensor,
    scale_exp: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """float32 [out, k] of codes uint8 [out, k] with per-group ``scale`` / ``scale_exp`` [out, n]
    (columns of group ``i // group_size``) by the module docstring's rule (``check``: ``decode``'s)."""
    q = decode(codes, fmt, check)
    k = q.shape[1]
    if scale_exp is None:
        return q * expand_groups(scale, group_size, k)
    w = torch.ldexp(q, expand_groups(scale_exp, group_size, k).float())
    return w if row_scale is None else w * row_scale[:, None]
