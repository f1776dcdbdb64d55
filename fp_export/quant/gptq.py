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

import importlib.util
import logging
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

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
# On CUDA, run each block of columns as a replayed CUDA graph (bit-identical to eager execution:
# the same kernels on the same values; tests/test_gpu_quantize.py). False: eager, for debugging.
CUDA_GRAPHS = True
# On CUDA, run each block whose scales are fixed before its first column as one Triton kernel
# (``quant.gptq_kernel``; bit-identical to the eager and graphed loops, tests/test_gptq_kernel.py).
BLOCK_KERNEL = True


class HessianAccumulator:
    """Running H = 2/n sum x x^T over calibration rows x [in] (float64, on ``device``)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.rows = 0
        self.done = False

    def add(self, x: torch.Tensor) -> None:
        """``x``: any [..., in] input batch to the layer."""
        if self.done:
            raise RuntimeError("HessianAccumulator.add after hessian()")
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float64)
        self.sum += x.T @ x
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H [in, in] float64, scaled in place on the first call (no copy: a 70B-shaped down_proj's
        Hessian is 6.6 GiB); later calls return the same tensor."""
        if self.rows == 0:
            raise ValueError("no calibration rows reached this layer")
        if not self.done:
            self.sum.mul_(2.0 / self.rows)
            self.done = True
        return self.sum


def inverse_cholesky(H: torch.Tensor, damp: float, name: str = "") -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U, float32 [in, in].

    Without forming the inverse: with J the reversal permutation, J H J = L L^T gives
    H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular; so one Cholesky factorization
    and one triangular solve (half the work of factor, invert, factor again). ``H`` (float64) is
    consumed: its storage holds the flipped, damped matrix, then L. Retries with tenfold damping
    while H is not positive definite; raises after ``MAX_DAMP_RETRIES``. Peak memory: two [in, in]
    float64 matrices besides H (a 70B-shaped down_proj's are 6.1 GiB each)."""
    H.copy_(torch.flip(H, (0, 1)))
    diag = torch.diag(H)
    mean_diag = torch.mean(diag)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        H.diagonal().copy_(diag + damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            H.copy_(L)
            del L
            inverse = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            torch.linalg.solve_triangular(H, inverse, upper=False, out=inverse)
            return inverse.float().flip(0, 1)
        del L
        if attempt < MAX_DAMP_RETRIES:
            log.warning("%s: Hessian not positive definite with damp %g; retrying with %g", name or "layer",
                        damp, damp * 10)
            damp *= 10
    raise ValueError(f"{name or 'layer'}: Hessian not positive definite even with damp {damp:g}")


@dataclass(frozen=True)
class Factor:
    """What GPTQ needs of one Hessian [in, in]: ``hinv`` the upper Cholesky factor of its damped
    inverse, float32 [in, in], rows and columns in processing order; ``perm`` that order (int64 [in],
    act-order) or None (natural order); ``dead`` bool [in], the inputs no calibration row reached
    (their weights are zeroed)."""

    hinv: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor


def factor(hessian: torch.Tensor, damp: float, act_order: bool, name: str = "") -> Factor:
    """``Factor`` of ``hessian`` (float64 [in, in], not modified). The last one is kept while its
    Hessian tensor lives unmodified: linears fed the same input (q/k/v, gate/up; a grid's MoFQ
    alternatives) share one factorization."""
    key = (hessian._version, damp, act_order)
    if _LAST and _LAST[0]() is hessian and _LAST[1] == key:
        return _LAST[2]
    _LAST.clear()  # the previous factor's memory is free before this one is computed
    if not torch.isfinite(hessian).all():
        raise ValueError(f"{name or 'layer'}: Hessian has NaN/Inf values (calibration activations overflowed?)")
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    f = Factor(inverse_cholesky(H, damp, name), perm, dead)
    _LAST[:] = [weakref.ref(hessian, lambda _ref: _LAST.clear()), key, f]
    return f


_LAST: list = []  # [weakref to the Hessian, (its version, damp, act_order), its Factor], or empty


def gptq(w: torch.Tensor, hessian: torch.Tensor, quantizer: WeightQuantizer, damp: float = 0.01,
         block_size: int = 128, act_order: bool = False, name: str = "") -> QuantizedWeight:
    """Quantize ``w`` [out, in] given ``hessian`` [in, in] (same device). Returns the codes and
    scales; its ``dequantize()`` is the weight the error feedback assumed, bit for bit. On a CUDA
    device each block of columns runs as one Triton kernel (``BLOCK_KERNEL``, blocks whose scales
    are known when they start) or as a replayed CUDA graph (``CUDA_GRAPHS``): the same values as
    eager execution, without the per-operation launch cost. No host synchronization per block."""
    W = w.detach().float().clone()
    if not torch.isfinite(W).all():
        raise ValueError(f"{name or 'layer'}: weight has {int((~torch.isfinite(W)).sum())} NaN/Inf values")
    out_f, in_f = W.shape
    f = factor(hessian, damp, act_order, name)
    W[:, f.dead] = 0.0
    quantizer.begin(W)
    static = act_order or quantizer.group_size is None
    if static:
        quantizer.fit_all(W)
    if f.perm is not None:
        W = W[:, f.perm]
    Hinv = f.hinv

    order = f.perm.tolist() if f.perm is not None else range(in_f)
    bounds = [(i1, min(i1 + block_size, in_f)) for i1 in range(0, in_f, block_size)]
    plans = [_plan(quantizer, order, static, i1, i2) for i1, i2 in bounds]
    index = _Index(plans, quantizer, order, W.device)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)  # in processing order
    graphed = W.is_cuda and CUDA_GRAPHS
    kernel = BLOCK_KERNEL and block_size <= 128 and _kernel_runs_on(W.device)  # 128: the kernel's tile
    if kernel:
        from fp_export.quant import gptq_kernel  # imports triton
        err = torch.empty(out_f, block_size, device=W.device)
    for k, ((i1, i2), plan) in enumerate(zip(bounds, plans)):
        if kernel and plan.scales_before:
            Err1 = err[:, : i2 - i1]
            if plan.fit[0]:
                quantizer.fit_group(index.group_at[i1], W[:, i1 : i1 + plan.fit[0]])
            gptq_kernel.quantize_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], quantizer, index.col_group[i1:i2], Err1,
                                       codes[:, i1:i2])
        else:
            slots = index.slots[k]
            args = (W[:, i1:i2], W[:, i2 : i2 + plan.ahead], Hinv[i1:i2, i1:i2], quantizer, slots, plan)
            Err1, codes1, win = _graphed_block(*args) if graphed else _eager_block(*args)
            if plan.fitted:
                quantizer.store(win, slots, index.fitted[k])
            codes[:, i1:i2] = codes1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # the lazy update of the columns after the block
    if f.perm is not None:
        codes = torch.empty_like(codes).index_copy_(1, f.perm, codes)
    return quantizer.result(codes)


def _kernel_runs_on(device: torch.device) -> bool:
    """The block kernel runs compiled on CUDA, and on the CPU in Triton's interpreter."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
    return device.type == "cuda" or interpreted


class _Index:
    """The device-side indices of a GPTQ run's blocks, moved to ``device`` in one copy: per block
    ``slots`` and ``fitted`` (int64, the ``_BlockPlan``'s), and per column (processing order) its
    quantizer group ``col_group`` (int32 [in], the kernel's); ``group_at`` the same on the host."""

    def __init__(self, plans: list, quantizer: WeightQuantizer, order, device: torch.device):
        self.group_at = [quantizer.group_of(c) for c in order]
        parts = [list(p.slots) for p in plans] + [list(p.fitted) for p in plans]
        flat = torch.tensor([v for part in parts for v in part] + self.group_at, dtype=torch.long)
        flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat
        pieces = flat.split([len(part) for part in parts] + [len(self.group_at)])
        self.slots, self.fitted = pieces[: len(plans)], pieces[len(plans) : 2 * len(plans)]
        self.col_group = pieces[-1].int()


@dataclass(frozen=True)
class _BlockPlan:
    """GPTQ columns i1..i2 in terms of a quantizer window (``WeightQuantizer.window``): ``slots``
    the quantizer's groups the window holds, ``col_slot`` each column's window group, ``fit`` the
    group's width at a column where its scale is fitted (else 0), ``ahead`` the columns past the
    block those fits read, ``fitted`` the window groups fitted in the block."""

    slots: tuple[int, ...]
    col_slot: tuple[int, ...]
    fit: tuple[int, ...]
    ahead: int

    @property
    def fitted(self) -> tuple[int, ...]:
        return tuple(s for s, w in zip(self.col_slot, self.fit) if w)

    @property
    def scales_before(self) -> bool:
        """No group is fitted after the block's first column (every scale known when it starts)."""
        return not any(self.fit[1:])


def _plan(quantizer: WeightQuantizer, order, static: bool, i1: int, i2: int) -> _BlockPlan:
    """Static groups (scales fixed up front, columns possibly permuted): one window group per
    column. Otherwise the block's groups in order, each fitted at its first column from the
    already-updated weights, as the reference implementation does."""
    n = i2 - i1
    if static:
        return _BlockPlan(tuple(quantizer.group_of(order[c]) for c in range(i1, i2)), tuple(range(n)), (0,) * n, 0)
    groups = [quantizer.group_of(c) for c in range(i1, i2)]
    slots = tuple(sorted(set(groups)))
    fit = tuple(quantizer.columns_of(g) if c == g * quantizer.group_size else 0 for c, g in zip(range(i1, i2), groups))
    ahead = max([i1 + i + w - i2 for i, w in enumerate(fit) if w] + [0])
    return _BlockPlan(slots, tuple(g - slots[0] for g in groups), fit, ahead)


def _eager_block(W1, ahead, Hinv1, quantizer, slots, plan):
    win = quantizer.window(slots)
    W1 = W1.clone()
    Err1 = torch.zeros_like(W1)
    codes1 = torch.zeros(W1.shape, dtype=torch.uint8, device=W1.device)
    with _column_threads(W1.device):
        _quantize_block(W1, ahead, Err1, Hinv1, codes1, win, plan)
    return Err1, codes1, win


@dataclass
class _Graph:
    """A captured ``_quantize_block`` and the fixed buffers it reads and writes."""

    W1: torch.Tensor
    ahead: torch.Tensor
    Hinv1: torch.Tensor
    win: WeightQuantizer
    Err1: torch.Tensor
    codes1: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None


def _graphed_block(W1, ahead, Hinv1, quantizer, slots, plan):
    """``_eager_block`` as a CUDA graph, captured once per block shape and plan (and reused by every
    layer of that shape); its outputs are its buffers, valid until the next block is enqueued."""
    key = (W1.device, *W1.shape, plan.col_slot, plan.fit, plan.ahead, quantizer.fmt.name, quantizer.constraint)
    g = _GRAPHS.get(key)
    if g is None:
        if len(_GRAPHS) >= MAX_GRAPHS:
            _GRAPHS.clear()
        g = _GRAPHS[key] = _capture(W1, ahead, Hinv1, quantizer, slots, plan)
    g.W1.copy_(W1)
    g.ahead.copy_(ahead)
    g.Hinv1.copy_(Hinv1)
    quantizer.refill(g.win, slots)
    g.graph.replay()
    return g.Err1, g.codes1, g.win


def _capture(W1, ahead, Hinv1, quantizer, slots, plan) -> _Graph:
    dev = W1.device
    g = _Graph(W1.clone(), ahead.clone(), Hinv1.clone(), quantizer.window(slots), torch.zeros_like(W1),
               torch.zeros(W1.shape, dtype=torch.uint8, device=dev))
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up outside the capture (library handles, workspaces)
        _quantize_block(g.W1.clone(), g.ahead, g.Err1, g.Hinv1, g.codes1, quantizer.window(slots), plan)
    torch.cuda.current_stream(dev).wait_stream(side)
    g.graph = torch.cuda.CUDAGraph()
    if dev not in _POOLS:
        _POOLS[dev] = torch.cuda.graph_pool_handle()
    with torch.cuda.graph(g.graph, pool=_POOLS[dev]):
        _quantize_block(g.W1, g.ahead, g.Err1, g.Hinv1, g.codes1, g.win, plan)
    return g


_GRAPHS: dict[tuple, _Graph] = {}
_POOLS: dict[torch.device, tuple] = {}
MAX_GRAPHS = 64


def release_graphs() -> None:
    """Drop the captured column-block graphs and their buffers (a quantize job calls it at its end)."""
    _GRAPHS.clear()
    _POOLS.clear()


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


def _quantize_block(W1, ahead, Err1, Hinv1, codes1, win, plan) -> None:
    """One block of GPTQ columns one at a time, in place, with no device synchronization: W1
    [out, b] the block (updated), ``ahead`` [out, plan.ahead] the columns after it, Err1 [out, b]
    the scaled errors, codes1 [out, b] uint8, ``win`` the quantizer window of ``plan``."""
    for i in range(W1.shape[1]):
        g, width = plan.col_slot[i], plan.fit[i]
        if width:  # the group's columns from i on: in the block, then in ``ahead`` past it
            inside = min(width, W1.shape[1] - i)
            win.fit_group(g, torch.cat([W1[:, i : i + inside], ahead[:, : width - inside]], dim=1))
        c, q = win.quantize(W1[:, i : i + 1], g)
        codes1[:, i] = c[:, 0]
        err = (W1[:, i] - q[:, 0]) / Hinv1[i, i]
        # an elementwise outer product, not a K=1 matmul: one rounding per element on every backend
        # (cuBLAS adds the product to a +0 accumulator, which turns a -0 product into +0)
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        Err1[:, i] = err

