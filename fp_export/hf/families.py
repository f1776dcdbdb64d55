"""The registry of model families: which quantize, which export, where their decoder layers and
linears are, their dimensions, and the classes of their norms and rotary embeddings.

- LLaMA-style (``model.layers``): LLaMA, Mistral, Qwen2 (q/k/v biases) quantize and export;
  their RMSNorm and RoPE modules are recomputed in float64 by float64 validation.
- OPT (``model.decoder.layers``) and GPT-2 (``transformer.h``; its ``Conv1D`` layers are
  transposed linears) quantize only.
A model of another class whose layers sit at one of these paths quantizes as that family does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fp_export.hf.loading import ModelError


class ExportError(ModelError):
    """A model the exporter cannot express; the message names the module."""


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[str, ...]  # Hugging Face model classes
    layers: str  # qualified name of the decoder layer list
    exports: bool = False
    norms: tuple[str, ...] = ()  # RMSNorm classes (float64 validation hooks)
    rotaries: tuple[str, ...] = ()  # rotary embedding classes


LLAMA = Family(
    "llama", ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"), "model.layers", exports=True,
    norms=("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"),
    rotaries=("LlamaRotaryEmbedding", "MistralRotaryEmbedding", "Qwen2RotaryEmbedding"),
)
FAMILIES = (LLAMA, Family("opt", ("OPTForCausalLM",), "model.decoder.layers"),
            Family("gpt2", ("GPT2LMHeadModel",), "transformer.h"))
EXPORTABLE = tuple(c for f in FAMILIES if f.exports for c in f.classes)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def family_of(model: nn.Module) -> Family:
    """The family of ``model``, by class, else by where its decoder layers are."""
    name = type(model).__name__
    for f in FAMILIES:
        if name in f.classes:
            return f
    for f in FAMILIES:
        try:
            if isinstance(model.get_submodule(f.layers), nn.ModuleList):
                return f
        except AttributeError:
            continue
    archs = getattr(getattr(model, "config", None), "architectures", None)
    named = f"{archs} in config.json, loaded as {name}" if archs else name
    raise ModelError(
        f"unsupported architecture {named}: no decoder layer list found (supported: "
        + ", ".join(f"{'/'.join(f.classes)} {f.layers}" for f in FAMILIES) + ")"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, in order."""
    return model.get_submodule(layer_prefix(model))


def layer_prefix(model: nn.Module) -> str:
    """Qualified name of the decoder layer list inside ``model`` (e.g. ``model.layers``)."""
    return family_of(model).layers


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] float32 (GPT-2 ``Conv1D`` stores [in, out])."""
    w = module.weight.detach().float()
    return w.T.contiguous() if type(module).__name__ == "Conv1D" else w


def linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Linear sub-modules of one block by their name inside it, in definition order."""
    return {name: m for name, m in layer.named_modules() if name and is_linear(m)}


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@dataclass(frozen=True)
class DecoderDims:
    """Sizes of a LLaMA-family decoder: hidden, heads, kv_heads, head_dim, RMSNorm eps, vocab."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    vocab: int


def export_dims(model: nn.Module) -> DecoderDims:
    """Check the model is a family the exporter reproduces exactly (LLaMA-style, SiLU MLP, no
    QK-norm, static RoPE); its sizes. Raises ``ExportError`` naming the module otherwise."""
    name = type(model).__name__
    if name not in EXPORTABLE:
        raise ExportError(f"export supports {', '.join(EXPORTABLE)}; {name} is not one of them")
    cfg = model.config
    for i, layer in enumerate(decoder_layers(model)):
        for extra in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, extra):
                raise ExportError(f"model.layers.{i}.self_attn.{extra}: QK-norm is not supported by the exporter")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ExportError(f"model.layers.*.mlp: activation {cfg.hidden_act} is not supported (silu only)")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE:
        raise ExportError(f"model.model.rotary_emb: rope type {rope_type} depends on sequence length; "
                          f"supported: {', '.join(STATIC_ROPE)}")
    heads = cfg.num_attention_heads
    return DecoderDims(
        hidden=cfg.hidden_size,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        eps=float(cfg.rms_norm_eps),
        vocab=cfg.vocab_size,
    )
