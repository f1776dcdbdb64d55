"""Quantized weight tensors: the record every quantizer returns, round-to-nearest, dequantization.

Dequantization rule (float32, in this order, exactly what checkpoints document):
  q = decode(codes)                                   # formats.decode, exact
  unconstrained: W[o, i] = q[o, i] * scale[o, i // G]
  M1:            W[o, i] = q[o, i] * 2**scale_exp[o, i // G]
  M2:            W[o, i] = (q[o, i] * 2**scale_exp[o, i // G]) * row_scale[o]
with G = group_size, or G = in_features per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp_export.numerics.formats import Format, decode, encode, get_format, pack_nibbles, unpack_nibbles
from fp_export.numerics.scales import Constraint, expand_groups, weight_scales


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes uint8 [out, in] (one per element; ``packed_codes`` packs 4-bit ones), per-group scales
    float32 [out, n], and for M1/M2 ``scale_exp`` int8 [out, n] (M2 also ``row_scale`` [out])."""

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
        return dequantize(self.codes, self.fmt, self.scale, self.scale_exp, self.row_scale)

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
        fmt = get_format(fmt_name)
        codes = unpack_nibbles(t["qweight"]) if fmt.packed else t["qweight"]
        if codes.shape[1] != in_features:
            raise ValueError(f"qweight decodes to {codes.shape[1]} columns, expected {in_features}")
        exp, row = t.get("scale_exp"), t.get("row_scale")
        if constraint == "none":
            scale = t["scale"]
        else:
            scale = torch.ldexp(torch.ones(exp.shape), exp.float())
            if constraint == "m2":
                scale = scale * row[:, None]
        return cls(fmt, group_size, constraint, codes, scale, exp, row)


def dequantize(
    codes: torch.Tensor,
    fmt: Format,
    scale: torch.Tensor,
    scale_exp: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    q = decode(codes, fmt)
    if scale_exp is None:
        return q * expand_groups(scale, q.shape[1])
    w = torch.ldexp(q, expand_groups(scale_exp, q.shape[1]).float())
    return w if row_scale is None else w * row_scale[:, None]


def quantize_columns(w: torch.Tensor, scale: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Codes of ``w`` [out, k] under per-row ``scale`` [out, 1] or [out, k]: encode(w / scale)."""
    return encode(w / scale, fmt)


def rtn_quantize(
    w: torch.Tensor, fmt_name: str, group_size: int | None, constraint: Constraint = "none"
) -> QuantizedWeight:
    """Round-to-nearest quantization of a weight [out, in] (the baseline GPTQ improves on)."""
    fmt = get_format(fmt_name)
    w = w.float()
    scale, exp, ref = weight_scales(w, fmt, group_size, constraint)
    codes = quantize_columns(w, expand_groups(scale, w.shape[1]), fmt)
    return QuantizedWeight(fmt, group_size, constraint, codes, scale, exp, ref.row_scale)
