"""Loading Hugging Face causal LMs from local directories, and finding what to quantize in them.

Only safetensors weights are read (pickle-based ``.bin``/``.pt`` files are refused), every weight
is checked finite, and the model runs in float32 on the CPU. Supported families: LLaMA-style
(``model.layers``: LLaMA, Mistral, Qwen2, ...), OPT (``model.decoder.layers``) and GPT-2
(``transformer.h``, whose ``Conv1D`` layers are handled as transposed linears).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "kjv-llama-15m"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class ModelError(ValueError):
    """A model directory that cannot be used; the message names the file or module."""


def check_model_dir(path: str | Path) -> Path:
    """Validate a local HF model directory: config.json plus safetensors weights, no pickle.
    A ``.gguf`` file is converted (cached, ``fp_export.hf.gguf.resolve_model``) and its directory
    returned."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        from fp_export.hf.gguf import resolve_model

        p = resolve_model(p)
    if not p.exists():
        hint = " (Hugging Face Hub ids cannot be fetched offline: pass a local model directory)" \
            if "/" in str(path) and not str(path).startswith((".", "/")) else ""
        raise ModelError(f"model {path}: no such directory{hint}")
    if not p.is_dir():
        raise ModelError(f"model {p}: not a directory")
    if not (p / "config.json").is_file():
        raise ModelError(f"model {p}: config.json is missing")
    try:
        json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"model {p / 'config.json'}: not valid JSON ({e})") from None
    weights = sorted(p.glob("*.safetensors"))
    pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if not weights:
        if pickles:
            raise ModelError(
                f"model {p}: only pickle weights ({', '.join(pickles)}); fp-export loads safetensors "
                "only (convert with `save_pretrained(..., safe_serialization=True)`)"
            )
        raise ModelError(f"model {p}: no *.safetensors weights")
    return p


def load_model(path: str | Path = DEFAULT_MODEL):
    """(model in float32 eval mode, tokenizer, original weight dtype) from a local directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = check_model_dir(path)
    config = AutoConfig.from_pretrained(p, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in archs):
        raise ModelError(
            f"model {p / 'config.json'}: architectures {archs} (model_type {config.model_type!r}) is not a "
            f"causal LM; fp-export quantizes causal LMs (architectures ending in {' or '.join(CAUSAL_LM_SUFFIXES)})"
        )
    orig_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(orig_dtype, str):
        orig_dtype = getattr(torch, orig_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=torch.float32, use_safetensors=True, local_files_only=True
        )
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"model {p}: cannot load weights: {e}") from None
    model.eval()
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ModelError(f"model {p}: weight {name} has {bad} NaN/Inf values")
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return model, tokenizer, orig_dtype


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, in order."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    archs = getattr(getattr(model, "config", None), "architectures", None)
    named = f"{archs} in config.json, loaded as {type(model).__name__}" if archs else type(model).__name__
    raise ModelError(
        f"unsupported architecture {named}: no decoder layer list found "
        "(supported: LLaMA/Mistral/Qwen2 model.layers, OPT model.decoder.layers, GPT-2 transformer.h)"
    )


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


def layer_prefix(model: nn.Module) -> str:
    """Qualified name of the decoder layer list inside ``model`` (e.g. ``model.layers``)."""
    layers = decoder_layers(model)
    for name, m in model.named_modules():
        if m is layers:
            return name
    raise ModelError("decoder layers not found among named modules")
