"""Token generation with a KV cache: greedy or sampled, streamed step by step.

The reference loop runs any Hugging Face causal LM (the quantized CPU model, or the GPU runtime
of ``runtime.linear`` on CUDA) with its own KV cache. Sampling: logits / temperature, then top-k,
then top-p (nucleus), then a draw from ``torch.Generator`` seeded by ``seed``; temperature 0 is
greedy (argmax, first maximum on ties).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

OnToken = Callable[[int, torch.Tensor], None]


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """int64 [batch] from the last-position logits [batch, vocab] (module docstring's rule)."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"sampling needs temperature >= 0, top_k >= 0, 0 < top_p <= 1; got "
                         f"{temperature}, {top_k}, {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = None,
             on_token: OnToken | None = None) -> torch.Tensor:
    """Generate after ``input_ids`` int64 [batch, seq] (same length per row) on the model's device.

    Returns int64 [batch, n] (CPU), n <= ``max_new_tokens``: fewer once every row has produced
    ``eos_token_id`` (rows that finished earlier repeat it). ``on_token(step, tokens [batch])``
    is called after each step, in order."""
    check_inputs(model.config, input_ids, max_new_tokens)
    device = next(model.parameters()).device
    ids, past = input_ids.to(device), None
    stream = TokenStream(ids.shape[0], seed, eos_token_id, on_token, device)
    for _ in range(max_new_tokens):
        res = model(ids, past_key_values=past, use_cache=True)
        past = res.past_key_values
        tok = stream.push(res.logits[:, -1], temperature, top_k, top_p)
        if stream.done:
            break
        ids = tok[:, None]
    return stream.tokens()


def check_inputs(config, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """Refuse what no model can generate from: a bad shape, no new tokens, a prompt plus
    ``max_new_tokens`` beyond the context, token ids outside the vocabulary."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's context of {limit} positions")
    vocab = config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}); got {int(input_ids.min())}..{int(input_ids.max())}")


class TokenStream:
    """The tokens of one generation: picks each step's tokens from logits (``next_tokens``, a CPU
    generator seeded by ``seed``), makes rows that produced ``eos_token_id`` repeat it, calls
    ``on_token(step, tokens [batch])``, and says when every row is done or the budget is spent."""

    def __init__(self, batch: int, seed: int | None, eos_token_id: int | None, on_token: OnToken | None,
                 device: torch.device | str):
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.eos, self.on_token = eos_token_id, on_token
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out: list[torch.Tensor] = []
        self.done = False

    def push(self, logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
        """The next tokens int64 [batch] from last-position logits [batch, vocab]."""
        tok = next_tokens(logits, temperature, top_k, top_p, self.generator)
        if self.eos is not None:
            tok = torch.where(self.finished, torch.full_like(tok, self.eos), tok)
            self.finished |= tok == self.eos
            self.done = bool(self.finished.all())
        self.out.append(tok)
        if self.on_token is not None:
            self.on_token(len(self.out) - 1, tok.cpu())
        return tok

    def tokens(self) -> torch.Tensor:
        """int64 [batch, steps] on the CPU."""
        return torch.stack(self.out, dim=1).cpu()
