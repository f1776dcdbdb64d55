"""The fused GPTQ block kernel (``quant.gptq_kernel``) against the eager column loop, bit for bit:
codes, scales and the scaled errors that drive the lazy updates, over every weight grid, both
scale constraints, per-channel, grouped and static (act-order) groups, ragged rows and blocks.

Runs compiled on a CUDA GPU. Without one, the cases run in Triton's interpreter (numpy semantics:
they check the kernel's arithmetic rules, not the compiler's) in a child pytest process with
``TRITON_INTERPRET=1``, which triton reads when it is first imported; CI installs ``triton`` for
it. Skips when ``triton`` is missing. The reference is ``quant.gptq.gptq`` with its eager column loop."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")
DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.skipif(CUDA or INTERPRETED, reason="the cases run in this process")
def test_cases_pass_in_the_triton_interpreter():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "equals_eager"],
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and f"{len(CASES)} passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


CASES = [  # fmt, group, constraint, act_order, out, in
    ("fp4_e2m1", 256, "m2", False, 40, 640),    # groups spanning blocks, a partial last group (fit at a block start)
    ("fp4_e2m1", 128, "m1", False, 33, 300),    # M1; a ragged last block; rows not a multiple of the tile
    ("fp4_e2m1", 256, "none", False, 16, 384),  # unconstrained FP4
    ("int4", 128, "none", False, 24, 256),      # INT4 groups
    ("int8", None, "none", False, 17, 200),     # per channel (static)
    ("fp8_e4m3", None, "none", False, 32, 256),  # FP8 weights per channel
    ("fp4_e2m1", 128, "m2", True, 20, 384),     # act-order: static groups, permuted columns
    ("fp4_e2m1", 64, "m2", False, 16, 256),     # fits mid-block: those blocks stay eager
]


@pytest.mark.skipif(not (CUDA or INTERPRETED), reason="without CUDA: in the interpreter's child process")
@pytest.mark.parametrize("fmt,group,constraint,act_order,out_f,in_f", CASES)
def test_kernel_gptq_equals_eager(monkeypatch, fmt, group, constraint, act_order, out_f, in_f):
    import fp_export.quant.gptq as G
    import fp_export.quant.gptq_kernel as K
    from fp_export.quant.quantizer import WeightQuantizer

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(out_f, in_f, generator=gen) * torch.rand(out_f, 1, generator=gen) * 3).to(DEVICE)
    w[0, :5] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 7.5])  # signed zeros, values that round to zero
    x = torch.randn(512, in_f, generator=gen) * torch.rand(in_f, generator=gen) * 4
    acc = G.HessianAccumulator(in_f, DEVICE)
    acc.add(x.to(DEVICE))
    monkeypatch.setattr(G, "CUDA_GRAPHS", False)
    launches = []
    kernel = K.quantize_block

    def counted(*args):
        launches.append(args[0].shape[1])
        kernel(*args)

    monkeypatch.setattr(K, "quantize_block", counted)
    runs = []
    for on in (False, True):
        monkeypatch.setattr(G, "BLOCK_KERNEL", on)
        runs.append(G.gptq(w, acc.hessian(), WeightQuantizer(fmt, group, constraint), act_order=act_order))
    ref, got = runs
    blocks = -(-in_f // 128)
    # every block here fits its groups at its first column or before, except with groups of 64,
    # where each block fits one mid-block and takes the eager loop
    assert len(launches) == (0 if group == 64 else blocks)
    assert torch.equal(got.codes, ref.codes), (got.codes != ref.codes).nonzero()[:5].tolist()
    assert torch.equal(got.scale, ref.scale)
    assert (ref.scale_exp is None) or torch.equal(got.scale_exp, ref.scale_exp)


@pytest.mark.skipif(not CUDA, reason="quant.gptq.BLOCK_KERNEL acts on CUDA tensors only")
@pytest.mark.parametrize("fmt,group,constraint,act_order,out_f,in_f", CASES)
def test_block_kernel_switch_gives_the_graphed_bytes(monkeypatch, fmt, group, constraint, act_order, out_f, in_f):
    """``gptq`` with ``BLOCK_KERNEL`` on (kernel blocks, graphed ones where a group is fitted
    mid-block) gives the bytes of the all-graphed loop: what turning the switch on would change."""
    import fp_export.quant.gptq as G
    from fp_export.quant.quantizer import WeightQuantizer

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(out_f, in_f, generator=gen).cuda()
    acc = G.HessianAccumulator(in_f, "cuda")
    acc.add((torch.randn(512, in_f, generator=gen) * torch.rand(in_f, generator=gen) * 4).cuda())
    runs = []
    for on in (False, True):
        monkeypatch.setattr(G, "BLOCK_KERNEL", on)
        runs.append(G.gptq(w, acc.hessian(), WeightQuantizer(fmt, group, constraint), act_order=act_order))
    assert torch.equal(runs[1].codes, runs[0].codes)
    assert torch.equal(runs[1].scale, runs[0].scale)
    assert (runs[0].scale_exp is None) or torch.equal(runs[1].scale_exp, runs[0].scale_exp)
