"""Train the embedded default model: a small LLaMA-architecture causal LM on the KJV corpus.

Reproducible: seeded tokenizer and model training on the packaged corpus (``fp_export/data``).
Trained once on an H100 (about a minute) and committed under ``fp_export/models/kjv-llama-15m``;
rerun with ``python tools/train_reference_lm.py --out DIR`` (CUDA if present, else CPU, slowly).

Hyperparameters (defaults below): byte-level BPE vocabulary 4096; hidden 512, 4 layers, 8 heads,
4 key-value heads, MLP 1536 (SwiGLU), RoPE, tied embeddings, context 512; AdamW lr 1e-3, betas
(0.9, 0.95), weight decay 0.1, 100 warm-up steps then cosine to 10%, batch 32 x 512 tokens of
random windows of the train split, bf16 autocast; the checkpoint with the lowest validation loss
(evaluated every ``--eval-every`` steps) is kept. Weights are saved in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fp_export.data.corpus import CORPUS_SHA256, split_text

EOS = "<|endoftext|>"


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS)


def encode(tok: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def eval_loss(model: LlamaForCausalLM, ids: torch.Tensor, seqlen: int, device: str) -> float:
    """Mean next-token loss over non-overlapping windows (the perplexity protocol)."""
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].view(n, seqlen).to(device)
    total = 0.0
    for chunk in windows.split(32):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            total += model(chunk, labels=chunk).loss.float().item() * chunk.shape[0]
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = train_tokenizer(split_text("train"), args.vocab)
    train_ids, val_ids, test_ids = (encode(tok, split_text(s)) for s in ("train", "validation", "test"))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seqlen,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = 100

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    best = (float("inf"), -1, None)
    history = []
    t0 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, train_ids.numel() - args.seqlen, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seqlen] for s in starts.tolist()]).to(device)
        model.train()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            val = eval_loss(model, val_ids, args.seqlen, device)
            history.append({"step": step + 1, "train_loss": loss.item(), "val_loss": val})
            print(f"step {step + 1:5d} train {loss.item():.3f} val {val:.3f} ppl {math.exp(val):.2f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if val < best[0]:
                best = (val, step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    model.eval()
    test = eval_loss(model, test_ids, args.seqlen, device)
    print(f"best step {best[1]}: val ppl {math.exp(best[0]):.2f}, test ppl {math.exp(test):.2f}")

    tmp = Path(tempfile.mkdtemp(dir=args.out.parent, prefix=f".{args.out.name}."))
    tmp.chmod(0o755)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    record = {
        "corpus": "Debian bible-kjv 4.38 (King James Version, public domain), tools/make_corpus.py",
        "corpus_sha256": CORPUS_SHA256,
        "tokens": {"train": train_ids.numel(), "validation": val_ids.numel(), "test": test_ids.numel()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "best_step": best[1],
        "validation_perplexity_bf16_autocast": math.exp(best[0]),
        "test_perplexity_bf16_autocast": math.exp(test),
        "train_seconds": round(time.time() - t0, 1),
        "history": history,
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
