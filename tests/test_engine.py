"""Decode engine (fp_export.runtime.engine): CPU tests of the fused (q|k|v, gate|up) W4A8 weight
groups; GPU tests (skipped without CUDA) against the reference models and the reference loop."""

import pytest
import torch

from fp_export.numerics.formats import FP8_E4M3, round_to_grid
from fp_export.runtime import w4a8_gemm as W
from fp_export.runtime.engine import build_group

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _part(n, k, rank, seed, bias):
    g = torch.Generator().manual_seed(seed)
    return dict(kind="w4a8", group=64, packed=torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
                shift=torch.randint(-5, 7, (n, k // 64), dtype=torch.int8, generator=g),
                w_scale=torch.rand(n, generator=g), bias=torch.randn(n, generator=g) if bias else None,
                u=torch.randn(n, rank, generator=g) if rank else None, v=torch.randn(rank, k, generator=g) if rank else None)


def test_fused_group_equals_separate_layers():
    """q|k|v fused into one W4A8 weight (LoRC stacked block-diagonally, missing bias as zeros)
    computes exactly the concatenation of the three layers."""
    parts = [_part(48, 128, 4, 1, True), _part(16, 128, 0, 2, False), _part(32, 128, 2, 3, True)]
    fused = build_group(parts, "cpu")
    assert len(fused) == 1 and fused[0].n == 96
    a = round_to_grid(torch.randn(3, 128) * 40, FP8_E4M3).double()
    s = torch.rand(3, dtype=torch.float64)
    got = W.reference(a, s, fused[0].w)
    ref = []
    for p in parts:
        w = W.prepare(p["packed"], p["shift"], 64, p["w_scale"], p["bias"], p["u"], p["v"])
        ref.append(W.reference(a, s, w))
    assert torch.allclose(got, torch.cat(ref, 1), rtol=1e-12, atol=1e-9)


def test_mixed_kinds_are_not_fused():
    p = _part(16, 128, 0, 1, False)
    q = dict(kind="bf16", weight=torch.randn(16, 128), bias=None)
    assert [li.kind for li in build_group([p, q], "cpu")] == ["w4a8", "bf16"]


@pytest.fixture(scope="module")
def models(quantized):
    from fp_export.checkpoint.layout import load_checkpoint
    from fp_export.hf.loading import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)[0], load_checkpoint(quantized("w4a8-fp4-m2-lorc"))[0]


@pytest.mark.parametrize("kind", ["bf16", "fp8", "w4a8"])
@pytest.mark.gpu
@needs_cuda
def test_engine_logits_match_reference(models, kind):
    from fp_export.runtime.engine import DecodeEngine

    base, q = models
    ref_model = q if kind == "w4a8" else base
    eng = DecodeEngine(ref_model, kind)
    ids = torch.randint(0, base.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_model(ids).logits.float()  # CPU float32 reference (QuantLinear forward for W4A8)
    pre, bucket = eng.prefill(ids[:, :32], 8)
    steps = [pre]
    for i in range(32, 40):
        steps.append(eng.step(ids[:, i].cuda(), i, bucket))
    got = torch.stack(steps[:-1], 1).cpu()  # logits predicting positions 32..39
    want = ref[:, 31:39]
    rel = ((got - want).norm() / want.norm()).item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    # bf16 activations vs the float32 reference; fp8 adds its own weight quantization
    assert rel < {"bf16": 0.03, "fp8": 0.15, "w4a8": 0.1}[kind] and agree >= 0.75, (rel, agree)
    # a second prefill + steps through the now captured graphs gives the same logits
    pre2, _ = eng.prefill(ids[:, :32], 8)
    assert torch.equal(pre2, pre)
    assert torch.equal(eng.step(ids[:, 32].cuda(), 32, bucket), steps[1])


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
@pytest.mark.gpu
@needs_cuda
def test_decode_attention_kernel_serves_models_without_gqa(monkeypatch, kind):
    """Without GQA the decode steps run runtime.decode_attention (FP8 output for an FP8 o
    projection): logits as the float32 model's, over a length bucket boundary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fp_export.runtime import decode_attention as A
    from fp_export.runtime.engine import LEN_BUCKET, DecodeEngine

    calls = []
    kernel = A.decode_attention
    monkeypatch.setattr(A, "decode_attention", lambda *a, **kw: calls.append(kw.get("quantize", False)) or kernel(*a, **kw))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, LEN_BUCKET + 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits.float()[:, LEN_BUCKET - 9:LEN_BUCKET + 7]
    eng = DecodeEngine(model.to(torch.bfloat16), kind)
    pre, bucket = eng.prefill(ids[:, :LEN_BUCKET - 8], 16)
    steps = [pre] + [eng.step(ids[:, i].cuda(), i, bucket) for i in range(LEN_BUCKET - 8, LEN_BUCKET + 7)]
    got = torch.stack(steps, 1).cpu()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < {"bf16": 0.03, "fp8": 0.15}[kind], rel
    assert calls and set(calls) == {kind == "fp8"}


@pytest.mark.gpu
@needs_cuda
def test_generate_cuda_greedy_sampled_eos(models):
    from fp_export.runtime.engine import generate_cuda

    _, q = models
    ids = torch.randint(0, q.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    seen = []
    out = generate_cuda(q, ids, 20, on_token=lambda i, t: seen.append((i, t.clone())))
    assert out.shape == (3, 20) and out.dtype == torch.long
    assert [i for i, _ in seen] == list(range(20)) and torch.equal(torch.stack([t for _, t in seen], 1), out)
    assert torch.equal(out, generate_cuda(q, ids, 20))  # deterministic (graphs, fixed split-K order)
    s1 = generate_cuda(q, ids, 20, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    assert torch.equal(s1, generate_cuda(q, ids, 20, temperature=0.9, top_k=20, top_p=0.9, seed=7))
    eos = int(out[0, 3])
    e = generate_cuda(q, ids[:1], 20, eos_token_id=eos)
    assert e.shape[1] <= 4 and int(e[0, -1]) == eos


@pytest.mark.gpu
@needs_cuda
def test_varying_batches_reuse_one_cache_and_its_graphs(models):
    """A server's batches vary in size: the cache grows to the largest and is kept, so the graphs
    captured for one batch bucket survive a smaller batch, and the tokens do not change."""
    from fp_export.runtime.engine import engine_for

    _, q = models
    eng = engine_for(q, "w4a8")
    ids = torch.randint(0, q.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(2))
    four = eng.generate(ids, 6)
    graphs, cache = dict(eng.graphs), eng.cache[0]
    assert eng.generate(ids[:1], 6).shape == (1, 6)
    assert eng.cache[0] is cache and all(eng.graphs[k] is g for k, g in graphs.items())
    assert torch.equal(eng.generate(ids, 6), four)
