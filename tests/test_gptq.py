"""GPTQ over the grids: lower output error than RTN, consistent codes, act-order, groups, LoRC."""

import pytest
import torch

from fp_export.quant.gptq import HessianAccumulator, gptq_quantize
from fp_export.quant.lorc import lorc_factors
from fp_export.ptq.recipe import GPTQConfig
from fp_export.quant.weights import rtn_quantize


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 512, generator=g) * 0.02
    mix = torch.randn(512, 512, generator=g) * 0.2 + torch.eye(512)
    x = torch.randn(2048, 512, generator=g) @ mix
    acc = HessianAccumulator(512)
    acc.add(x[:1000])
    acc.add(x[1000:])
    return w, x, acc.hessian()


def out_err(x, w, q):
    return float(((x @ (w - q).T) ** 2).mean())


CASES = [("fp4_e2m1", 256, "none"), ("fp4_e2m1", 256, "m1"), ("fp4_e2m1", 256, "m2"), ("int4", 256, "none"),
         ("fp8_e4m3", None, "none"), ("int8", None, "none"), ("fp4_e2m1", 64, "m2")]


@pytest.mark.parametrize("fmt,group,constraint", CASES)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(problem, fmt, group, constraint, act_order):
    w, x, h = problem
    cfg = GPTQConfig(act_order=act_order, block_size=48)  # blocks straddle groups on purpose
    q = gptq_quantize(w, h, fmt, group, constraint, cfg)
    r = rtn_quantize(w, fmt, group, constraint)
    assert out_err(x, w, q.dequantize()) < 0.8 * out_err(x, w, r.dequantize())
    if constraint == "m2":
        assert q.scale_exp.max() <= 0


def test_hessian_is_order_independent(problem):
    _, x, h = problem
    acc = HessianAccumulator(512)
    acc.add(x)
    assert torch.allclose(acc.hessian(), h, rtol=1e-12, atol=1e-12)


def test_dead_inputs_and_determinism(problem):
    w, x, h = problem
    h = h.clone()
    h[5, :] = 0
    h[:, 5] = 0
    a = gptq_quantize(w, h, "fp4_e2m1", 256, "m2", GPTQConfig())
    b = gptq_quantize(w, h, "fp4_e2m1", 256, "m2", GPTQConfig())
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert a.dequantize()[:, 5].abs().max() == 0


def test_empty_hessian_is_an_error():
    with pytest.raises(ValueError, match="no calibration"):
        HessianAccumulator(4).hessian()


@pytest.mark.parametrize("factor_format", ["none", "int8", "fp8_e4m3"])
def test_lorc_reduces_weight_error(problem, factor_format):
    w, _, _ = problem
    q = rtn_quantize(w, "fp4_e2m1", 256, "m2").dequantize()
    f = lorc_factors(w - q, 8, factor_format)
    assert f.u.shape == (128, 8) and f.v.shape == (8, 512)
    assert (w - q - f.u @ f.v).norm() < (w - q).norm()
    if factor_format != "none":
        assert f.u_codes.dtype == torch.uint8 and f.u_scale.shape == (128,) and f.v_scale.shape == (8,)
