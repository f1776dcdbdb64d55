"""The quantize job: a Hugging Face model directory and a recipe in, a checkpoint directory out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from fp_export.checkpoint.layout import checkpoint_tensors, model_digest, read_manifest, write_checkpoint
from fp_export.checkpoint.resume import ResumeState, state_dir_for
from fp_export.data.corpus import calibration_batch, load_text, text_sha256
from fp_export.evaluate.perplexity import model_seqlen, perplexity, tokenize
from fp_export.hf.loading import check_model_dir, load_model
from fp_export.ptq.sequential import Progress, quantize_model
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
) -> dict:
    """Quantize ``model_dir`` by ``recipe`` into checkpoint ``out``; returns its manifest."""
    model_dir = check_model_dir(model_dir)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    torch.manual_seed(0)
    model, tok, orig_dtype = load_model(model_dir)
    cal = recipe.calibration
    seqlen = model_seqlen(model, cal.seqlen)
    text = load_text(cal.source)
    calib = calibration_batch(tokenize(tok, text), cal.nsamples, seqlen, cal.seed)
    calibration = {
        "source": cal.source if cal.source in ("train", "validation", "test") else Path(cal.source).name,
        "text_sha256": text_sha256(text),
        "tokens_sha256": _tensor_digest(calib),
        "nsamples": cal.nsamples,
        "seqlen": seqlen,
        "seed": cal.seed,
    }
    fingerprint = {"recipe": recipe.digest(), "model": model_digest(model_dir), "calibration": calibration}
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
    write_checkpoint(out, model_dir, tensors, recipe, qlayers, extra, overwrite=overwrite)
    state.clear()
    return read_manifest(out)


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
