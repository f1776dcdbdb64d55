"""Shared fixtures: small, fast quantizations of the embedded default model."""

from __future__ import annotations

from pathlib import Path

import pytest

import fp_export as fx

from fp_export.hf.loading import DEFAULT_MODEL
from fp_export.ptq.job import quantize_to_checkpoint
from fp_export.quant.recipe import load_recipe

FAST_CAL = {"nsamples": 4, "seqlen": 128}


def export_checkpoint(qdir: Path, out: Path, reference: bool = False) -> Path:
    """Export a checkpoint directory to ``out`` through the public API."""
    return fx.export_onnx(fx.load(qdir), out, reference=reference)


def killed_after_layers(done: int):
    """A quantize progress callback that interrupts the job (KeyboardInterrupt, as Ctrl-C) when
    ``done`` decoder layers are finished and saved to the resume state."""
    def progress(kind: str, i: int, n: int) -> None:
        if kind == "layers" and i == done:
            raise KeyboardInterrupt
    return progress


def fast_recipe(name: str):
    r = load_recipe(name)
    return r.model_copy(update={"calibration": r.calibration.model_copy(update=FAST_CAL)})


@pytest.fixture(scope="session")
def quantized(tmp_path_factory):
    """``quantized(name)`` -> checkpoint dir of the default model under recipe ``name`` (cached)."""
    root = tmp_path_factory.mktemp("ckpts")
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            quantize_to_checkpoint(DEFAULT_MODEL, fast_recipe(name), root / name, eval_text=None)
            cache[name] = root / name
        return cache[name]

    return make
