"""Loading Hugging Face causal LMs from local directories.

Only safetensors weights are read (pickle-based ``.bin``/``.pt`` files are refused), every weight
is checked finite, and the model runs in float32 on the CPU. Which families are supported, and
what to quantize in them: ``hf.families``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "kjv-llama-15m"
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
