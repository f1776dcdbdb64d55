"""Sequential onloading: quantize a model one decoder layer at a time on a device, never holding
the whole model.

The model is a Hugging Face skeleton built on the meta device (``accelerate.init_empty_weights``;
non-persistent buffers such as RoPE frequencies stay real). Its weights are read lazily from the
directory's safetensors files, single or sharded (``hf.shards.LazyWeights``), in their stored dtype
and cast to float32 on the device, one module at a time:

1. the modules outside the decoder layers (embeddings, final norm, ``lm_head``, rotary) go to the
   device for the whole job (float32);
2. the calibration rows run up to decoder layer 0; their hidden states [1, seq, hidden] float32
   stay on the device when they fit (``plan_store``), else wait in pinned CPU memory;
3. layer i is materialized on the device in float32, calibrated and quantized exactly as
   ``ptq.sequential`` does it (the same functions), its quantized tensors moved to the CPU and
   written to the resume state, its outputs computed as layer i+1's inputs, and it is released;
4. with evaluation, the perplexity windows follow the same path through the quantized layers,
   then the final norm and ``lm_head`` (the last layer replayed inside the skeleton's forward).

On the CPU every step is the same float32 arithmetic, row for row, as the whole-model path
(``ptq.sequential.quantize_model`` on ``hf.loading.load_model``), so both give the same bytes
(``tests/test_onload.py``). Peak device memory is about one float32 layer (plus its quantized
copy and the float64 Hessians) plus the calibration hidden states, twice (inputs and outputs).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fp_export.checkpoint.layout import linear_specs, linear_tensors, linears_from_tensors
from fp_export.checkpoint.resume import ResumeState
from fp_export.evaluate.perplexity import eval_windows, window_nll
from fp_export.hf.families import decoder_layers, layer_prefix, set_module
from fp_export.hf.loading import ModelError
from fp_export.hf.shards import LazyWeights
from fp_export.ptq.device import DeviceError, memory_budget
from fp_export.ptq.sequential import Progress, Store, _calibrate_and_replace, _run_layer, \
    capture_layer_inputs, linears_q, log_layer
from fp_export.quant.recipe import Recipe

log = logging.getLogger("fp_export")


class DeviceStore(Store):
    """Hidden states kept on the compute device."""


class PinnedStore(Store):
    """Hidden states spilled to pinned CPU memory, copied to ``device`` for each use."""

    def __init__(self, device: torch.device):
        self.device = device

    def put(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        out.copy_(x)
        return out

    def get(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)


@dataclass
class Onloaded:
    """A skeleton model with its weight source: ``model`` (meta parameters until materialized),
    ``weights``, the compute ``device``, and the checkpoint dtype ``orig_dtype``."""

    model: nn.Module
    weights: LazyWeights
    device: torch.device
    orig_dtype: torch.dtype
    keys: list[str]  # state_dict names of the checkpoint, tied duplicates dropped (whole-model order)


def skeleton(model_dir: Path, device: torch.device) -> Onloaded:
    """The model of ``model_dir`` on the meta device, its non-layer modules materialized on ``device``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    orig = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    orig = getattr(torch, orig) if isinstance(orig, str) else orig
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and out_emb is not None and in_emb is not None:
        out_emb.weight = in_emb.weight
    seen: set[int] = set()
    keys = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            keys.append(name)
    m = Onloaded(model, LazyWeights(model_dir), device, orig, keys)
    prefix = layer_prefix(model) + "."
    _materialize(m, model, "", skip=prefix)
    return m


def _materialize(m: Onloaded, module: nn.Module, prefix: str, skip: str | None = None) -> None:
    """Load every parameter and buffer of ``module`` (qualified names under ``prefix``, those under
    ``skip`` left alone) from the weights onto the device as float32; tied parameters stay tied."""
    done: dict[int, nn.Parameter] = {}
    for sub_name, sub in module.named_modules():
        full = f"{prefix}{sub_name}." if sub_name else prefix
        if skip is not None and full.startswith(skip):
            continue
        for pname, p in list(sub._parameters.items()):
            if p is None:
                continue
            if id(p) in done:
                sub._parameters[pname] = done[id(p)]
                continue
            key = full + pname
            if key in m.weights:
                t = _finite(m, key, m.weights.get(key, m.device))
                new = nn.Parameter(t.float() if t.is_floating_point() else t, requires_grad=False)
            elif not p.is_meta:
                new = nn.Parameter(p.detach().to(m.device), requires_grad=False)
            else:
                raise ModelError(f"model {m.weights.dir}: weight {key} is in no safetensors file")
            done[id(p)] = new
            sub._parameters[pname] = new
        for bname, b in list(sub._buffers.items()):
            if b is None:
                continue
            key = full + bname
            if key in m.weights:
                t = m.weights.get(key, m.device)
                sub._buffers[bname] = t.float() if t.is_floating_point() else t
            elif not b.is_meta:
                sub._buffers[bname] = b.to(m.device)


def _finite(m: Onloaded, name: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ModelError(f"model {m.weights.dir}: weight {name} has {bad} NaN/Inf values")
    return t


def _release(layer: nn.Module) -> None:
    """Drop a layer's device tensors (its quantized linears included)."""
    for name, _ in list(linears_q(layer).items()):
        set_module(layer, name, nn.Module())
    layer.to("meta")


def _workspace_bytes(m: Onloaded, prefix: str) -> int:
    """Device bytes one decoder layer (parameters under ``prefix``) needs besides the hidden states:
    4 float32 copies of its parameters (the layer, its quantized copy, LoRC and GPTQ working
    copies) and 4 float64 Hessians of its widest linear input (its accumulator, GPTQ's copy and
    ``quant.gptq.inverse_cholesky``'s inverse, and one for the linear algebra's own workspace)."""
    params = [p for n, p in m.model.named_parameters() if n.startswith(prefix)]
    widest = max((p.shape[1] for p in params if p.dim() == 2), default=0)
    return 4 * 4 * sum(math.prod(p.shape) for p in params) + 4 * 8 * widest**2


def plan_store(m: Onloaded, rows: int, seqlen: int, workspace: int, max_bytes: int | None = None) -> Store:
    """Keep hidden states (``rows`` x [1, seqlen, hidden] float32, inputs and outputs) on the device
    when they and a layer's ``workspace`` fit in 90% of its budget (free memory, at most
    ``max_bytes``); else spill them to pinned CPU memory, which costs a host-device copy of each
    state per layer pass. Always the device store on the CPU."""
    if m.device.type != "cuda":
        return DeviceStore()
    states = _states_bytes(m, rows, seqlen)
    budget = memory_budget(m.device, max_bytes)
    if states + workspace < 0.9 * budget:
        return DeviceStore()
    log.info("calibration hidden states (%.2f GiB) spill to pinned CPU memory (layer workspace %.2f GiB, budget"
             " %.2f GiB on %s)", states / 2**30, workspace / 2**30, budget / 2**30, m.device)
    return PinnedStore(m.device)


def _states_bytes(m: Onloaded, rows: int, seqlen: int) -> int:
    return 2 * rows * seqlen * m.model.config.hidden_size * 4


def quantize_onloaded(
    m: Onloaded,
    recipe: Recipe,
    calib: torch.Tensor,
    state: ResumeState,
    progress: Progress | None = None,
    eval_ids: torch.Tensor | None = None,
    eval_seqlen: int | None = None,
    max_eval_windows: int | None = None,
    max_bytes: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict]:
    """Quantize layer by layer; returns (checkpoint tensors on the CPU in the whole-model path's
    order and dtypes, the manifest's per-linear specs, perplexity metrics or {}). ``max_bytes``:
    the job's GPU memory budget (``ptq.device.memory_cap`` enforces it; here it decides where the
    hidden states wait)."""
    model = m.model
    prefix = layer_prefix(model)
    layers = decoder_layers(model)
    n = len(layers)
    quantizing = recipe.weights is not None or recipe.activations is not None
    done = state.layers_done() if quantizing else 0
    workspace = _workspace_bytes(m, f"{prefix}.0.")
    store = plan_store(m, calib.shape[0], calib.shape[1], workspace, max_bytes)
    qtensors: dict[str, torch.Tensor] = {}
    specs: dict[str, dict] = {}
    if quantizing:
        try:
            inputs, kwargs = capture_layer_inputs(model, calib.to(m.device), store)
        except torch.cuda.OutOfMemoryError:
            raise _oom(m, "embeddings (calibration hidden states)", workspace, calib.shape, store) from None
        for i in range(n):
            if progress:
                progress("layers", i, n)
            where = f"{prefix}.{i}"
            t0 = time.perf_counter()
            layer = layers[i]
            try:
                _materialize(m, layer, where + ".")
                if i < done:
                    for name, ql in state.load_layer(i, m.device).items():
                        set_module(layer, name, ql)
                else:
                    _calibrate_and_replace(layer, recipe, inputs, kwargs, where, store)
                    state.save_layer(i, linears_q(layer))
                qlin = linears_q(layer)
                qtensors.update(linear_tensors({f"{where}.{k}": v for k, v in qlin.items()}))
                specs.update(linear_specs({f"{where}.{k}": v for k, v in qlin.items()}))
                inputs = _run_layer(layer, inputs, kwargs, store)
                _release(layer)
            except torch.cuda.OutOfMemoryError:
                _release(layer)
                raise _oom(m, where, workspace, calib.shape, store) from None
            log_layer(where, i, n, time.perf_counter() - t0, i < done, m.device)
        if progress:
            progress("layers", n, n)
        del inputs
    metrics = {}
    if eval_ids is not None:
        metrics = _evaluate(m, specs, qtensors, eval_ids, eval_seqlen, max_eval_windows, progress, max_bytes)
    return _checkpoint_tensors(m, specs, qtensors), specs, metrics


def _oom(m: Onloaded, where: str, workspace: int, shape: torch.Size, store: Store) -> DeviceError:
    rows, seqlen = shape
    states = _states_bytes(m, rows if isinstance(store, DeviceStore) else 1, seqlen)
    need = states + workspace
    free = ""
    if m.device.type == "cuda":
        f, total = torch.cuda.mem_get_info(m.device)
        free = f"; {f / 2**30:.2f} of {total / 2**30:.2f} GiB free"
    return DeviceError(
        f"{where}: out of GPU memory on {m.device}: needs about {need / 2**30:.2f} GiB ({need} bytes: the layer's"
        f" workspace {workspace / 2**30:.2f} GiB + hidden states {states / 2**30:.2f} GiB for {rows} x {seqlen}"
        f" calibration tokens{free}); use fewer calibration samples (--nsamples) or a shorter --seqlen"
    )


def _quantized_layer(m: Onloaded, where: str, specs: dict, qtensors: dict) -> dict[str, nn.Module]:
    """The quantized linears of layer ``where`` on the device, from their CPU tensors."""
    mine = {k: v for k, v in specs.items() if k.startswith(where + ".")}
    t = {k: v.to(m.device) for k, v in qtensors.items() if k.startswith(where + ".")}
    return {k[len(where) + 1:]: v for k, v in linears_from_tensors(t, mine, Path(where)).items()}


class _Replay(nn.Module):
    """Stands in for a decoder layer inside the skeleton's forward: passes the hidden state through,
    or returns ``value`` (the real last layer's output), as a tuple when the family's layers do."""

    def __init__(self, value: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.value, self.as_tuple = value, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.value is None else self.value
        return (out,) if self.as_tuple else out


@torch.no_grad()
def _evaluate(m: Onloaded, specs: dict, qtensors: dict, ids: torch.Tensor, seqlen: int,
              max_windows: int | None, progress: Progress | None, max_bytes: int | None = None) -> dict:
    """Perplexity (``evaluate.perplexity`` protocol) with each window run through the layers one at
    a time, then the skeleton's own forward for the final norm and ``lm_head``."""
    model = m.model
    prefix = layer_prefix(model)
    layers = decoder_layers(model)
    windows = eval_windows(ids, seqlen, max_windows)
    store = plan_store(m, windows.shape[0], seqlen, _workspace_bytes(m, f"{prefix}.0."), max_bytes)
    states, kwargs = capture_layer_inputs(model, windows.to(m.device), store)
    as_tuple = False
    for i, layer in enumerate(list(layers)):
        where = f"{prefix}.{i}"
        _materialize(m, layer, where + ".")
        for name, ql in _quantized_layer(m, where, specs, qtensors).items():
            set_module(layer, name, ql)
        with torch.no_grad():
            as_tuple = isinstance(layer(store.get(states[0]), **kwargs), tuple)
        states = _run_layer(layer, states, kwargs, store)
        _release(layer)
    total = 0.0
    for j, w in enumerate(windows):
        for i in range(len(layers)):
            layers[i] = _Replay(store.get(states[j]) if i == len(layers) - 1 else None, as_tuple)
        total += window_nll(model(w[None].to(m.device), use_cache=False).logits.cpu(), w)
        if progress:
            progress("eval", j + 1, len(windows))
    predicted = windows.shape[0] * (seqlen - 1)
    return {"perplexity": math.exp(total / predicted), "tokens": int(windows.numel()), "seqlen": seqlen,
            "windows": int(windows.shape[0])}


def _checkpoint_tensors(m: Onloaded, specs: dict, qtensors: dict) -> dict[str, torch.Tensor]:
    """What ``checkpoint.layout.checkpoint_tensors`` returns for the whole-model path: the
    non-quantized tensors in state_dict order, cast through float32 to the original dtype, then
    the quantized linears' tensors."""
    out: dict[str, torch.Tensor] = {}
    quantized = tuple(f"{k}." for k in specs)
    for name in m.keys:
        if name.startswith(quantized):
            continue
        t = m.weights.get(name, "cpu") if name in m.weights else _skeleton_value(m, name)
        out[name] = (t.float().to(m.orig_dtype) if t.is_floating_point() else t).contiguous()
    out.update(qtensors)
    return out


def _skeleton_value(m: Onloaded, name: str) -> torch.Tensor:
    t = m.model.get_parameter(name) if name in dict(m.model.named_parameters()) else m.model.get_buffer(name)
    if t.is_meta:
        raise ModelError(f"model {m.weights.dir}: weight {name} is in no safetensors file")
    return t.detach().cpu()


__all__ = ["Onloaded", "skeleton", "quantize_onloaded", "plan_store", "DeviceStore", "PinnedStore"]
