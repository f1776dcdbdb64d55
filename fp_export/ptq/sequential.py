"""Sequential, layer-by-layer post-training quantization of a causal LM (the GPTQ protocol).

Layer i is calibrated on the outputs of the already-quantized layers 0..i-1: its linears' inputs
give each a Hessian (GPTQ) and an input absolute maximum (static activation scales), then every
linear is replaced by a ``QuantLinear`` and the quantized layer's outputs become layer i+1's
inputs. After each layer its quantized tensors go to ``state_dir`` so that an interrupted run
resumes there and ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fp_export.numerics.formats import get_format
from fp_export.quant.gptq import HessianAccumulator, gptq_quantize
from fp_export.quant.lorc import lorc_factors
from fp_export.hf.loading import decoder_layers, layer_prefix, linear_weight, linears, set_module
from fp_export.quant.qlinear import LayerSpec, QuantLinear
from fp_export.ptq.recipe import Recipe
from fp_export.quant.weights import rtn_quantize

Progress = Callable[[str, int, int], None]


class _StopForward(Exception):
    pass


def capture_layer_inputs(model: nn.Module, calib: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering decoder layer 0 for each calibration row of ``calib`` [n, seqlen],
    and the keyword arguments the model passes to its layers (masks, rotary embeddings)."""
    first = decoder_layers(model)[0]
    inputs: list[torch.Tensor] = []
    kwargs: dict = {}

    def hook(_module, args, kw):
        inputs.append(args[0] if args else kw["hidden_states"])
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


def _run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        outs = [layer(x, **kwargs) for x in inputs]
    return [o[0] if isinstance(o, tuple) else o for o in outs]


def quantize_linear(
    module: nn.Module, recipe: Recipe, hessian: torch.Tensor | None, input_amax: float
) -> QuantLinear:
    """One linear by the recipe: GPTQ or RTN weights, LoRC, activation format and static scale."""
    w = linear_weight(module)
    bias = None if module.bias is None else module.bias.detach().float()
    wc, qw = recipe.weights, w
    if wc is not None:
        if wc.method == "gptq":
            qw = gptq_quantize(w, hessian, wc.format, wc.group_size, wc.scale_constraint, wc.gptq)
        else:
            qw = rtn_quantize(w, wc.format, wc.group_size, wc.scale_constraint)
    lorc = None
    if recipe.lorc is not None:
        lorc = lorc_factors(w - qw.dequantize(), recipe.lorc.rank, recipe.lorc.factor_format)
    act, input_scale = recipe.activations, None
    if act is not None and act.granularity == "tensor":
        fmax = get_format(act.format).max
        input_scale = torch.tensor(input_amax / fmax if input_amax > 0 else 1.0, dtype=torch.float32)
    return QuantLinear(qw, bias, act, input_scale, lorc)


def _save_layer(state_dir: Path, index: int, layer: nn.Module) -> None:
    tensors, specs = {}, {}
    for name, m in linears_q(layer).items():
        specs[name] = asdict(m.spec())
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in m.tensors().items()})
    path = state_dir / f"layer_{index:05d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"specs": json.dumps(specs, sort_keys=True)})
    os.replace(tmp, path)


def _load_layer(state_dir: Path, index: int, layer: nn.Module) -> None:
    from safetensors import safe_open

    path = state_dir / f"layer_{index:05d}.safetensors"
    with safe_open(path, "pt") as f:
        specs = json.loads(f.metadata()["specs"])
    tensors = load_file(path)
    for name, spec in specs.items():
        t = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        set_module(layer, name, QuantLinear.from_tensors(LayerSpec.from_dict(spec), t))


def linears_q(layer: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear)}


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calib: torch.Tensor,
    state_dir: Path | None = None,
    fingerprint: dict | None = None,
    progress: Progress | None = None,
) -> dict[str, QuantLinear]:
    """Quantize every linear of every decoder layer in place; returns them by qualified name.

    ``state_dir``: per-layer state; if it holds a run with the same ``fingerprint`` (recipe, model,
    calibration digests), the layers it finished are loaded instead of recomputed."""
    if recipe.weights is None and recipe.activations is None:
        return {}
    layers = decoder_layers(model)
    done = 0
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        progress_file = state_dir / "progress.json"
        if progress_file.exists():
            saved = json.loads(progress_file.read_text())
            if saved.get("fingerprint") == fingerprint:
                done = saved["layers_done"]
    inputs, kwargs = capture_layer_inputs(model, calib)
    for i, layer in enumerate(layers):
        if progress:
            progress("layers", i, len(layers))
        if i < done:
            _load_layer(state_dir, i, layer)
        else:
            _calibrate_and_replace(layer, recipe, inputs, kwargs)
            if state_dir is not None:
                _save_layer(state_dir, i, layer)
                tmp = state_dir / "progress.json.tmp"
                tmp.write_text(json.dumps({"fingerprint": fingerprint, "layers_done": i + 1}))
                os.replace(tmp, state_dir / "progress.json")
        inputs = _run_layer(layer, inputs, kwargs)
    if progress:
        progress("layers", len(layers), len(layers))
    prefix = layer_prefix(model)
    return {
        f"{prefix}.{i}.{name}": m for i, layer in enumerate(layers) for name, m in linears_q(layer).items()
    }


def _calibrate_and_replace(layer: nn.Module, recipe: Recipe, inputs: list, kwargs: dict) -> None:
    """Collect each linear's Hessian and input absmax over the calibration inputs, then replace it.
    Linears fed the same tensor (q/k/v, gate/up) share one Hessian and one absmax."""
    targets = linears(layer)
    need_h = recipe.weights is not None and recipe.weights.method == "gptq"
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
                accs.setdefault(name, HessianAccumulator(x.shape[-1])).add(x.detach().float())
            amax[name] = max(amax[name], float(x.detach().abs().max()))
        return hook

    handles = [layer.register_forward_pre_hook(reset)]
    handles += [m.register_forward_hook(make_hook(n)) for n, m in targets.items()]
    try:
        _run_layer(layer, inputs, kwargs)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    for name, m in targets.items():
        h = accs[owner[name]].hessian() if need_h else None
        set_module(layer, name, quantize_linear(m, recipe, h, amax[owner[name]]))
