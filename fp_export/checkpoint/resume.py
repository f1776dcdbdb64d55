"""Resume state of an interrupted ``quantize``: a directory beside the output, ``.<out>.state/``,
holding one safetensors file per finished decoder layer (its quantized linears, serialized by
``layout.linear_tensors`` / ``layout.linear_specs`` as in the checkpoint) and ``progress.json``
(the run's fingerprint and the number of layers done). A run with another fingerprint (recipe,
model, calibration) starts over.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fp_export.checkpoint.layout import linear_specs, linear_tensors, linears_from_tensors, save_tensors
from fp_export.quant.qlinear import QuantLinear

PROGRESS = "progress.json"


def state_dir_for(out: Path) -> Path:
    """Where an interrupted ``quantize`` into ``out`` keeps its per-layer state."""
    out = Path(out)
    return out.parent / f".{out.name}.state"


class ResumeState:
    """Per-layer state in ``directory`` for the run named by ``fingerprint`` (a JSON-able dict)."""

    def __init__(self, directory: Path, fingerprint: dict, resume: bool):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)

    def layers_done(self) -> int:
        """Layers finished by an earlier run with the same fingerprint (0 if none)."""
        progress = self.dir / PROGRESS
        if not progress.is_file():
            return 0
        saved = json.loads(progress.read_text())
        return saved["layers_done"] if saved.get("fingerprint") == self.fingerprint else 0

    def _path(self, index: int) -> Path:
        return self.dir / f"layer_{index:05d}.safetensors"

    def save_layer(self, index: int, qlayers: dict[str, QuantLinear]) -> None:
        """Write layer ``index``'s quantized linears (by name inside the layer), then mark it done."""
        self.dir.mkdir(parents=True, exist_ok=True)
        save_tensors(self._path(index), linear_tensors(qlayers),
                     {"specs": json.dumps(linear_specs(qlayers), sort_keys=True)})
        tmp = self.dir / f".{PROGRESS}.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "layers_done": index + 1}))
        os.replace(tmp, self.dir / PROGRESS)

    def load_layer(self, index: int, device: str | torch.device = "cpu") -> dict[str, QuantLinear]:
        """Layer ``index``'s quantized linears (by name inside the layer), built on ``device``."""
        path = self._path(index)
        with safe_open(path, "pt") as f:
            specs = json.loads(f.metadata()["specs"])
        return linears_from_tensors(load_file(path, device=str(device)), specs, path)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
