"""Text for calibration and perplexity: the packaged King James Bible corpus, or a user's file.

The corpus (``data/kjv.txt.xz``, built by ``tools/make_corpus.py`` from Debian ``bible-kjv`` 4.38)
holds 1189 chapters. Chapters are split deterministically by index: ``i % 20 == 0`` is the test
split (perplexity), ``i % 20 == 10`` validation (model selection while training), the rest train
(tokenizer, training, calibration).
"""

from __future__ import annotations

import hashlib
import lzma
from functools import lru_cache
from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parent / "kjv.txt.xz"
CORPUS_SHA256 = "5f516b7ea6167d4bbb3c67b0a8f3dca10b2b8e1df7f8ccac05052daa610e2d67"
SPLITS = ("train", "validation", "test")


@lru_cache(maxsize=1)
def corpus_text() -> str:
    """The whole corpus as one string, verified against its recorded sha256."""
    text = lzma.decompress(CORPUS.read_bytes()).decode("utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != CORPUS_SHA256:
        raise RuntimeError(f"{CORPUS}: sha256 {digest} does not match the recorded {CORPUS_SHA256}")
    return text


def split_text(split: str) -> str:
    """One split of the corpus: its chapters joined by blank lines."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    chapters = corpus_text().rstrip("\n").split("\n\n")
    keep = {"test": lambda i: i % 20 == 0, "validation": lambda i: i % 20 == 10}.get(
        split, lambda i: i % 20 not in (0, 10)
    )
    return "\n\n".join(c for i, c in enumerate(chapters) if keep(i)) + "\n"


def load_text(source: str) -> str:
    """``source`` is a split name of the packaged corpus or a path to a UTF-8 text file."""
    if source in SPLITS:
        return split_text(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"text source {source!r} is neither a split {SPLITS} nor a file")
    return path.read_text(encoding="utf-8")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def calibration_batch(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from a 1-D id tensor, as int64 [n, seqlen].

    The paper's protocol (random 2048-token windows of the training text), seeded so the same
    seed gives the same windows.
    """
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, needs more than {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
