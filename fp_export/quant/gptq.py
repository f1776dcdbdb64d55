"""GPTQ (Frantar et al., arXiv 2210.17323): the algorithm alone, over any ``WeightQuantizer``.

Columns are quantized one at a time; each column's error, divided by the diagonal of the upper
Cholesky factor of H^-1, is fed back to the columns not yet quantized. Updates are applied lazily
in blocks of ``block_size`` columns. H = 2/n X X^T of the layer's calibration inputs, damped by
``damp`` times its mean diagonal (raised tenfold, up to ``MAX_DAMP_RETRIES`` times, while H is not
positive definite, with a warning). Group scales are chosen at each group's first column from the
already-updated weights, as the reference implementation does; with act-order (or per channel)
they are fixed up front from the unquantized weight ("static groups").
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from fp_export.quant.quantizer import WeightQuantizer
from fp_export.quant.weights import QuantizedWeight

log = logging.getLogger("fp_export")
MAX_DAMP_RETRIES = 3
# torch threads for the per-column loop on the CPU (None: torch's setting). Its ops are tiny
# ([out, 1] columns, K=1 outer products, exact max reductions), so the thread count cannot change
# their results, only their cost: extra OpenMP threads there are pure overhead, 13x slower on a
# busy 2-core machine (benchmarks/cpu_threads.md).
COLUMN_THREADS: int | None = 1


class HessianAccumulator:
    """Running H = 2/n sum x x^T over calibration rows x [in] (float64, on ``device``)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """``x``: any [..., in] input batch to the layer."""
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float64)
        self.sum += x.T @ x
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("no calibration rows reached this layer")
        return (2.0 / self.rows) * self.sum


def inverse_cholesky(H: torch.Tensor, damp: float, name: str = "") -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, float32. Retries with tenfold
    damping while H is not positive definite; raises after ``MAX_DAMP_RETRIES``."""
    mean_diag = torch.mean(torch.diag(H))
    for attempt in range(MAX_DAMP_RETRIES + 1):
        damped = H.clone()  # H + damp * mean * I without an [in, in] identity (GPU memory)
        damped.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
        if attempt < MAX_DAMP_RETRIES:
            log.warning("%s: Hessian not positive definite with damp %g; retrying with %g", name or "layer",
                        damp, damp * 10)
            damp *= 10
    raise ValueError(f"{name or 'layer'}: Hessian not positive definite even with damp {damp:g}")


def gptq(w: torch.Tensor, hessian: torch.Tensor, quantizer: WeightQuantizer, damp: float = 0.01,
         block_size: int = 128, act_order: bool = False, name: str = "") -> QuantizedWeight:
    """Quantize ``w`` [out, in] given ``hessian`` [in, in] (same device). Returns the codes and
    scales; its ``dequantize()`` is the weight the error feedback assumed, bit for bit."""
    W = w.detach().float().clone()
    out_f, in_f = W.shape
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    quantizer.begin(W)
    static = act_order or quantizer.group_size is None
    if static:
        quantizer.fit_all(W)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_cholesky(H, damp, name)

    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
    order = perm.tolist() if perm is not None else range(in_f)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with _column_threads(W.device):
            _quantize_block(W, W1, Err1, Hinv1, codes, quantizer, order, static, i1, i2)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return quantizer.result(codes)


@contextmanager
def _column_threads(device: torch.device):
    saved = torch.get_num_threads()
    change = device.type == "cpu" and COLUMN_THREADS is not None and COLUMN_THREADS != saved
    if change:
        torch.set_num_threads(COLUMN_THREADS)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(saved)


def _quantize_block(W, W1, Err1, Hinv1, codes, quantizer, order, static, i1, i2) -> None:
    """Columns i1..i2 of GPTQ one at a time, in place: codes, W1 (updated block), Err1 (errors)."""
    for i in range(i2 - i1):
        col = i1 + i
        orig = order[col]
        g = quantizer.group_of(orig)
        if not static and orig == g * quantizer.group_size:
            width = quantizer.columns_of(g)
            inside = min(width, W1.shape[1] - i)
            quantizer.fit_group(g, torch.cat([W1[:, i : i + inside], W[:, col + inside : col + width]], dim=1))
        c, q = quantizer.quantize(W1[:, i : i + 1], g)
        codes[:, orig] = c[:, 0]
        err = (W1[:, i] - q[:, 0]) / Hinv1[i, i]
        W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
        Err1[:, i] = err
