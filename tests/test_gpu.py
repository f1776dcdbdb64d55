"""GPU tests of the H100 path (skipped without CUDA): the CUDA shift-cast kernel, the Triton
kernels and the GPU runtime, each against the CPU reference."""

import pytest
import torch

from fp_export.numerics.formats import FP8_E4M3, decode, pack_nibbles, round_to_grid
from fp_export.numerics.scales import SHIFT_MAX, SHIFT_MIN
from fp_export.numerics.fp4_to_fp8 import fp4_to_fp8 as reference_cast

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def all_pairs(group: int):
    """packed [12, cols/2] holding all 16 codes under every shift; shift int8 [12, cols/group]."""
    shifts = torch.arange(SHIFT_MIN, SHIFT_MAX + 1, dtype=torch.int8)
    cols = 2 * group if group >= 16 else 16 * group
    codes = torch.arange(16, dtype=torch.uint8).repeat(len(shifts), cols // 16)
    shift = shifts[:, None].repeat(1, cols // group)
    return pack_nibbles(codes), shift


@pytest.mark.parametrize("group", [32, 256, 2, 6, 16])
def test_cast_kernel_every_code_and_shift(group):
    from fp_export.runtime.kernels import fp4_to_fp8

    packed, shift = all_pairs(group)
    got = fp4_to_fp8(packed.cuda(), shift.cuda(), group).cpu()
    assert torch.equal(got, reference_cast(packed, shift, group))


def test_cast_kernel_random_large():
    from fp_export.runtime.kernels import fp4_to_fp8

    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (1024, 2048), dtype=torch.uint8, generator=g)
    shift = torch.randint(SHIFT_MIN, SHIFT_MAX + 1, (1024, 4096 // 256), dtype=torch.int8, generator=g)
    out = torch.full((1024, 4096), 0x7F, dtype=torch.uint8, device="cuda")
    fp4_to_fp8(packed.cuda(), shift.cuda(), 256, out=out)
    assert torch.equal(out.cpu(), reference_cast(packed, shift, 256))


def test_quantize_rows_matches_reference():
    from fp_export.runtime.triton_w4a8 import quantize_rows_fp8

    x = torch.randn(37, 1000) * torch.logspace(-3, 3, 37)[:, None]
    x[5] = 0
    q, s = quantize_rows_fp8(x.cuda())
    amax = x.abs().amax(-1)
    ref_s = torch.where(amax > 0, amax, torch.ones_like(amax)) / 448
    assert torch.equal(s.cpu(), ref_s), (s.cpu() - ref_s).abs().max()
    ref = round_to_grid(x / ref_s[:, None], FP8_E4M3)
    bad = q.cpu().float() != ref
    assert not bad.any(), (int(bad.sum()), x[bad][:4], q.cpu().float()[bad][:4], ref[bad][:4])


@pytest.mark.parametrize("kernel,asm", [("tile", True), ("tile", False), ("split", True)])
@pytest.mark.parametrize("m", [1, 16, 100, 512])
def test_fused_w4a8_matches_reference(m, kernel, asm):
    from fp_export.runtime.layout import repack_split
    from fp_export.runtime.triton_w4a8 import quantize_rows_fp8, w4a8_matmul

    g = torch.Generator().manual_seed(m)
    n, k = 384, 1024
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    shift = torch.randint(SHIFT_MIN, SHIFT_MAX + 1, (n, k // 256), dtype=torch.int8, generator=g)
    w_scale = torch.rand(n, generator=g) * 1e-3 + 1e-4
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    xq, xs = quantize_rows_fp8(x.cuda())
    got = w4a8_matmul(xq, xs, repack_split(packed).cuda(), shift.cuda(), w_scale.cuda(), 256, bias.cuda(),
                      asm=asm, kernel=kernel).float().cpu()
    w = decode(reference_cast(packed, shift, 256), FP8_E4M3).double()
    ref = (xq.cpu().double() @ w.T) * xs.cpu().double()[:, None] * w_scale.double()[None, :] + bias.double()
    rel = (got.double() - ref).norm() / ref.norm()
    assert rel < 4e-3, rel


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from fp_export.hf.loading import DEFAULT_MODEL
    from fp_export.ptq.job import quantize_to_checkpoint
    from fp_export.quant.recipe import load_recipe

    r = load_recipe("w4a8-fp4-m2-lorc")
    r = r.model_copy(update={"calibration": r.calibration.model_copy(update={"nsamples": 8, "seqlen": 256})})
    out = tmp_path_factory.mktemp("q") / "ckpt"
    quantize_to_checkpoint(DEFAULT_MODEL, r, out, eval_text=None)
    return out


@pytest.mark.parametrize("mode", ["fused", "cast", "auto"])
def test_gpu_runtime_matches_cpu_reference(checkpoint, mode):
    from fp_export.checkpoint.layout import load_checkpoint
    from fp_export.data.corpus import load_text
    from fp_export.evaluate.perplexity import eval_windows, perplexity, tokenize
    from fp_export.runtime.linear import to_gpu_runtime

    cpu, tok, _ = load_checkpoint(checkpoint)
    ids = eval_windows(tokenize(tok, load_text("test")), 256, 8)
    gpu = to_gpu_runtime(load_checkpoint(checkpoint)[0], mode=mode)
    with torch.no_grad():
        a = cpu(ids).logits
        b = gpu(ids.cuda()).logits.float().cpu()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    p_cpu = perplexity(cpu, ids.flatten(), 256)["perplexity"]
    p_gpu = perplexity(gpu, ids.flatten().cuda(), 256)["perplexity"]
    assert abs(p_gpu / p_cpu - 1) < 0.02


def test_gpu_generation(checkpoint):
    from fp_export.checkpoint.layout import load_checkpoint
    from fp_export.runtime.linear import to_gpu_runtime

    model, tok, _ = load_checkpoint(checkpoint)
    gpu = to_gpu_runtime(model)
    ids = tok("In the beginning God", return_tensors="pt")["input_ids"].cuda()
    out = gpu.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:])
    assert out.shape[1] == ids.shape[1] + 24 and text.strip()


def test_validate_gpu_backend(checkpoint):
    import fp_export as fx

    report = fx.validate(fx.load(checkpoint), backend="gpu", precision="float32", windows=8)
    print(report)
    assert report["passed"] and report["perplexity_rel_diff"] < 0.005, report
