"""GPU quantization (issue 9), skipped without CUDA: two GPU runs give the same bytes, a killed GPU
run resumes to the same bytes, and GPU vs CPU results differ only in the last bits (test
perplexity within 1%; both, and the fraction of differing weight-code bytes, printed). The CPU reference of this code path is tests/test_onload.py."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fp_export.checkpoint.layout import WEIGHTS, read_manifest
from fp_export.hf.loading import DEFAULT_MODEL
from fp_export.ptq.job import quantize_to_checkpoint

from conftest import fast_recipe, killed_after_layers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
RECIPE = "w4a8-fp4-m2-lorc"


@pytest.fixture(scope="module")
def gpu_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "q"
    quantize_to_checkpoint(DEFAULT_MODEL, fast_recipe(RECIPE), out, max_eval_windows=8, device="cuda")
    return out


def test_two_gpu_runs_are_byte_identical(gpu_ckpt, tmp_path):
    quantize_to_checkpoint(DEFAULT_MODEL, fast_recipe(RECIPE), tmp_path / "again", max_eval_windows=8, device="cuda")
    for name in (WEIGHTS, "fp_export.json"):
        assert (gpu_ckpt / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert read_manifest(gpu_ckpt)["device"]["type"] == "cuda"


def test_killed_gpu_run_resumes_to_identical_bytes(gpu_ckpt, tmp_path):
    out = tmp_path / "resumed"

    with pytest.raises(KeyboardInterrupt):
        quantize_to_checkpoint(DEFAULT_MODEL, fast_recipe(RECIPE), out, max_eval_windows=8, device="cuda",
                               progress=killed_after_layers(2))
    assert not out.exists()
    quantize_to_checkpoint(DEFAULT_MODEL, fast_recipe(RECIPE), out, max_eval_windows=8, device="cuda", resume=True)
    assert (out / WEIGHTS).read_bytes() == (gpu_ckpt / WEIGHTS).read_bytes()
    assert (out / "fp_export.json").read_bytes() == (gpu_ckpt / "fp_export.json").read_bytes()


def test_gpu_vs_cpu_last_bits(gpu_ckpt, tmp_path):
    quantize_to_checkpoint(DEFAULT_MODEL, fast_recipe(RECIPE), tmp_path / "cpu", max_eval_windows=8)
    g, c = read_manifest(gpu_ckpt), read_manifest(tmp_path / "cpu")
    pg, pc = g["metrics"]["perplexity"], c["metrics"]["perplexity"]
    tg, tc = load_file(gpu_ckpt / WEIGHTS), load_file(tmp_path / "cpu" / WEIGHTS)
    codes = [k for k in tc if k.endswith(".qweight")]
    differ = sum(int((tg[k] != tc[k]).sum()) for k in codes) / sum(tc[k].numel() for k in codes)
    print(json.dumps({"perplexity_gpu": pg, "perplexity_cpu": pc, "qweight_bytes_differing": differ}))
    assert abs(pg - pc) / pc < 0.01


@pytest.mark.parametrize("fmt,group,constraint,act_order,in_f", [
    ("fp4_e2m1", 256, "m2", False, 640),   # groups spanning blocks, a partial last group
    ("fp4_e2m1", 64, "m1", False, 300),    # several fits per block, a ragged last block
    ("int4", None, "none", False, 256),    # per channel (static groups)
    ("fp4_e2m1", 128, "m2", True, 384),    # act-order (static groups, permuted columns)
])
def test_graphed_gptq_equals_eager(monkeypatch, fmt, group, constraint, act_order, in_f):
    """The CUDA-graph column loop gives the eager loop's bytes on the GPU (same kernels, same values)."""
    import fp_export.quant.gptq as G
    from fp_export.quant.quantizer import WeightQuantizer

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, in_f, generator=gen).cuda()
    x = torch.randn(512, in_f, generator=gen) * torch.rand(in_f, generator=gen) * 4
    acc = G.HessianAccumulator(in_f, "cuda")
    acc.add(x.cuda())
    runs = []
    for graphs in (True, False, True):  # the second graphed run replays cached graphs
        monkeypatch.setattr(G, "CUDA_GRAPHS", graphs)
        q = G.gptq(w, acc.hessian(), WeightQuantizer(fmt, group, constraint), act_order=act_order, block_size=128)
        runs.append(q)
    for q in runs[1:]:
        assert torch.equal(q.codes, runs[0].codes)
        assert torch.equal(q.scale, runs[0].scale)
        assert (q.scale_exp is None) or torch.equal(q.scale_exp, runs[0].scale_exp)
