"""CUDA decode engine for LLaMA-architecture causal LMs: static KV cache, one CUDA graph per
(batch bucket, attention-length bucket), fused FP8 activation quantization, greedy or sampled.

Linear kinds (one engine, so ratios compare kernels, not Python):
- "w4a8": FP4 M1/M2 shift-cast weights, FP8 token-wise activations (``runtime.w4a8_gemm``);
- "fp8":  W8A8 FP8 per-channel weights, token-wise FP8 activations, ``torch._scaled_mm``;
- "bf16": the weights in bf16, cuBLAS;
- "reference": any other quantized layer (INT grids, static activation scales, ...) runs its own
  ``QuantLinear`` forward in float32 (correct, not fast).
q/k/v and gate/up share their input: each group is one GEMM (rows concatenated; LoRC factors
stacked block-diagonally), fed by ``fused_quant.add_rmsnorm_quant`` (residual add, RMSNorm -> FP8 +
token scales in one kernel; ``fused_quant.rmsnorm`` for BF16); the down projection is fed by
``fused_quant.silu_mul_quant``. Bias and LoRC run in the W4A8 kernel's epilogue. RoPE and the K/V
cache writes are one kernel (``runtime.rope_cache``). A decode step's attention without GQA runs
``runtime.decode_attention``, which reads only the cache positions written so far and, when the o
projection takes FP8, quantizes its output in the same kernel; with GQA, and in prefill, PyTorch's
SDPA (cuDNN) runs (a decode step's mask is built once for all layers). On the H100
(benchmarks/attention.md) the kernel is 1.5-1.9x cuDNN SDPA + the quantizer at 100 positions
without GQA and about even at 1000-4000, but with LLaMA-70B's 8 KV heads it is slower than cuDNN
at most batch sizes and lengths.

Entry point for ``fp_export.generate`` on CUDA: ``generate_cuda`` (signature as the public API).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fp_export.runtime import w4a8_gemm as W

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LEN_BUCKET = 256  # one decode graph per multiple of this many positions (attention splits the cache by it)


def _fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16/float weight [N, K] -> (float8_e4m3fn [N, K], float32 scale [N]) with scale = amax / 448."""
    wf = w.float()
    s = wf.abs().amax(1).clamp_min(1e-12) / 448.0
    return (wf / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn), s


class Linear:
    """One GEMM on CUDA. ``__call__(x=bf16 [M, K])`` or ``__call__(q=fp8 [M, K], s=float32 [M])``
    -> bf16 [M, N]. ``quantized``: whether it takes FP8 token-quantized input."""

    def __init__(self, kind: str, n: int, k: int, **kw):
        self.kind, self.n, self.k = kind, n, k
        self.__dict__.update(kw)
        self.quantized = kind in ("w4a8", "fp8")

    def __call__(self, x=None, q=None, s=None):
        if self.kind == "bf16":
            return F.linear(x, self.weight, self.bias)
        if self.kind == "reference":
            return self.module(x.float()).to(torch.bfloat16)
        if q is None:
            from fp_export.runtime.fused_quant import quantize_rows

            q, s = quantize_rows(x)
        if self.kind == "w4a8":
            return W.gemm(q, s, self.w)
        y = torch._scaled_mm(q.contiguous(), self.w8.t(), scale_a=s[:, None], scale_b=self.ws[None, :],
                             out_dtype=torch.bfloat16)
        return y if self.bias is None else y + self.bias


def _from_module(mod: nn.Module, kind: str, dev) -> dict:
    """Parameters of one projection for ``kind`` ("bf16", "fp8", "w4a8"): a dict the group builder
    concatenates. QuantLinear layers map to w4a8 (FP4 M1/M2 + FP8 token-wise), fp8 (FP8 per
    channel + FP8 token-wise) or reference."""
    from fp_export.quant.qlinear import QuantLinear

    if isinstance(mod, QuantLinear):
        act, qw = mod.act, mod.qweight
        tok_fp8 = act is not None and act.format == "fp8_e4m3" and act.granularity != "tensor"
        sc = qw.to_shift_cast() if kind == "w4a8" and tok_fp8 and qw is not None else None
        if sc is not None and mod.in_features % 32 == 0 and sc.group_size % 32 == 0:
            return dict(kind="w4a8", packed=sc.packed, shift=sc.shift, w_scale=sc.dq_scale, bias=mod.bias,
                        u=mod.lorc_u, v=mod.lorc_v, group=sc.group_size)
        if kind in ("w4a8", "fp8") and tok_fp8 and qw is not None and qw.fmt.name == "fp8_e4m3" \
                and qw.scale.shape[1] == 1 and mod.lorc_u is None:
            return dict(kind="fp8", w8=qw.codes.view(torch.float8_e4m3fn), ws=qw.scale[:, 0].float(), bias=mod.bias)
        if kind == "bf16":
            return dict(kind="bf16", weight=mod.weight, bias=mod.bias)
        return dict(kind="reference", module=mod)
    return dict(kind=kind if kind != "w4a8" else "bf16", weight=mod.weight.detach(),
                bias=None if mod.bias is None else mod.bias.detach())


def build_group(parts: list[dict], dev) -> list[Linear]:
    """One Linear for parts of one kind sharing an input (rows concatenated), else one per part."""
    kinds = {p["kind"] for p in parts}
    if len(kinds) > 1 or "reference" in kinds or (kinds == {"w4a8"} and len({p["group"] for p in parts}) > 1):
        return [build_group([p], dev)[0] for p in parts]
    kind = kinds.pop()
    n_each = [p.get("packed", p.get("weight", p.get("w8"))).shape[0] for p in parts]
    n = sum(n_each)
    has_bias = any(p.get("bias") is not None for p in parts)
    bias = torch.cat([p["bias"].float() if p.get("bias") is not None else torch.zeros(m) for p, m in
                      zip(parts, n_each)]).to(dev) if has_bias else None
    if kind == "bf16":
        w = torch.cat([p["weight"].to(dev, torch.bfloat16) for p in parts])
        return [Linear("bf16", n, w.shape[1], weight=w, bias=None if bias is None else bias.bfloat16())]
    if kind == "fp8":
        if "w8" in parts[0]:
            w8 = torch.cat([p["w8"].to(dev) for p in parts])
            ws = torch.cat([p["ws"].to(dev) for p in parts])
        else:
            w8, ws = _fp8_per_channel(torch.cat([p["weight"].to(dev) for p in parts]))
        return [Linear("fp8", n, w8.shape[1], w8=w8, ws=ws, bias=None if bias is None else bias.bfloat16())]
    k = parts[0]["packed"].shape[1] * 2
    u = v = None
    if any(p.get("u") is not None for p in parts):
        ranks = [0 if p.get("u") is None else p["u"].shape[1] for p in parts]
        u = torch.zeros(n, sum(ranks))
        v = torch.cat([p["v"].float() for p in parts if p.get("v") is not None])
        r0 = row = 0
        for p, r, m in zip(parts, ranks, n_each):
            if r:
                u[row:row + m, r0:r0 + r] = p["u"].float()
            r0, row = r0 + r, row + m
    w = W.prepare(torch.cat([p["packed"] for p in parts]).to(dev), torch.cat([p["shift"] for p in parts]).to(dev),
                  parts[0]["group"], torch.cat([p["w_scale"] for p in parts]).to(dev), bias,
                  None if u is None else u.to(dev), None if v is None else v.to(dev))
    return [Linear("w4a8", n, k, w=w)]


class DecodeEngine:
    """A LLaMA-architecture HF causal LM (``model.model.layers[i].self_attn / .mlp``) on CUDA.

    ``kind``: "w4a8" (quantized layers as their kernels allow; float layers stay bf16), "fp8"
    (W8A8 FP8 per-channel from the float/dequantized weights) or "bf16". ``linears``: optional
    {(layer, name): dict} overriding the projections (benchmarks build random W4A8 weights).
    ``keep_fp8``: W4A8 layers also keep an FP8 copy of their weights (1 byte per weight more) so
    that prefill and batches above 16 tokens run ``_scaled_mm`` without the per-call cast."""

    def __init__(self, model: nn.Module, kind: str = "w4a8", device: str | torch.device = "cuda",
                 linears: dict | None = None, keep_fp8: bool = False):
        if kind not in ("w4a8", "fp8", "bf16"):
            raise ValueError(f"engine kind {kind!r}: choose w4a8, fp8 or bf16")
        cfg = model.config
        if getattr(cfg, "model_type", "llama") not in ("llama", "mistral", "qwen2") or not hasattr(model, "model"):
            raise ValueError(f"DecodeEngine supports LLaMA-architecture models, not {getattr(cfg, 'model_type', '?')}")
        self.dev = torch.device(device)
        self.cfg = cfg
        self.nh = cfg.num_attention_heads
        self.nkv = getattr(cfg, "num_key_value_heads", None) or self.nh
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.eps = cfg.rms_norm_eps
        inner = model.model
        bf = lambda t: t.detach().to(self.dev, torch.bfloat16)  # noqa: E731
        self.embed = bf(inner.embed_tokens.weight)
        self.norm_w = bf(inner.norm.weight)
        self.rotary = inner.rotary_emb.to(self.dev)
        head = model.lm_head if not getattr(cfg, "tie_word_embeddings", False) else None
        self.lm_head = self.embed if head is None else bf(head.weight)
        self.layers = []
        over = linears or {}
        for i, layer in enumerate(inner.layers):
            at, mlp = layer.self_attn, layer.mlp

            def part(name, mod):
                return over.get((i, name)) or _from_module(mod, kind, self.dev)

            qkv = build_group([part("q", at.q_proj), part("k", at.k_proj), part("v", at.v_proj)], self.dev)
            gu = build_group([part("gate", mlp.gate_proj), part("up", mlp.up_proj)], self.dev)
            self.layers.append(dict(ln1=bf(layer.input_layernorm.weight), ln2=bf(layer.post_attention_layernorm.weight),
                                    qkv=qkv, o=build_group([part("o", at.o_proj)], self.dev)[0], gu=gu,
                                    down=build_group([part("down", mlp.down_proj)], self.dev)[0]))
        if keep_fp8:
            for L in self.layers:
                for li in [*L["qkv"], L["o"], *L["gu"], L["down"]]:
                    if li.kind == "w4a8":
                        li.w.keep_fp8()
        self.kind = kind
        self.cache = None
        self.graphs: dict = {}
        self.pool = None

    # --- model pieces -------------------------------------------------------------------------
    def _norm_then(self, h: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor,
                   lins: list[Linear]) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add h + delta (none before the first layer), its RMSNorm and the linears
        fed by it, the add and norm as one kernel (with the FP8 token quantization when every
        linear takes FP8). -> (the new residual stream, the linears' outputs concatenated)."""
        from fp_export.runtime.fused_quant import add_rmsnorm_quant, rmsnorm, rmsnorm_quant

        if all(li.quantized for li in lins):
            if delta is None:
                q, s = rmsnorm_quant(h, w, self.eps)
            else:
                h, q, s = add_rmsnorm_quant(h, delta, w, self.eps)
            ys = [li(q=q, s=s) for li in lins]
        else:
            if delta is None:
                xn = rmsnorm(h, w, self.eps)
            else:
                h, xn = rmsnorm(h, w, self.eps, delta)
            ys = [li(x=xn) for li in lins]
        return h, ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)

    def _mlp_down(self, gu: torch.Tensor, down: Linear) -> torch.Tensor:
        i = gu.shape[-1] // 2
        if down.quantized:
            from fp_export.runtime.fused_quant import silu_mul_quant

            q, s = silu_mul_quant(gu[:, :i], gu[:, i:])
            return down(q=q, s=s)
        return down(x=F.silu(gu[:, :i]) * gu[:, i:])

    def _forward(self, ids: torch.Tensor, pos0: torch.Tensor, length: int | None) -> torch.Tensor:
        """ids [B, T], pos0 int64 [1] (position of ids[:, 0]); ``length``: None for a prefill from
        position 0 (causal attention over the prompt), else the attention-length bucket of a
        decode step (T = 1). -> logits float32 [B, V] of the last position."""
        from fp_export.runtime.decode_attention import decode_attention
        from fp_export.runtime.fused_quant import rmsnorm
        from fp_export.runtime.rope_cache import rope_cache

        b, t = ids.shape
        h = F.embedding(ids, self.embed).view(b * t, -1)
        pos = pos0 + torch.arange(t, device=self.dev)
        cos, sin = self.rotary(h.view(b, t, -1), pos[None].expand(b, t))
        kc, vc = self.cache
        span = t if length is None else length
        own = length is not None and self.nkv == self.nh  # decode without GQA: runtime.decode_attention
        mask = None  # SDPA decode: the slots up to pos0, as an additive bf16 mask built once for all layers
        if length is not None and not own:
            seen = torch.arange(length, device=self.dev) <= pos0
            mask = torch.zeros(length, dtype=torch.bfloat16, device=self.dev).masked_fill_(~seen, float("-inf"))
            mask = mask[None, None, None, :]
        delta = None
        for li, L in enumerate(self.layers):
            h, qkv = self._norm_then(h, delta, L["ln1"], L["qkv"])
            q = rope_cache(qkv, cos, sin, pos0, kc[li], vc[li], b, self.nh, self.nkv)
            if own and L["o"].quantized:  # the o projection's FP8 input straight from attention
                a8, s = decode_attention(q, kc[li], vc[li], pos0, length, quantize=True)
                delta = L["o"](q=a8, s=s)
            elif own:
                delta = L["o"](x=decode_attention(q, kc[li], vc[li], pos0, length))
            else:
                a = F.scaled_dot_product_attention(q, kc[li, :b, :, :span], vc[li, :b, :, :span], attn_mask=mask,
                                                   is_causal=length is None, enable_gqa=self.nkv != self.nh)
                delta = L["o"](x=a.transpose(1, 2).reshape(b * t, -1))
            h, gu = self._norm_then(h, delta, L["ln2"], L["gu"])
            delta = self._mlp_down(gu, L["down"])
        _, xn = rmsnorm(h.view(b, t, -1)[:, -1], self.norm_w, self.eps, delta.view(b, t, -1)[:, -1])
        return F.linear(xn, self.lm_head).float()

    # --- cache, graphs ------------------------------------------------------------------------
    def _ensure_cache(self, batch: int, seq: int) -> None:
        """A KV cache of at least ``batch`` rows and ``seq`` positions. It only grows (to the largest
        batch and length seen), so that a server's varying batch sizes reuse one cache and the
        graphs captured on it; a smaller batch uses its first rows."""
        seq = -(-seq // LEN_BUCKET) * LEN_BUCKET
        if self.cache is not None:
            if self.cache[0].shape[1] >= batch and self.cache[0].shape[3] >= seq:
                return
            batch, seq = max(batch, self.cache[0].shape[1]), max(seq, self.cache[0].shape[3])
        self.release()
        shape = (len(self.layers), batch, self.nkv, seq, self.hd)
        self.cache = (torch.zeros(shape, dtype=torch.bfloat16, device=self.dev),
                      torch.zeros(shape, dtype=torch.bfloat16, device=self.dev))

    def release(self) -> None:
        """Free the KV cache and the captured graphs."""
        self.cache, self.graphs, self.pool = None, {}, None
        torch.cuda.empty_cache()

    def _graph(self, batch: int, length: int):
        key = (batch, length)
        if key not in self.graphs:
            ids = torch.zeros(batch, 1, dtype=torch.long, device=self.dev)
            # warm-up and capture write K/V at the last cache slot, which no generation reaches
            # (cache length >= prompt + max_new_tokens; the last step writes prompt + max_new - 2)
            pos = torch.full((1,), self.cache[0].shape[3] - 1, dtype=torch.long, device=self.dev)
            side = torch.cuda.Stream(self.dev)
            side.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(side):  # warm-up: compiles kernels, sizes workspaces
                for _ in range(2):
                    self._forward(ids, pos, length)
            torch.cuda.current_stream(self.dev).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(g, pool=self.pool):
                logits = self._forward(ids, pos, length)
            self.graphs[key] = (g, ids, pos, logits)
        return self.graphs[key]

    # --- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, int]:
        """Run the prompt [B, T] (eager), sizing the cache for T + max_new_tokens. -> (logits
        float32 [B, V], the batch bucket)."""
        b, t = input_ids.shape
        if b > BATCH_BUCKETS[-1]:
            raise ValueError(f"batch {b} > {BATCH_BUCKETS[-1]}")
        bb = next(x for x in BATCH_BUCKETS if x >= b)
        self._ensure_cache(bb, t + max_new_tokens)
        ids = input_ids.to(self.dev)
        return self._forward(ids, torch.zeros(1, dtype=torch.long, device=self.dev), None), bb

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pos: int, bucket: int) -> torch.Tensor:
        """One decode step through the graph of (bucket, length bucket): tokens int64 [B] at
        position ``pos`` -> logits float32 [B, V]."""
        b = tokens.shape[0]
        length = min(self.cache[0].shape[3], -(-(pos + 1) // LEN_BUCKET) * LEN_BUCKET)
        g, ids, p, logits = self._graph(bucket, length)
        ids[:b, 0].copy_(tokens)
        p.fill_(pos)
        g.replay()
        return logits[:b].clone()  # the graph's output buffer is overwritten by the next replay

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = None,
                 on_token: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Semantics, checks and sampling rule of ``runtime.generate.generate`` (the reference loop;
        the same ``next_tokens``, with a CPU generator seeded by ``seed``); returns int64 [B, n] on
        the CPU, n <= max_new_tokens (rows that produced ``eos_token_id`` repeat it until all have)."""
        from fp_export.runtime.generate import TokenStream, check_inputs

        check_inputs(self.cfg, input_ids, max_new_tokens)
        t = input_ids.shape[1]
        logits, bucket = self.prefill(input_ids, max_new_tokens)
        stream = TokenStream(input_ids.shape[0], seed, eos_token_id, on_token, self.dev)
        for i in range(max_new_tokens):
            tok = stream.push(logits, temperature, top_k, top_p)
            if stream.done or i == max_new_tokens - 1:
                break
            logits = self.step(tok, t + i, bucket)
        return stream.tokens()


def engine_for(model: nn.Module, kind: str = "w4a8", device: str | torch.device = "cuda") -> DecodeEngine:
    """The model's engine of ``kind`` on ``device`` (built once, cached on the model object)."""
    cache = model.__dict__.setdefault("_fp_export_engines", {})
    key = (kind, str(torch.device(device)))
    if key not in cache:
        cache[key] = DecodeEngine(model, kind, device)
    return cache[key]


def generate_cuda(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = None,
                  on_token: Callable[[int, torch.Tensor], None] | None = None, device: str | torch.device = "cuda",
                  kind: str = "w4a8") -> torch.Tensor:
    """``fp_export.generate`` on CUDA for ``qm.model`` (an HF LLaMA-architecture causal LM, with
    or without QuantLinear layers): LongTensor [batch, n_new] on the CPU."""
    return engine_for(model, kind, device).generate(input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                                    top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                                                    on_token=on_token)
