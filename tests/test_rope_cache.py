"""The fused decode-step kernels against their PyTorch references, bit for bit: RoPE + KV-cache
write (``runtime.rope_cache``) against Hugging Face ``apply_rotary_pos_emb`` + ``index_copy_``,
and the residual add fused into the RMSNorm kernels (``runtime.fused_quant``) against the add
followed by the norm. Compiled on a CUDA GPU; without one, in Triton's interpreter in a child
pytest with ``TRITON_INTERPRET=1`` (as tests/test_gptq_kernel.py). Skips without ``triton``."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")
here = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="without CUDA: in the interpreter's child process")

ROPE = [  # batch, tokens, heads, kv heads, head size, pos0
    (1, 1, 8, 4, 64, 37),     # a decode step, GQA
    (3, 5, 4, 4, 128, 0),     # a prefill, MHA
    (2, 1, 32, 8, 128, 255),  # the last slot of a 256-slot cache
]


@pytest.mark.skipif(CUDA or INTERPRETED, reason="the cases run in this process")
def test_cases_pass_in_the_triton_interpreter():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "matches"],
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and f"{len(ROPE) + 1} passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


@here
@pytest.mark.parametrize("b,t,nh,nkv,d,p0", ROPE)
def test_rope_cache_matches_hf_rotary(b, t, nh, nkv, d, p0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from fp_export.runtime.rope_cache import rope_cache, rope_cache_reference

    g = torch.Generator().manual_seed(b * 100 + t)
    qkv = (torch.randn(b * t, (nh + 2 * nkv) * d, generator=g) * 3).bfloat16().to(DEVICE)
    rot = LlamaRotaryEmbedding(LlamaConfig(hidden_size=nh * d, num_attention_heads=nh, head_dim=d)).to(DEVICE)
    pos0 = torch.tensor([p0], device=DEVICE)
    cos, sin = rot(qkv.view(b, t, -1), (pos0 + torch.arange(t, device=DEVICE))[None].expand(b, t))
    caches = [torch.randn(b + 1, nkv, 256, d, generator=g).bfloat16().to(DEVICE) for _ in range(2)]
    caches += [c.clone() for c in caches]
    q = rope_cache(qkv, cos, sin, pos0, caches[0], caches[1], b, nh, nkv)
    q_ref = rope_cache_reference(qkv, cos, sin, pos0, caches[2], caches[3], b, nh, nkv)
    assert q.shape == (b, nh, t, d) and torch.equal(q.view(torch.int16), q_ref.view(torch.int16))
    assert torch.equal(caches[0].view(torch.int16), caches[2].view(torch.int16))  # K rotated, other slots kept
    assert torch.equal(caches[1].view(torch.int16), caches[3].view(torch.int16))  # V


@here
def test_residual_add_fused_norms_matches_add_then_norm():
    from fp_export.runtime.fused_quant import add_rmsnorm_quant, rmsnorm, rmsnorm_quant

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(7, 1000, generator=g) * 4).bfloat16().to(DEVICE)
    delta = (torch.randn(7, 1000, generator=g) * 2).bfloat16().to(DEVICE)
    w = (torch.rand(1000, generator=g) + 0.5).bfloat16().to(DEVICE)
    total = h + delta
    s1, q1, sc1 = add_rmsnorm_quant(h, delta, w, 1e-5)
    q2, sc2, y2 = rmsnorm_quant(total, w, 1e-5, return_norm=True)
    assert torch.equal(s1, total) and torch.equal(sc1, sc2) and torch.equal(q1.view(torch.uint8), q2.view(torch.uint8))
    s3, y3 = rmsnorm(h, w, 1e-5, delta)
    assert torch.equal(s3, total) and torch.equal(y3, y2) and torch.equal(rmsnorm(total, w, 1e-5), y2)
