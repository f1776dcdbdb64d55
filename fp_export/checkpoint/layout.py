"""The quantized checkpoint: a directory written atomically and verified on load.

Layout (see README "Checkpoint format"): the source model's config and tokenizer files,
``model.safetensors`` (or, past ``MAX_SHARD_BYTES``, shards ``model-0000X-of-0000Y.safetensors``
named by ``model.safetensors.index.json``, as Hugging Face writes them) (non-quantized weights in their original dtype under their Hugging Face
names, plus ``<linear>.qweight`` / ``.scale`` / ``.scale_exp`` / ``.row_scale`` / ``.lorc_u`` ...
for each quantized linear) and ``fp_export.json`` (format version, recipe, per-layer specs,
calibration digest, sha256 of every file, metrics).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fp_export.files import atomic_directory, sha256_file
from fp_export.hf.families import set_module
from fp_export.quant.qlinear import LayerSpec, QuantLinear
from fp_export.quant.recipe import Recipe, recipe_from_dict

FORMAT_NAME = "fp-export"
FORMAT_VERSION = 1
MANIFEST = "fp_export.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30  # a checkpoint's tensors beyond this are written as shards
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
          "chat_template.jinja")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read; the message names the file."""


def model_digest(model_dir: Path) -> str:
    """sha256 over the sorted names and contents of a model directory's safetensors files."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def linear_tensors(qlayers: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """``<linear>.<suffix>`` tensors of quantized linears by qualified name (README table)."""
    return {f"{name}.{k}": v.contiguous().cpu() for name, m in qlayers.items() for k, v in m.tensors().items()}


def linear_specs(qlayers: dict[str, QuantLinear]) -> dict[str, dict]:
    """The manifest's ``layers`` entries of quantized linears, by qualified name."""
    return {name: asdict(m.spec()) for name, m in sorted(qlayers.items())}


def linears_from_tensors(tensors: dict[str, torch.Tensor], specs: dict[str, dict], where: Path
                         ) -> dict[str, QuantLinear]:
    """The inverse of ``linear_tensors`` + ``linear_specs``; consumed tensors are popped from
    ``tensors``. Errors name ``where`` (the file) and the layer."""
    out = {}
    for qname, spec in specs.items():
        prefix = qname + "."
        t = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        try:
            out[qname] = QuantLinear.from_tensors(LayerSpec.from_dict(spec), t)
        except (KeyError, ValueError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{where}: layer {qname}: {e}") from None
    return out


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors file written atomically (temp + rename). ``metadata`` should hold one key:
    safetensors writes several in hash order, which would break byte identity."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def shard_names(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names per shard: in sorted name order, a new shard when the next tensor would take the
    current one past ``max_bytes`` (a larger tensor gets a shard of its own). One list when the
    total fits."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_weights(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """The checkpoint's tensors into ``directory``: ``model.safetensors`` when they fit in
    ``max_shard_bytes``, else ``model-0000X-of-0000Y.safetensors`` shards and
    ``model.safetensors.index.json`` ({"metadata": {"total_size"}, "weight_map": name -> shard}).
    Returns the file names written."""
    groups = shard_names(tensors, max_shard_bytes)
    if len(groups) == 1:
        save_tensors(directory / WEIGHTS, tensors, metadata)
        return [WEIGHTS]
    weight_map, files = {}, []
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_tensors(directory / fname, {k: tensors[k] for k in names}, metadata)
        weight_map.update(dict.fromkeys(names, fname))
        files.append(fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    tmp = directory / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / INDEX)
    return files + [INDEX]


def load_weights(qdir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Every tensor of a checkpoint, single file or sharded, and the file to name in errors."""
    index = qdir / INDEX
    if not index.is_file():
        return load_file(qdir / WEIGHTS), qdir / WEIGHTS
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    tensors: dict[str, torch.Tensor] = {}
    for fname in sorted(set(weight_map.values())):
        if not (qdir / fname).is_file():
            raise CheckpointError(f"{qdir / fname}: shard named in {INDEX} is missing")
        shard = load_file(qdir / fname)
        tensors.update({k: v for k, v in shard.items() if weight_map.get(k) == fname})
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index}: tensor {missing[0]} is not in its shard {weight_map[missing[0]]}")
    return tensors, index


def checkpoint_tensors(
    model: nn.Module, qlayers: dict[str, QuantLinear], orig_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint by name: non-quantized ones cast back to ``orig_dtype``
    (tied duplicates dropped: the config re-ties them), then each quantized linear's tensors
    (an activation-only linear's ``weight`` also in ``orig_dtype``: the float32 copy was upcast
    from it, so the cast back is exact)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = (t.to(orig_dtype) if t.is_floating_point() else t).contiguous()
    lin = linear_tensors(qlayers)
    for qname, m in qlayers.items():
        if m.qweight is None:  # activation-only: the weight as loaded, in the model's dtype (lossless)
            lin[f"{qname}.weight"] = lin[f"{qname}.weight"].to(orig_dtype)
    out.update(lin)
    return out


def write_checkpoint(
    out: Path,
    source_dir: Path,
    tensors: dict[str, torch.Tensor],
    recipe: Recipe,
    qlayers: dict[str, QuantLinear],
    extra: dict,
    overwrite: bool = False,
    specs: dict[str, dict] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write the checkpoint into a temporary sibling of ``out`` and rename it into place. The
    manifest's ``layers`` come from ``qlayers``, or from ``specs`` (``linear_specs`` output) when
    given; tensors beyond ``max_shard_bytes`` are sharded (``save_weights``)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
    with atomic_directory(out) as tmp:
        for name in COPIED:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp / name)
        # one metadata key: safetensors writes several in hash order, which would break byte identity
        save_weights(tmp, tensors, {"format": f"{FORMAT_NAME}/{FORMAT_VERSION}"}, max_shard_bytes)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "recipe": recipe.model_dump(),
            "recipe_sha256": recipe.digest(),
            "layers": dict(sorted(specs.items())) if specs is not None else linear_specs(qlayers),
            **extra,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def read_manifest(qdir: Path, verify: bool = True) -> dict:
    """Parse ``fp_export.json`` and (``verify``) check every listed file's sha256."""
    qdir = Path(qdir)
    mpath = qdir / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{qdir}: not an fp-export checkpoint ({MANIFEST} missing)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath}: format {manifest.get('format')!r} v{manifest.get('format_version')} "
            f"is not {FORMAT_NAME} v{FORMAT_VERSION}"
        )
    if verify:
        for name, digest in manifest["files"].items():
            f = qdir / name
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {MANIFEST} but missing")
            if sha256_file(f) != digest:
                raise CheckpointError(f"{f}: sha256 does not match {MANIFEST} (modified or corrupt)")
    return manifest


def load_checkpoint(qdir: str | Path, verify: bool = True):
    """(model with QuantLinear layers, float32 eval mode; tokenizer; manifest) from a checkpoint.
    Its forward equals the model that was saved, bit for bit."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    qdir = Path(qdir)
    manifest = read_manifest(qdir, verify)
    recipe_from_dict(manifest["recipe"], str(qdir / MANIFEST))
    config = AutoConfig.from_pretrained(qdir, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    tensors, wfile = load_weights(qdir)
    for qname, m in linears_from_tensors(tensors, manifest["layers"], wfile).items():
        set_module(model, qname, m)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{wfile}: missing {missing[:5]} unexpected {unexpected[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(qdir, local_files_only=True)
    return model, tokenizer, manifest
