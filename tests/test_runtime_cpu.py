"""The GPU path's parts that run without a GPU: the reference cast, the runtime's CPU fallback,
the fused kernel's weight layout, and the CUDA kernel compiling with nvcc."""

import shutil

import pytest
import torch

from fp_export.checkpoint.layout import load_checkpoint
from fp_export.data.corpus import load_text
from fp_export.evaluate.perplexity import eval_windows, tokenize
from fp_export.runtime.kernels import build_library, fp4_to_fp8
from fp_export.runtime.layout import BLOCK_K, repack_split, unsplit
from fp_export.runtime.linear import GpuQuantLinear, to_gpu_runtime
from fp_export.numerics.fp4_to_fp8 import fp4_to_fp8 as reference


def test_cpu_dispatch_is_the_reference():
    packed = torch.randint(0, 256, (8, 256), dtype=torch.uint8)
    shift = torch.randint(-5, 7, (8, 2), dtype=torch.int8)
    assert torch.equal(fp4_to_fp8(packed, shift, 256), reference(packed, shift, 256))
    with pytest.raises(ValueError, match="shift outside"):
        reference(packed, torch.full((8, 2), 7, dtype=torch.int8), 256)


def test_split_layout_round_trip_and_halves():
    from fp_export.numerics.formats import unpack_nibbles

    packed = torch.randint(0, 256, (5, 3 * BLOCK_K // 2), dtype=torch.uint8)
    split = repack_split(packed)
    assert torch.equal(unsplit(split), packed)
    codes = unpack_nibbles(packed).view(5, 3, BLOCK_K)
    assert torch.equal((split & 0xF).view(5, 3, -1), codes[..., : BLOCK_K // 2])
    assert torch.equal((split >> 4).view(5, 3, -1), codes[..., BLOCK_K // 2:])


@pytest.mark.parametrize("recipe,kind", [("w4a8-fp4-m2-lorc", "fp4_shift"), ("w8a8-fp8", "fp8"),
                                         ("w4a8-int4", "dense"), ("w8a8-fp8-static", "fp8")])
def test_runtime_cpu_fallback_matches_reference_model(quantized, recipe, kind):
    qdir = quantized(recipe)
    ref, tok, _ = load_checkpoint(qdir)
    ids = eval_windows(tokenize(tok, load_text("test")), 256, 2)
    rt = to_gpu_runtime(load_checkpoint(qdir)[0], mode="auto", device="cpu")
    assert rt.model.layers[0].self_attn.q_proj.kind == kind
    with torch.no_grad():
        a, b = ref(ids).logits, rt(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert (a - b).abs().max() < 2.0


def test_runtime_rejects_unknown_mode(quantized):
    ql = load_checkpoint(quantized("w4a8-fp4-m2"))[0].model.layers[0].mlp.up_proj
    with pytest.raises(ValueError, match="mode"):
        GpuQuantLinear.from_quant_linear(ql, "turbo")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    lib = build_library(tmp_path)
    assert lib.is_file() and lib.stat().st_size > 0
