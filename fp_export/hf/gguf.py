"""GGUF (llama.cpp) files -> Hugging Face safetensors model directories.

``convert_gguf(file, out)`` dequantizes every tensor through transformers' GGUF loader
(``GgufConfig(dequantize=True)``; llama.cpp's Q/K row permutation undone by transformers), and
writes ``config.json``, ``generation_config.json``, the tokenizer files (converted from the GGUF's
``tokenizer.ggml.*`` fields), ``model.safetensors`` and ``fp_export_gguf.json`` (source file name,
size, sha256, architecture, file type, dtype) into a temporary sibling of ``out``, renamed into
place when complete.

Weight dtype (``dtype="auto"``) follows the GGUF's ``general.file_type``: ALL_F32 -> float32,
MOSTLY_F16 -> float16, MOSTLY_BF16 -> bfloat16, and every block-quantized type (Q4_0, Q4_1, Q8_0,
K-quants ...) -> bfloat16, the dtype such files are made from. The dequantized block values (e.g.
Q4_1: d * q + m with fp16 d, m) are then rounded to the nearest bfloat16: relative error <= 2^-9,
far below the 4-bit grid step the values already sit on.

``resolve_model(path)`` makes ``--model FILE.gguf`` work wherever a model directory is accepted:
the conversion is cached under ``$FP_EXPORT_CACHE`` (default ``~/.cache/fp-export``) in
``gguf/<stem>-<sha256[:16]>/``, keyed by the file's content, so a changed file is converted again
and read-only locations (a file inside site-packages) work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fp_export.files import atomic_directory, sha256_file

MAGIC = b"GGUF"
SIDECAR = "fp_export_gguf.json"
# general.file_type (llama.cpp LLAMA_FTYPE_*) of unquantized files
UNQUANTIZED_FILE_TYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}
# GGUF general.architecture values transformers converts to a causal LM that fp-export quantizes
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class GGUFError(ValueError):
    """A GGUF file that cannot be converted; the message names the file and the field (a
    ValueError, as ``hf.loading.ModelError``: the CLI exits 2 with it)."""


def gguf_info(path: str | Path) -> dict:
    """Header facts of a GGUF file: {"architecture", "name", "file_type", "tensors"}.

    Raises GGUFError for a missing file, a file without the GGUF magic, an unreadable header or
    an architecture outside ``SUPPORTED_ARCHITECTURES``.
    """
    p = Path(path)
    if not p.exists():
        raise GGUFError(f"{p}: no such GGUF file")
    if not p.is_file():
        raise GGUFError(f"{p}: not a file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise GGUFError(f"{p}: not a GGUF file (first bytes {magic!r}, expected {MAGIC!r})")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(p))
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise GGUFError(f"{p}: unreadable GGUF header ({type(e).__name__}: {str(e)[:200]})") from None

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    if arch is None:
        raise GGUFError(f"{p}: GGUF field general.architecture is missing")
    name = field("general.name") or ""
    # transformers reads llama-architecture files named "mistral..." as Mistral
    effective = "mistral" if arch == "llama" and "mistral" in name.lower() else arch
    if effective not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{p}: GGUF architecture {arch!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return {"architecture": effective, "name": name, "file_type": field("general.file_type"),
            "tensors": len(reader.tensors)}


def gguf_dtype(file_type: int | None) -> torch.dtype:
    """Weight dtype implied by ``general.file_type`` (module docstring); bfloat16 for quantized types."""
    return UNQUANTIZED_FILE_TYPES.get(file_type, torch.bfloat16)


def convert_gguf(path: str | Path, out: str | Path, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Write the HF directory ``out`` for GGUF file ``path`` (atomically); returns ``out``.

    ``dtype``: "auto" (from ``general.file_type``), "bfloat16", "float16" or "float32".
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    src = Path(path)
    out = Path(out)
    info = gguf_info(src)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    torch_dtype = DTYPES[dtype] or gguf_dtype(info["file_type"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"gguf_file": src.name, "dtype": torch_dtype, "local_files_only": True}
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers < 5 always dequantizes GGUF weights
        pass
    else:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(src.parent, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, local_files_only=True)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        raise GGUFError(f"{src}: transformers cannot convert it ({type(e).__name__}: {str(e)[:300]})") from None
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise GGUFError(f"{src}: tensor {name} has {int((~torch.isfinite(t)).sum())} NaN/Inf values")
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        sidecar = {"source": src.name, "bytes": src.stat().st_size, "sha256": sha256_file(src),
                   **info, "dtype": str(torch_dtype).removeprefix("torch.")}
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("FP_EXPORT_CACHE") or Path.home() / ".cache" / "fp-export")


def resolve_model(path: str | Path) -> Path:
    """The HF directory for ``path``: a ``.gguf`` file is converted once into the content-keyed
    cache (module docstring) and that directory returned; anything else is returned unchanged."""
    p = Path(path)
    if p.suffix.lower() != ".gguf":
        return p
    gguf_info(p)
    digest = sha256_file(p)
    out = cache_root() / "gguf" / f"{p.stem}-{digest[:16]}"
    if (out / SIDECAR).is_file() and json.loads((out / SIDECAR).read_text()).get("sha256") == digest:
        return out
    return convert_gguf(p, out, overwrite=True)
