"""Safetensors weights of a model directory, single file or sharded, read lazily.

A Hugging Face directory holds either ``model.safetensors`` or shards
``model-0000X-of-0000Y.safetensors`` named by ``model.safetensors.index.json`` (``weight_map``:
tensor name -> shard file). ``check_shards`` validates either form before anything is loaded: a
shard named in the index but missing, or a shard shorter than its own header says (truncated
copy), is a ``ModelError`` naming the file. ``LazyWeights`` then reads one tensor at a time, in
its stored dtype, straight onto the requested device (``safetensors.safe_open``), so no whole
copy of the model is ever built.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fp_export.hf.loading import ModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _header_end(path: Path) -> tuple[int, dict]:
    """(bytes the file must hold per its header, the header) of one safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"model {path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ModelError(f"model {path}: truncated safetensors file (header of {n} bytes, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"model {path}: corrupt safetensors header ({e})") from None
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0), header


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, from the index when there is one, else from the
    headers of the directory's ``*.safetensors`` files. Validates every file (missing, truncated)."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelError(f"model {index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (model_dir / name).is_file():
                n = sum(1 for v in weight_map.values() if v == name)
                raise ModelError(f"model {model_dir / name}: shard named in {INDEX} ({n} tensors) is missing")
    else:
        weight_map = {}
        files = [p.name for p in sorted(model_dir.glob("*.safetensors"))]
    out: dict[str, Path] = {}
    for name in files:
        path = model_dir / name
        need, header = _header_end(path)
        size = path.stat().st_size
        if size < need:
            raise ModelError(f"model {path}: truncated safetensors file ({size} bytes, its header needs {need})")
        for key in header:
            if key != "__metadata__" and (not weight_map or weight_map.get(key) == name):
                out[key] = path
    missing = sorted(k for k in weight_map if k not in out)
    if missing:
        raise ModelError(f"model {index}: tensor {missing[0]} mapped to {weight_map[missing[0]]}, which lacks it"
                         f" ({len(missing)} such tensors)")
    return out


class LazyWeights:
    """Tensors of a model directory by name, read on demand in their stored dtype."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.files = weight_files(self.dir)
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Tensor ``name`` in its stored dtype on ``device``."""
        path = self.files.get(name)
        if path is None:
            raise ModelError(f"model {self.dir}: no tensor {name} in its safetensors files")
        try:
            if path not in self._open:
                self._open[path] = safe_open(path, "pt", device="cpu")
            t = self._open[path].get_tensor(name)
        except SafetensorError as e:
            raise ModelError(f"model {path}: cannot read tensor {name}: {e}") from None
        return t.to(device)
