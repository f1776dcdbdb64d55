"""A quantized LLaMA-family model run in float64 end to end: the PyTorch side of float64 validation.

Float32 rounding differences between two correct backends flip dynamic-FP8 grid points, and the
flips cascade (``compare.noise_floor``). In float64 the same differences are 2**29 times smaller,
so comparing the float64 model with the float64 ONNX graph (``float64_graph.to_float64``)
checks that the graph computes the model's function, operator for operator.

HF's LLaMA, Mistral and Qwen2 code computes RMSNorm and RoPE in float32 whatever the model's
dtype; inside ``float64_model`` forward hooks recompute both in float64 (the graph's formulas),
attention runs through SDPA (dtype-preserving), and ``QuantLinear`` computes in float64 with its
quantizers rounding in float32, as ONNX QuantizeLinear does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain

import torch
from torch import nn

from fp_export.hf.families import export_dims, family_of


def _rms_norm(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """weight * x / sqrt(mean(x**2) + eps) over the last dimension, in x's dtype (float64)."""
    x = args[0]
    if x.dtype != torch.float64:
        return None
    return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))


def _rotary(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple | None:
    """(cos, sin) [batch, seq, head_dim] of positions x inv_freq, in float64 for float64 x."""
    x = args[0] if args else kwargs["x"]
    position_ids = args[1] if len(args) > 1 else kwargs["position_ids"]
    if x.dtype != torch.float64:
        return None
    freqs = position_ids[..., None].double() * module.inv_freq.double()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * module.attention_scaling, emb.sin() * module.attention_scaling


@contextmanager
def float64_model(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` (a supported causal LM, possibly with ``QuantLinear`` layers) in float64; every
    tensor, hook and the attention implementation is restored on exit."""
    export_dims(model)
    family = family_of(model)
    tensors = list({id(t): t for t in chain(model.parameters(), model.buffers()) if t.is_floating_point()}.values())
    saved = [t.data for t in tensors]
    attention = model.config._attn_implementation
    handles = []
    try:
        for t in tensors:
            t.data = t.data.double()
        for m in model.modules():
            if type(m).__name__ in family.norms:
                handles.append(m.register_forward_hook(_rms_norm))
            elif type(m).__name__ in family.rotaries:
                handles.append(m.register_forward_hook(_rotary, with_kwargs=True))
        model.set_attn_implementation("sdpa")
        yield model
    finally:
        for h in handles:
            h.remove()
        for t, d in zip(tensors, saved):
            t.data = d
        model.set_attn_implementation(attention)
