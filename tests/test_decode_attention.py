"""The decode-step attention kernel (``runtime.decode_attention``) against a float64 softmax
attention: every head, GQA, K/V split over parts (some empty), a head size that is not a power of
two, cache positions past the step filled with NaN (never read), and its fused FP8 output equal
bit for bit to the token quantizer on its bf16 output. Compiled on a CUDA GPU; without one, in
Triton's interpreter in a child pytest with ``TRITON_INTERPRET=1`` (as tests/test_rope_cache.py)."""

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

CASES = [  # batch, heads, kv heads, head size, pos0, length, parts
    (1, 8, 4, 64, 37, 256, None),  # the default model's step
    (2, 4, 4, 128, 200, 256, 4),    # MHA, four parts, the last empty
    (3, 6, 2, 48, 0, 64, 1),        # the first position; head size 48
    (2, 8, 8, 128, 255, 256, 3),    # the last slot, parts of 128 positions
    (1, 4, 1, 64, 70, 128, 2),      # one KV head for four query heads, a part boundary at 64
]


@pytest.mark.skipif(CUDA or INTERPRETED, reason="the cases run in this process")
def test_cases_pass_in_the_triton_interpreter():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "matches"],
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and f"{len(CASES)} passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


def _inputs(b, nh, nkv, d, p0, length, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, nh, 1, d, generator=g) * 2).bfloat16()
    caches = []
    for _ in range(2):
        c = torch.full((b + 1, nkv, length + 64, d), float("nan"))  # never read: past pos0 and past the batch
        c[:b, :, :p0 + 1] = torch.randn(b, nkv, p0 + 1, d, generator=g) * 2
        caches.append(c.bfloat16().to(DEVICE))
    return q.to(DEVICE), caches[0], caches[1], torch.tensor([p0], device=DEVICE)


@here
@pytest.mark.parametrize("b,nh,nkv,d,p0,length,parts", CASES)
def test_decode_attention_matches_float64_softmax(b, nh, nkv, d, p0, length, parts):
    from fp_export.runtime.decode_attention import decode_attention, decode_attention_reference
    from fp_export.runtime.fused_quant import quantize_rows

    q, kc, vc, pos = _inputs(b, nh, nkv, d, p0, length, seed=b * 1000 + p0)
    out = decode_attention(q, kc, vc, pos, length, parts=parts)
    ref = decode_attention_reference(q, kc, vc, pos)
    assert out.shape == (b, nh * d) and out.dtype == torch.bfloat16
    err = (out.double().cpu() - ref.cpu()).abs()
    # bf16 output: half an ulp of the value plus float32 softmax rounding
    assert (err <= ref.abs().cpu() * 2.0 ** -8 + 1e-5).all(), err.max()
    q8, s = decode_attention(q, kc, vc, pos, length, quantize=True, parts=parts)
    q8_ref, s_ref = quantize_rows(out)
    assert torch.equal(q8.view(torch.uint8), q8_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert torch.equal(decode_attention(q, kc, vc, pos, length, parts=parts).view(torch.int16), out.view(torch.int16))


def test_part_rule_fills_the_gpu_and_covers_the_cache(monkeypatch):
    """Parts until PROGRAMS_PER_SM programs per multiprocessor, each of whole BLOCK_N steps, covering the
    positions; one part on the CPU."""
    from fp_export.runtime import decode_attention as A

    monkeypatch.setattr(A, "multiprocessors", lambda device: 132)
    cuda = torch.device("cuda")
    assert A.part_rule(1, 32, 256, cuda) == (4, 64) and A.part_rule(1, 32, 4096, cuda) == (16, 256)
    assert A.part_rule(8, 32, 256, cuda) == (2, 128) and A.part_rule(32, 32, 256, cuda) == (1, 256)
    assert A.part_rule(1, 32, 256, torch.device("cpu")) == (1, 256)
    for length in (1, 64, 65, 256, 1000, 4096, 32768):
        for batch, heads in ((1, 32), (1, 8), (8, 32), (64, 64)):
            parts, chunk = A.part_rule(batch, heads, length, cuda)
            assert chunk % A.BLOCK_N == 0 and parts * chunk >= length > (parts - 1) * chunk and parts <= A.MAX_PARTS
            assert parts == 1 or batch * heads * (parts - 1) < A.PROGRAMS_PER_SM * 132
