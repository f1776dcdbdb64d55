"""Perplexity by the GPTQ / ZeroQuant-FP protocol: the held-out text tokenized as one stream,
cut into non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window dropped),
each window scored independently; perplexity = exp(total next-token NLL / predicted tokens)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The text as one int64 id stream [n] (no special tokens added)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Summed next-token NLL of one window (float64 sum)."""
    return float(F.cross_entropy(logits[0, :-1].double(), window[1:], reduction="sum"))


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """{"perplexity", "tokens", "seqlen", "windows"} of ``model`` on id stream ``ids``."""
    windows = eval_windows(ids, seqlen, max_windows)
    total = 0.0
    for i, w in enumerate(windows):
        total += window_nll(model(w[None], use_cache=False).logits, w)
        if progress:
            progress(i + 1, len(windows))
    predicted = windows.shape[0] * (seqlen - 1)
    return {
        "perplexity": math.exp(total / predicted),
        "tokens": int(windows.numel()),
        "seqlen": seqlen,
        "windows": int(windows.shape[0]),
    }


def model_seqlen(model: nn.Module, requested: int | None = None, cap: int = 2048) -> int:
    """The evaluation / calibration length: ``requested`` or the paper's 2048, capped at the
    model's ``max_position_embeddings`` (``n_positions`` for GPT-2)."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or cap
    return min(requested or cap, limit)
