"""Sequential, layer-by-layer post-training quantization of a causal LM (the GPTQ protocol).

Layer i is calibrated on the outputs of the already-quantized layers 0..i-1: its linears' inputs
give each a Hessian (GPTQ) and an input absolute maximum (static activation scales), then every
linear is replaced by a ``QuantLinear`` and the quantized layer's outputs become layer i+1's
inputs. After each layer its quantized tensors go to the resume state so that an interrupted run
resumes there and ends bit-identical to an uninterrupted one (``checkpoint.resume``).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn

from fp_export.checkpoint.resume import ResumeState
from fp_export.hf.families import decoder_layers, layer_prefix, linear_weight, linears, set_module
from fp_export.numerics.formats import get_format
from fp_export.numerics.scales import absmax_scale
from fp_export.quant.activations import ActivationQuantizer
from fp_export.quant.gptq import HessianAccumulator, gptq
from fp_export.quant.lorc import lorc_factors
from fp_export.quant.qlinear import QuantLinear
from fp_export.quant.quantizer import WeightQuantizer
from fp_export.quant.recipe import Recipe, WeightConfig
from fp_export.quant.weights import QuantizedWeight

Progress = Callable[[str, int, int], None]
log = logging.getLogger("fp_export")


class _StopForward(Exception):
    pass


class Store:
    """Where a layer's calibration hidden states wait between layers: ``put`` stores one [1, seq,
    hidden] tensor, ``get`` returns it on the compute device. This one keeps them where they are."""

    def put(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def get(self, x: torch.Tensor) -> torch.Tensor:
        return x


def capture_layer_inputs(model: nn.Module, calib: torch.Tensor, store: Store = Store()
                         ) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering decoder layer 0 for each calibration row of ``calib`` [n, seqlen]
    (each passed through ``store.put``), and the keyword arguments the model passes to its layers
    (masks, rotary embeddings)."""
    first = decoder_layers(model)[0]
    inputs: list[torch.Tensor] = []
    kwargs: dict = {}

    def hook(_module, args, kw):
        inputs.append(store.put(args[0] if args else kw["hidden_states"]))
        kwargs.clear()
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for row in calib:
                try:
                    model(row[None], use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return inputs, kwargs


def _run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, store: Store = Store()
               ) -> list[torch.Tensor]:
    with torch.no_grad():
        return [store.put(_hidden(layer(store.get(x), **kwargs))) for x in inputs]


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _needs_hessian(recipe: Recipe) -> bool:
    w = recipe.weights
    return w is not None and (w.method == "gptq" or bool(w.alternatives))


def output_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """Layer output error of weight ``q`` for ``w`` [out, in]: tr(E H E^T) with E = w - q (the
    calibration inputs' mean squared output error, up to a constant), ||E||^2 without a Hessian."""
    e = (w - q).double()
    return float((e * e).sum() if hessian is None else ((e @ hessian.to(e)) * e).sum())


def quantize_weight(w: torch.Tensor, wc: WeightConfig, hessian: torch.Tensor | None, name: str) -> QuantizedWeight:
    """GPTQ or RTN on the recipe's grid, or (``alternatives``, MoFQ) on the grid of least output error."""
    best, best_err = None, float("inf")
    for fmt in [wc.format, *wc.alternatives]:
        quantizer = WeightQuantizer(fmt, wc.group_size, wc.scale_constraint if fmt == "fp4_e2m1" else "none")
        if wc.method == "gptq":
            qw = gptq(w, hessian, quantizer, wc.gptq.damp, wc.gptq.block_size, wc.gptq.act_order, name)
        else:
            qw = quantizer.rtn(w)
        if not wc.alternatives:
            return qw
        err = output_error(w, qw.dequantize(), hessian)
        if err < best_err:
            best, best_err = qw, err
    return best


def quantize_linear(
    module: nn.Module, recipe: Recipe, hessian: torch.Tensor | None, input_amax: float, name: str = ""
) -> QuantLinear | nn.Module:
    """One linear by the recipe as it applies to ``name`` (``Recipe.for_layer``): GPTQ or RTN
    weights, LoRC, activation format and static scale; the module itself when nothing applies."""
    recipe = recipe.for_layer(name)
    if recipe.weights is None and recipe.activations is None:
        return module
    w = linear_weight(module)
    bias = None if module.bias is None else module.bias.detach().float()
    qw = w if recipe.weights is None else quantize_weight(w, recipe.weights, hessian, name)
    lorc = None
    if recipe.lorc is not None:
        lorc = lorc_factors(w - qw.dequantize(), recipe.lorc.rank, recipe.lorc.factor_format)
    ac, act, input_scale = recipe.activations, None, None
    if ac is not None:
        act = ActivationQuantizer(ac.format, ac.granularity)
        if ac.granularity == "tensor":
            input_scale = absmax_scale(torch.tensor(input_amax, dtype=torch.float32, device=w.device),
                                       get_format(ac.format).max)
    return QuantLinear(qw, bias, act, input_scale, lorc)


def linears_q(layer: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear)}


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calib: torch.Tensor,
    state: ResumeState | None = None,
    progress: Progress | None = None,
) -> dict[str, QuantLinear]:
    """Quantize every linear of every decoder layer in place; returns them by qualified name.

    ``state``: per-layer resume state; the layers an earlier run with the same fingerprint
    finished are loaded from it instead of recomputed, and each new layer is saved to it."""
    if recipe.weights is None and recipe.activations is None and not recipe.overrides:
        return {}
    layers = decoder_layers(model)
    prefix = layer_prefix(model)
    done = state.layers_done() if state is not None else 0
    inputs, kwargs = capture_layer_inputs(model, calib)
    for i, layer in enumerate(layers):
        if progress:
            progress("layers", i, len(layers))
        t0 = time.perf_counter()
        if i < done:
            for name, m in state.load_layer(i).items():
                set_module(layer, name, m)
        else:
            _calibrate_and_replace(layer, recipe, inputs, kwargs, f"{prefix}.{i}")
            if state is not None:
                state.save_layer(i, linears_q(layer))
        inputs = _run_layer(layer, inputs, kwargs)
        log_layer(f"{prefix}.{i}", i, len(layers), time.perf_counter() - t0, i < done)
    if progress:
        progress("layers", len(layers), len(layers))
    return {
        f"{prefix}.{i}.{name}": m for i, layer in enumerate(layers) for name, m in linears_q(layer).items()
    }


def log_layer(where: str, i: int, n: int, seconds: float, resumed: bool, device: torch.device | None = None
              ) -> None:
    """One INFO line per decoder layer on the ``fp_export`` logger (the CLI shows them when stderr is
    not a terminal): its time, and on a GPU the peak memory so far."""
    peak = ""
    if device is not None and device.type == "cuda":
        peak = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    log.info("layer %d/%d %s %s in %.2f s%s", i + 1, n, where,
             "loaded from resume state" if resumed else "quantized", seconds, peak)


def _calibrate_and_replace(layer: nn.Module, recipe: Recipe, inputs: list, kwargs: dict, where: str,
                           store: Store = Store()) -> None:
    """Collect each linear's Hessian and input absmax over the calibration inputs, then replace it.
    Linears fed the same tensor (q/k/v, gate/up) share one Hessian and one absmax."""
    targets = linears(layer)
    need_h = any(_needs_hessian(recipe.for_layer(f"{where}.{n}")) for n in targets)
    accs: dict[str, HessianAccumulator] = {}
    owner: dict[str, str] = {}
    amax = dict.fromkeys(targets, 0.0)
    seen: dict[int, tuple[str, torch.Tensor]] = {}

    def reset(_m, _args):
        seen.clear()

    def make_hook(name):
        def hook(_m, args, _out):
            x = args[0]
            first = seen.setdefault(id(x), (name, x))[0]
            owner.setdefault(name, first)
            if first != name:
                return
            if need_h:
                accs.setdefault(name, HessianAccumulator(x.shape[-1], x.device)).add(x.detach().float())
            amax[name] = max(amax[name], float(x.detach().abs().max()))
        return hook

    handles = [layer.register_forward_pre_hook(reset)]
    handles += [m.register_forward_hook(make_hook(n)) for n, m in targets.items()]
    try:
        with torch.no_grad():
            for x in inputs:
                layer(store.get(x), **kwargs)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    for name, m in targets.items():
        h = accs[owner[name]].hessian() if need_h else None
        set_module(layer, name, quantize_linear(m, recipe, h, amax[owner[name]], f"{where}.{name}"))
