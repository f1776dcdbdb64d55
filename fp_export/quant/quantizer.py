"""``WeightQuantizer``: a weight grid, a group size and a scale constraint, as one object.

It owns the choices a weight quantization algorithm delegates: the per-row anchors of M1/M2
(from the unquantized weight), each group's scale (``numerics.scales``), and rounding a column
onto the grid. Round-to-nearest (``rtn``) and GPTQ (``quant.gptq``) both drive it; GPTQ fits
each group when it reaches the group's first column (or every group up front: static groups).
"""

from __future__ import annotations

import copy

import torch

from fp_export.numerics.formats import Format, encode, get_format
from fp_export.numerics.scales import (
    Constraint, RowReference, expand_groups, group_amax, group_scales, n_groups, row_reference,
)
from fp_export.quant.weights import QuantizedWeight, dequantize


class WeightQuantizer:
    """Quantizes one weight [out, in] at a time: ``begin(w)``, then ``fit_*``, ``quantize`` columns,
    and ``result(codes)``. Tensors stay on ``w``'s device."""

    def __init__(self, fmt: Format | str, group_size: int | None, constraint: Constraint = "none"):
        self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        if constraint != "none" and self.fmt.name != "fp4_e2m1":
            raise ValueError(f"scale constraint {constraint} applies to fp4_e2m1 weights, not {self.fmt.name}")
        self.group_size = group_size
        self.constraint = constraint

    def begin(self, w: torch.Tensor) -> None:
        """Anchor the rows on the unquantized weight ``w`` [out, in]; allocate the scale tables."""
        out_f, in_f = w.shape
        self.in_features = in_f
        self.ref: RowReference = row_reference(w, self.fmt, self.constraint)
        n = n_groups(in_f, self.group_size)
        self.scale = torch.zeros(out_f, n, device=w.device)
        self.exp = None if self.constraint == "none" else torch.zeros(out_f, n, dtype=torch.int8, device=w.device)

    def group_of(self, col: int) -> int:
        return 0 if self.group_size is None else col // self.group_size

    def columns_of(self, g: int) -> int:
        """Width of group ``g`` (the last one may be partial)."""
        if self.group_size is None:
            return self.in_features
        return min(self.group_size, self.in_features - g * self.group_size)

    def fit_all(self, w: torch.Tensor) -> None:
        """Every group's scale from ``w`` [out, in] (round-to-nearest, static groups)."""
        s, e = group_scales(group_amax(w, self.group_size), self.fmt, self.constraint, self.ref)
        self.scale.copy_(s)
        if self.exp is not None:
            self.exp.copy_(e)

    def fit_group(self, g: int, cols: torch.Tensor) -> None:
        """Group ``g``'s scale from its current values ``cols`` [out, width]."""
        s, e = group_scales(group_amax(cols, None), self.fmt, self.constraint, self.ref)
        self.scale[:, g] = s[:, 0]
        if self.exp is not None:
            self.exp[:, g] = e[:, 0]

    def quantize(self, cols: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns ``cols`` [out, k] of group ``g`` -> (codes uint8 [out, k], their dequantized
        values float32 [out, k], bit-identical to ``QuantizedWeight.dequantize``). ``cols`` must be
        finite (the caller checks; no device synchronization here)."""
        scale = self.scale[:, g : g + 1]
        exp = None if self.exp is None else self.exp[:, g : g + 1]
        codes = encode(cols / scale, self.fmt, check=False)
        return codes, dequantize(codes, self.fmt, None, scale, exp, self.ref.row_scale, check=False)

    def window(self, slots: torch.Tensor) -> "WeightQuantizer":
        """A quantizer whose groups 0..len(slots)-1 are this one's groups ``slots`` (int64 [k]):
        the same grid and rows, with its own copies of their scales (and the row reference), so
        that a block of GPTQ columns can run on fixed buffers (``quant.gptq``'s CUDA graphs)."""
        win = copy.copy(self)
        win.scale = self.scale.index_select(1, slots)
        win.exp = None if self.exp is None else self.exp.index_select(1, slots)
        win.ref = RowReference(*(None if t is None else t.clone() for t in (self.ref.row_scale, self.ref.row_exp)))
        return win

    def refill(self, win: "WeightQuantizer", slots: torch.Tensor) -> None:
        """Copy groups ``slots`` and the row reference into the buffers of ``win`` (from ``window``)."""
        torch.index_select(self.scale, 1, slots, out=win.scale)
        if self.exp is not None:
            torch.index_select(self.exp, 1, slots, out=win.exp)
        for mine, theirs in zip((self.ref.row_scale, self.ref.row_exp), (win.ref.row_scale, win.ref.row_exp)):
            if mine is not None:
                theirs.copy_(mine)

    def store(self, win: "WeightQuantizer", slots: torch.Tensor, fitted: torch.Tensor) -> None:
        """Write back the groups of ``win`` at positions ``fitted`` (int64) as groups ``slots[fitted]``."""
        self.scale[:, slots[fitted]] = win.scale[:, fitted]
        if self.exp is not None:
            self.exp[:, slots[fitted]] = win.exp[:, fitted]

    def result(self, codes: torch.Tensor) -> QuantizedWeight:
        return QuantizedWeight(self.fmt, self.group_size, self.constraint, codes, self.scale, self.exp,
                               self.ref.row_scale)

    def rtn(self, w: torch.Tensor) -> QuantizedWeight:
        """Round-to-nearest quantization of ``w`` [out, in] (the baseline GPTQ improves on)."""
        w = w.float()
        self.begin(w)
        self.fit_all(w)
        codes = encode(w / expand_groups(self.scale, self.group_size, w.shape[1]), self.fmt)
        return self.result(codes)
