"""GPTQ over the grids: lower output error than RTN, consistent codes, act-order, groups, LoRC."""

import pytest
import torch

from fp_export.quant.gptq import HessianAccumulator, gptq, inverse_cholesky
from fp_export.quant.lorc import lorc_factors
from fp_export.quant.quantizer import WeightQuantizer


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
         ("fp8_e4m3", None, "none"), ("int8", None, "none"), ("fp4_e2m1", 64, "m2"),
         ("fp4_e2m1", 200, "m2"), ("int4", 200, "none")]  # 200: a partial last group (512 = 200 + 200 + 112)


@pytest.mark.parametrize("fmt,group,constraint", CASES)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(problem, fmt, group, constraint, act_order):
    w, x, h = problem
    # blocks of 48 columns straddle groups on purpose
    q = gptq(w, h, WeightQuantizer(fmt, group, constraint), block_size=48, act_order=act_order)
    r = WeightQuantizer(fmt, group, constraint).rtn(w)
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
    a = gptq(w, h, WeightQuantizer("fp4_e2m1", 256, "m2"))
    b = gptq(w, h, WeightQuantizer("fp4_e2m1", 256, "m2"))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert a.dequantize()[:, 5].abs().max() == 0


def test_indefinite_hessian_retries_with_more_damping(caplog):
    h = torch.eye(8, dtype=torch.float64)
    h[0, 0] = -0.05  # not positive definite with 1% damping of the mean diagonal; fine with 10%
    with caplog.at_level("WARNING", logger="fp_export"):
        u = inverse_cholesky(h, 0.01, "layer.q_proj")
    assert "layer.q_proj: Hessian not positive definite with damp 0.01; retrying with 0.1" in caplog.text
    assert torch.isfinite(u).all()
    with pytest.raises(ValueError, match="layer.q_proj: Hessian not positive definite even with damp"):
        inverse_cholesky(-torch.eye(8, dtype=torch.float64), 0.01, "layer.q_proj")


def test_empty_hessian_is_an_error():
    with pytest.raises(ValueError, match="no calibration"):
        HessianAccumulator(4).hessian()


@pytest.mark.parametrize("factor_format", ["none", "int8", "fp8_e4m3"])
def test_lorc_reduces_weight_error(problem, factor_format):
    w, _, _ = problem
    q = WeightQuantizer("fp4_e2m1", 256, "m2").rtn(w).dequantize()
    f = lorc_factors(w - q, 8, factor_format)
    assert f.u.shape == (128, 8) and f.v.shape == (8, 512)
    assert (w - q - f.u @ f.v).norm() < (w - q).norm()
    if factor_format != "none":
        assert f.u_codes.dtype == torch.uint8 and f.u_scale.shape == (128,) and f.v_scale.shape == (8,)
