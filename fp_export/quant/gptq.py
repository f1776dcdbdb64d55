"""GPTQ (Frantar et al., arXiv 2210.17323) over any weight grid of ``formats``.

Columns are quantized one at a time; each column's error, divided by the diagonal of the upper
Cholesky factor of H^-1, is fed back to the columns not yet quantized. Updates are applied lazily
in blocks of ``block_size`` columns. H = 2/n X X^T of the layer's calibration inputs, damped by
``damp`` times its mean diagonal. Group scales (and M1/M2 exponents) are chosen at each group's
first column from the already-updated weights, as the reference implementation does; with
act-order they are fixed up front from the unquantized weight ("static groups"), so every group
keeps one scale however its columns are permuted.
"""

from __future__ import annotations

import torch

from fp_export.numerics.formats import get_format
from fp_export.ptq.recipe import GPTQConfig
from fp_export.numerics.scales import Constraint, group_amax, group_scales, row_reference, weight_scales
from fp_export.quant.weights import QuantizedWeight, dequantize, quantize_columns


class HessianAccumulator:
    """Running H = 2/n sum x x^T over calibration rows x [in] (float64, order-independent sum)."""

    def __init__(self, in_features: int):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """``x``: any [..., in] input batch to the layer."""
        x = x.reshape(-1, x.shape[-1]).double()
        self.sum += x.T @ x
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("no calibration rows reached this layer")
        return (2.0 / self.rows) * self.sum


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    fmt_name: str,
    group_size: int | None,
    constraint: Constraint,
    cfg: GPTQConfig,
) -> QuantizedWeight:
    """Quantize ``w`` [out, in] with GPTQ given ``hessian`` [in, in]. Returns the codes and scales;
    its ``dequantize()`` is the weight the error feedback assumed, bit for bit."""
    fmt = get_format(fmt_name)
    W = w.detach().float().clone()
    out_f, in_f = W.shape
    G = in_f if group_size is None else group_size
    if in_f % G:
        raise ValueError(f"group size {G} does not divide in_features {in_f}")
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    ref = row_reference(W, fmt, constraint)
    n_groups = in_f // G
    scale = torch.zeros(out_f, n_groups)
    exp = torch.zeros(out_f, n_groups, dtype=torch.int8) if constraint != "none" else None
    static = cfg.act_order or group_size is None
    if static:
        s, e, _ = weight_scales(W, fmt, group_size, constraint)
        scale.copy_(s)
        if exp is not None:
            exp.copy_(e)

    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if cfg.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H += cfg.damp * torch.mean(torch.diag(H)) * torch.eye(in_f, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()

    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    for i1 in range(0, in_f, cfg.block_size):
        i2 = min(i1 + cfg.block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col]) if perm is not None else col
            g = orig // G
            if not static and orig % G == 0:
                amax = group_amax(_group_now(W, W1, i, col, G), None)
                s, e = group_scales(amax, fmt, constraint, ref)
                scale[:, g] = s[:, 0]
                if exp is not None:
                    exp[:, g] = e[:, 0]
            s_col = scale[:, g : g + 1]
            c = quantize_columns(W1[:, i : i + 1], s_col, fmt)
            codes[:, orig] = c[:, 0]
            q = dequantize(c, fmt, scale[:, g : g + 1], None if exp is None else exp[:, g : g + 1],
                           ref.row_scale)[:, 0]
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return QuantizedWeight(fmt, group_size, constraint, codes, scale, exp, ref.row_scale)


def _group_now(W: torch.Tensor, W1: torch.Tensor, i: int, col: int, G: int) -> torch.Tensor:
    """Current values [out, G] of columns col..col+G: those inside the lazy block from W1 (with
    every update so far), those past it from W (updated up to the block's start)."""
    inside = min(G, W1.shape[1] - i)
    return torch.cat([W1[:, i : i + inside], W[:, col + inside : col + G]], dim=1)
