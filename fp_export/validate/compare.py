"""Validation of an exported graph against the PyTorch quantized model, through Polygraphy.

Both runners see the same inputs: windows of the held-out text. Reported: max abs logit error and
the same relative to the largest reference logit, top-1 agreement and perplexity of each.
Two precisions (``validate_onnx``):
- float64 (semantics): the graph with its input-dependent arithmetic in float64
  (``float64_graph.to_float64``) against the model in float64 (``float64_model``); the
  quantizers round in float32 in both. Float32 rounding noise is gone, so any disagreement is a
  difference of function. Tolerances: perplexity within 0.5%, top-1 agreement >= 99%.
- float32 (the graph as exported): dynamic activation quantization turns float32 rounding
  differences between two correct backends into grid flips that cascade, and on models with
  outlier activations the flips move perplexity too. The report adds the PyTorch model's noise
  floor: its disagreement with itself when every weight is nudged by one float32 ulp in a
  seeded random direction, over ``Tolerances.floor_seeds`` seeds (top-1 agreement and
  perplexity shift per seed). A correct backend is one more such rounding realization, so it
  must look like a draw from that distribution: top-1 >= min(0.99, lowest floor agreement -
  0.005) and perplexity within max(0.5%, 2 x the largest floor shift); the factor 2 covers a
  draw beyond the largest of a few seeds (measured: benchmarks/validate_float32.md).
``validate_gpu``: the GPU runtime against ONNX Runtime, float32, with a wider floor margin.

Memory: windows run one batch at a time (one window when a batch's float64 logits would pass
1 GiB); each batch's logits are reduced to running sums (max error, top-1 hits, NLL in chunks of
``CHUNK_ROWS`` positions) and dropped, so no whole-vocabulary float64 copy is kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER
from torch import nn

from fp_export.evaluate.perplexity import window_nll
from fp_export.validate.float64_graph import to_float64
from fp_export.validate.float64_model import float64_model
from fp_export.validate.runners import TorchRunner, gpu_runner, onnxrt_runner

PRECISIONS = ("float64", "float32")


@dataclass(frozen=True)
class Tolerances:
    """Requirements of ``compare`` (module docstring): perplexity within ``ppl_rel`` and top-1
    agreement >= ``top1_min``; with a noise floor (``floor_seeds`` perturbed runs of the model),
    top-1 >= min(top1_min, lowest floor agreement - ``floor_margin``) and perplexity within
    max(ppl_rel, ``floor_ppl_factor`` x the largest floor perplexity shift)."""

    ppl_rel: float = 0.005
    top1_min: float = 0.99
    floor_margin: float = 0.005
    floor_seeds: int = 3
    floor_ppl_factor: float = 2.0



CHUNK_ROWS = 256  # logit rows per float64 chunk: 256 x 49152 x 8 B = 100 MB for a 49k vocabulary


def _window_nll(logits: np.ndarray, window: np.ndarray) -> float:
    """Summed next-token NLL of one window's logits [S, V] (``evaluate.window_nll`` over chunks of
    ``CHUNK_ROWS`` positions: the float64 copy is one chunk, never the whole [S, V])."""
    lg, w = torch.from_numpy(logits), torch.from_numpy(window)
    n = w.numel()
    return sum(window_nll(lg[i : min(i + CHUNK_ROWS, n - 1) + 1][None], w[i : min(i + CHUNK_ROWS, n - 1) + 1])
               for i in range(0, n - 1, CHUNK_ROWS))


@dataclass
class _Stats:
    """Running sums over batches, so that no batch's logits outlive its own comparison."""

    abs_err: float = 0.0
    ref_max: float = 0.0
    top1_hits: int = 0
    positions: int = 0
    nll: float = 0.0
    nll_ref: float = 0.0

    def add(self, got: np.ndarray, ref: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Fold in one batch: logits [B, S, V] of both runners, windows [B, S]. Returns the
        reference's top-1 ids [B, S]."""
        top_ref = np.empty(ids.shape, dtype=np.int64)
        for b in range(ids.shape[0]):
            for i in range(0, ids.shape[1], CHUNK_ROWS):
                g, r = got[b, i : i + CHUNK_ROWS], ref[b, i : i + CHUNK_ROWS]
                self.abs_err = max(self.abs_err, float(np.abs(g - r).max()))
                self.ref_max = max(self.ref_max, float(np.abs(r).max()))
                top_ref[b, i : i + CHUNK_ROWS] = r.argmax(-1)
                self.top1_hits += int((g.argmax(-1) == top_ref[b, i : i + CHUNK_ROWS]).sum())
            self.nll += _window_nll(got[b], ids[b])
            self.nll_ref += _window_nll(ref[b], ids[b])
        self.positions += ids.size
        return top_ref


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """Every float tensor the forward multiplies by: parameters and QuantLinear's dequantized
    weights and LoRC factors (buffers)."""
    out = [p for p in model.parameters() if p.is_floating_point()]
    out += [b for name, b in model.named_buffers() if b.is_floating_point() and name.rsplit(".", 1)[-1]
            in ("weight", "lorc_u", "lorc_v")]
    return out


def noise_floor(model: nn.Module, batches: list[np.ndarray], clean_top1: list[np.ndarray], clean_nll: float,
                seeds: int = 3) -> list[dict]:
    """The model's disagreement with itself under rounding-level perturbations: for each seed,
    every weight nudged by one float32 ulp up or down (a seeded random sign per element; the
    size of the rounding differences between two correct backends, at every layer), then
    {"top1": agreement with ``clean_top1`` (the unperturbed model's top-1 ids per batch),
    "ppl_rel_diff": |perplexity / clean perplexity - 1|} with ``clean_nll`` the unperturbed summed NLL."""
    tensors = _weights(model)
    saved = [t.detach().clone() for t in tensors]
    out = []
    try:
        with torch.no_grad():
            for seed in range(seeds):
                gen = torch.Generator().manual_seed(seed)
                for t, s in zip(tensors, saved):
                    up = torch.randint(0, 2, s.shape, generator=gen, dtype=torch.bool)
                    t.copy_(torch.nextafter(s, torch.where(up, float("inf"), float("-inf")).to(s.dtype)))
                hits = positions = 0
                nll = 0.0
                for b, c in zip(batches, clean_top1):
                    logits = model(torch.from_numpy(b), use_cache=False).logits.float().numpy()
                    hits += int((logits.argmax(-1) == c).sum())
                    positions += b.size
                    nll += sum(_window_nll(lg, w) for lg, w in zip(logits, b))
                    del logits
                out.append({"top1": hits / positions, "ppl_rel_diff": abs(math.expm1((nll - clean_nll) / _predicted(batches)))})
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
    return out


def _predicted(batches: list[np.ndarray]) -> int:
    return sum(b.shape[0] * (b.shape[1] - 1) for b in batches)


def compare(runner: BaseRunner, reference: BaseRunner, windows: torch.Tensor, floor_model: nn.Module | None = None,
            batch: int = 4, tol: Tolerances = Tolerances()) -> dict:
    """Run ``runner`` and ``reference`` on ``windows`` [n, seqlen] through Polygraphy's Comparator,
    one batch at a time (each batch's logits are reduced to running sums and dropped; batches
    shrink to one window when a batch's float64 logits would pass 1 GiB); returns the report
    dict (``passed`` says whether the tolerances hold). ``floor_model`` (the CPU PyTorch model)
    gives the noise floor that sets the top-1 and perplexity requirements (module docstring)."""
    vocab = getattr(getattr(floor_model or getattr(reference, "model", None), "config", None), "vocab_size", None)
    if vocab:
        batch = max(1, min(batch, 2**30 // (windows.shape[1] * vocab * 8)))
    batches = [b.numpy() for b in windows.split(batch)]
    G_LOGGER.module_severity = G_LOGGER.WARNING
    stats, clean_top1 = _Stats(), []
    for b in batches:
        results = Comparator.run([runner, reference], data_loader=[{"input_ids": b}])
        got, ref = results[runner.name][0]["logits"], results[reference.name][0]["logits"]
        del results
        clean_top1.append(stats.add(got, ref, b))
        del got, ref
    tokens = _predicted(batches)
    ppl, ppl_ref = math.exp(stats.nll / tokens), math.exp(stats.nll_ref / tokens)
    report = {
        "runner": runner.name,
        "reference": reference.name,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "max_abs_logit_error": stats.abs_err,
        "max_rel_logit_error": stats.abs_err / stats.ref_max,  # max |error| / max |reference logit|
        "top1_agreement": stats.top1_hits / stats.positions,
        "perplexity": ppl,
        "perplexity_reference": ppl_ref,
        "perplexity_rel_diff": abs(ppl / ppl_ref - 1),
        "tolerances": asdict(tol),
    }
    need, ppl_need = tol.top1_min, tol.ppl_rel
    if floor_model is not None:
        if getattr(reference, "model", None) is floor_model:  # its outputs are the clean pass
            clean_nll = stats.nll_ref
        else:
            clean_top1, clean_nll = [], 0.0
            with torch.no_grad():
                for b in batches:
                    logits = floor_model(torch.from_numpy(b), use_cache=False).logits.float().numpy()
                    clean_top1.append(logits.argmax(-1))
                    clean_nll += sum(_window_nll(lg, w) for lg, w in zip(logits, b))
                    del logits
        floor = noise_floor(floor_model, batches, clean_top1, clean_nll, tol.floor_seeds)
        report["noise_floor"] = floor
        report["noise_floor_top1"] = min(f["top1"] for f in floor)
        report["noise_floor_ppl_rel_diff"] = max(f["ppl_rel_diff"] for f in floor)
        need = min(tol.top1_min, report["noise_floor_top1"] - tol.floor_margin)
        ppl_need = max(tol.ppl_rel, tol.floor_ppl_factor * report["noise_floor_ppl_rel_diff"])
    report["top1_required"] = need
    report["ppl_rel_diff_allowed"] = ppl_need
    report["passed"] = report["perplexity_rel_diff"] <= ppl_need and report["top1_agreement"] >= need
    return report


def validate_onnx(model: nn.Module, proto: onnx.ModelProto, windows: torch.Tensor, precision: str = "float64",
                  tol: Tolerances = Tolerances()) -> dict:
    """ONNX Runtime on ``proto`` (a graph it runs, e.g. ``load_onnx_for_ort``'s) against the
    PyTorch quantized ``model`` on ``windows`` [n, seqlen], at ``precision`` (module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: {' or '.join(PRECISIONS)}")
    if precision == "float32":
        report = compare(onnxrt_runner(proto), TorchRunner(model, name="pytorch"), windows,
                         floor_model=model, tol=tol)
    else:
        runner = onnxrt_runner(to_float64(proto))
        with float64_model(model):
            report = compare(runner, TorchRunner(model, name="pytorch"), windows, tol=tol)
    return {"precision": precision, **report}


# The GPU runtime carries activations in bf16 between its kernels (8 significant bits, float32
# has 24), so it sits further from the float32 reference than a float32 backend: 2 points of top-1
# below the float32 noise floor instead of 0.5 (measured on the H100, default model, 8 windows:
# 96.1-96.3% against a 97.4% floor, perplexity within 0.03%). A wrong decode or scale costs tens
# of points.
GPU_TOLERANCES = Tolerances(floor_margin=0.02)


def validate_gpu(model: nn.Module, gpu_model: nn.Module, reference: onnx.ModelProto, windows: torch.Tensor,
                 mode: str = "fused") -> dict:
    """The GPU runtime of ``gpu_model`` (a second copy of the quantized ``model``, converted in
    place) against ONNX Runtime on ``reference`` (a graph ORT runs); ``model`` gives the noise floor."""
    report = compare(gpu_runner(gpu_model, mode), onnxrt_runner(reference), windows, floor_model=model,
                     tol=GPU_TOLERANCES)
    return {"precision": "float32", **report}

