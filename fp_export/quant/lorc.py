"""LoRC, low-rank compensation (ZeroQuant-V2, arXiv 2303.08302).

The quantization error E = W - dequant(Q) [out, in] is approximated by its rank-r truncated SVD
U_r S_r V_r^T (top singular triplets from the eigen-decomposition of the smaller Gram matrix), kept as two factors u = U_r S_r^1/2 [out, r] and v = S_r^1/2 V_r^T [r, in]; the layer
computes x W_q^T + (x v^T) u^T. Factors may themselves be stored on an 8-bit grid with one scale
per factor row (u: [out], v: [r]); their dequantized values are what the forward pass uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp_export.numerics.formats import decode, encode, get_format
from fp_export.numerics.scales import absmax_scale, group_amax


@dataclass(frozen=True)
class LoRCFactors:
    """u float32 [out, r], v float32 [r, in] (dequantized); with ``factor_format`` their codes and
    per-row scales (u_scale [out], v_scale [r]) are what a checkpoint stores."""

    u: torch.Tensor
    v: torch.Tensor
    factor_format: str = "none"
    u_codes: torch.Tensor | None = None
    v_codes: torch.Tensor | None = None
    u_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.factor_format == "none":
            return {"lorc_u": self.u.contiguous(), "lorc_v": self.v.contiguous()}
        return {"lorc_u": self.u_codes, "lorc_v": self.v_codes,
                "lorc_u_scale": self.u_scale, "lorc_v_scale": self.v_scale}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], factor_format: str) -> "LoRCFactors":
        if factor_format == "none":
            return cls(t["lorc_u"].float(), t["lorc_v"].float())
        u = _dequant_rows(t["lorc_u"], t["lorc_u_scale"], factor_format)
        v = _dequant_rows(t["lorc_v"], t["lorc_v_scale"], factor_format)
        return cls(u, v, factor_format, t["lorc_u"], t["lorc_v"], t["lorc_u_scale"], t["lorc_v_scale"])


def _dequant_rows(codes: torch.Tensor, scale: torch.Tensor, fmt_name: str) -> torch.Tensor:
    return decode(codes, get_format(fmt_name)) * scale[:, None]


def _quant_rows(x: torch.Tensor, fmt_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric codes uint8 [rows, cols] and scales float32 [rows] of a float32 matrix."""
    fmt = get_format(fmt_name)
    scale = absmax_scale(group_amax(x, None)[:, 0], fmt.max)
    return encode(x / scale[:, None], fmt), scale


def top_singular(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets (U [out, r], S [r], Vh [r, in]) of ``error`` in float64, from
    the eigen-decomposition of the smaller Gram matrix (deterministic; each right singular vector's
    largest-magnitude entry made positive)."""
    e = error.double()
    tall = e.shape[0] >= e.shape[1]
    gram = e.T @ e if tall else e @ e.T
    vals, vecs = torch.linalg.eigh(gram)
    vals, vecs = vals.flip(0)[:rank].clamp(min=0), vecs.flip(1)[:, :rank]
    s = vals.sqrt()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if tall:
        v = vecs
        u = (e @ v) / safe
    else:
        u = vecs
        v = (e.T @ u) / safe
    sign = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, s, (v * sign).T


def lorc_factors(error: torch.Tensor, rank: int, factor_format: str = "none") -> LoRCFactors:
    """Rank-``rank`` factors of ``error`` [out, in] (float64 decomposition, float32 factors)."""
    rank = min(rank, *error.shape)
    U, S, Vh = top_singular(error, rank)
    root = S.sqrt()
    u = (U * root).float()
    v = (root[:, None] * Vh).float()
    if factor_format == "none":
        return LoRCFactors(u, v)
    uc, us = _quant_rows(u, factor_format)
    vc, vs = _quant_rows(v, factor_format)
    return LoRCFactors(
        _dequant_rows(uc, us, factor_format), _dequant_rows(vc, vs, factor_format),
        factor_format, uc, vc, us, vs,
    )
