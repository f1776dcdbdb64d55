"""The quantize job: a Hugging Face model directory and a recipe in, a checkpoint directory out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from fp_export.checkpoint.layout import (
    MAX_SHARD_BYTES, checkpoint_tensors, model_digest, read_manifest, write_checkpoint,
)
from fp_export.checkpoint.resume import ResumeState, state_dir_for
from fp_export.data.corpus import calibration_batch, load_text, text_sha256
from fp_export.evaluate.perplexity import model_seqlen, perplexity, tokenize
from fp_export.hf.loading import check_model_dir, load_model
from fp_export.hf.shards import weight_files
from fp_export.ptq.device import cpu_threads, deterministic, device_name, memory_cap, resolve_device
from fp_export.ptq.sequential import Progress, quantize_model
from fp_export.quant.gptq import release_graphs
from fp_export.quant.recipe import Recipe


def quantize_to_checkpoint(
    model_dir: Path,
    recipe: Recipe,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    eval_text: str | None = "test",
    max_eval_windows: int | None = None,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
    onload: bool | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    max_gpu_bytes: int | None = None,
) -> dict:
    """Quantize ``model_dir`` by ``recipe`` into checkpoint ``out``; returns its manifest.

    ``device``: cpu, cuda or auto. ``onload`` (default: on any device but the CPU) reads the model
    lazily and quantizes it one decoder layer at a time on the device (``ptq.onload``); without it
    the whole model is loaded in float32 on the CPU. Outputs past ``max_shard_bytes`` are sharded.
    ``max_gpu_bytes``: the job's GPU memory cap (``ptq.device.memory_cap``; default: free memory)."""
    model_dir = check_model_dir(model_dir)
    weight_files(model_dir)  # a missing or truncated shard fails here, naming it
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    dev = resolve_device(device)
    if onload is None:
        onload = dev.type != "cpu"
    if dev.type == "cuda":
        torch.zeros(1, device=dev)  # initializes CUDA and its allocator, which the reset needs
        torch.cuda.reset_peak_memory_stats(dev)
    with cpu_threads(), deterministic(dev), memory_cap(dev, max_gpu_bytes):
        try:
            if onload:
                return _quantize_onloaded(model_dir, recipe, out, dev, resume, overwrite, eval_text,
                                          max_eval_windows, progress, max_shard_bytes, max_gpu_bytes)
            return _quantize_whole(model_dir, recipe, out, resume, overwrite, eval_text, max_eval_windows, progress,
                                   max_shard_bytes)
        finally:
            release_graphs()


def _quantize_whole(model_dir: Path, recipe: Recipe, out: Path, resume: bool, overwrite: bool,
                    eval_text: str | None, max_eval_windows: int | None, progress: Progress | None,
                    max_shard_bytes: int) -> dict:
    """The whole model in float32 on the CPU (the reference path)."""
    torch.manual_seed(0)
    model, tok, orig_dtype = load_model(model_dir)
    calib, calibration = _calibration(tok, recipe, model_seqlen(model, recipe.calibration.seqlen))
    fingerprint = {"recipe": recipe.digest(), "model": model_digest(model_dir), "calibration": calibration,
                   "device": "cpu"}
    state = ResumeState(state_dir_for(out), fingerprint, resume)
    qlayers = quantize_model(model, recipe, calib, state, progress)
    metrics: dict = {}
    if eval_text is not None:
        ids = tokenize(tok, load_text(eval_text))
        metrics = {"eval_text": eval_text, **perplexity(
            model, ids, model_seqlen(model), max_eval_windows,
            (lambda i, n: progress("eval", i, n)) if progress else None,
        )}
    tensors = checkpoint_tensors(model, qlayers, orig_dtype)
    extra = {
        "base_model": {"name": model_dir.name, "sha256": fingerprint["model"], "dtype": str(orig_dtype)},
        "calibration": calibration,
        "metrics": metrics,
    }
    write_checkpoint(out, model_dir, tensors, recipe, qlayers, extra, overwrite=overwrite,
                     max_shard_bytes=max_shard_bytes)
    state.clear()
    return read_manifest(out)


def _calibration(tok, recipe: Recipe, seqlen: int) -> tuple[torch.Tensor, dict]:
    cal = recipe.calibration
    text = load_text(cal.source)
    calib = calibration_batch(tokenize(tok, text), cal.nsamples, seqlen, cal.seed)
    return calib, {
        "source": cal.source if cal.source in ("train", "validation", "test") else Path(cal.source).name,
        "text_sha256": text_sha256(text),
        "tokens_sha256": _tensor_digest(calib),
        "nsamples": cal.nsamples,
        "seqlen": seqlen,
        "seed": cal.seed,
    }


def _quantize_onloaded(model_dir: Path, recipe: Recipe, out: Path, dev: torch.device, resume: bool,
                       overwrite: bool, eval_text: str | None, max_eval_windows: int | None,
                       progress: Progress | None, max_shard_bytes: int, max_gpu_bytes: int | None) -> dict:
    """Sequential onloading on ``dev`` (``ptq.onload``); the same checkpoint format."""
    from transformers import AutoTokenizer

    from fp_export.ptq.onload import quantize_onloaded, skeleton

    torch.manual_seed(0)
    m = skeleton(model_dir, dev)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    seqlen = model_seqlen(m.model, recipe.calibration.seqlen)
    calib, calibration = _calibration(tok, recipe, seqlen)
    fingerprint = {"recipe": recipe.digest(), "model": model_digest(model_dir), "calibration": calibration,
                   "device": dev.type}
    state = ResumeState(state_dir_for(out), fingerprint, resume)
    eval_ids = None if eval_text is None else tokenize(tok, load_text(eval_text))
    tensors, specs, metrics = quantize_onloaded(m, recipe, calib, state, progress, eval_ids,
                                                model_seqlen(m.model), max_eval_windows, max_gpu_bytes)
    if metrics:
        metrics = {"eval_text": eval_text, **metrics}
    extra = {
        "base_model": {"name": model_dir.name, "sha256": fingerprint["model"], "dtype": str(m.orig_dtype)},
        "calibration": calibration,
        "metrics": metrics,
    }
    if dev.type != "cpu":
        extra["device"] = {"type": dev.type, "name": device_name(dev)}
    write_checkpoint(out, model_dir, tensors, recipe, {}, extra, overwrite=overwrite, specs=specs,
                     max_shard_bytes=max_shard_bytes)
    state.clear()
    return read_manifest(out)


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
