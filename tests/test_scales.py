"""Scales and the M1/M2 constraints; exactness of the shift cast for every pair the quantizer emits."""

import pytest
import torch

from fp_export.numerics.formats import FP4_E2M1, FP8_E4M3, decode, pack_nibbles
from fp_export.numerics.fp4_to_fp8 import SHIFT_MAX, SHIFT_MIN, fp4_code_to_fp8_bits, fp4_to_fp8
from fp_export.numerics.scales import SHIFT_WINDOW, absmax_scale, ceil_log2, expand_groups, group_amax, token_scales
from fp_export.quant.quantizer import WeightQuantizer


def rtn(w, fmt, group, constraint="none"):
    return WeightQuantizer(fmt, group, constraint).rtn(w)


def test_every_code_and_shift_is_exact_in_e4m3():
    codes = torch.arange(16, dtype=torch.uint8)
    for k in range(SHIFT_MIN, SHIFT_MAX + 1):
        bits = fp4_code_to_fp8_bits(codes, torch.tensor(k))
        want = decode(codes, FP4_E2M1) * 2.0**k
        assert torch.equal(decode(bits, FP8_E4M3), want), k  # value exact
        assert torch.equal(bits, want.to(torch.float8_e4m3fn).view(torch.uint8)), k  # same bits as torch's cast
        assert not torch.isnan(decode(bits, FP8_E4M3)).any()


def test_shift_range_is_tight():
    # one step outside loses exactness (0.5 * 2^-6 is an E4M3 subnormal, 6 * 2^7 overflows 448)
    assert 0.5 * 2.0 ** (SHIFT_MIN - 1) < 2.0**-6
    assert 6 * 2.0 ** (SHIFT_MAX + 1) > FP8_E4M3.max


def test_ceil_log2_is_exact():
    a = torch.tensor([1.0, 2.0, 3.0, 0.25, 0.3, 2.0**-20, 1.0000001])
    assert ceil_log2(a).tolist() == [0, 1, 2, -2, -1, -20, 1]


@pytest.mark.parametrize("constraint", ["m1", "m2"])
@pytest.mark.parametrize("group", [256, 64, 96, 200, 1024, None])  # 96, 200, 1024: partial last groups
def test_constrained_scales_and_shift_cast_reproduce_dequantized_weights(constraint, group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 512, generator=g) * torch.logspace(-4, 0, 512)[None, :]  # wide dynamic range
    w[3] = 0  # an all-zero row
    qw = rtn(w, "fp4_e2m1", group, constraint)
    exp = qw.scale_exp.int()
    if constraint == "m2":
        assert exp.max() <= 0 and exp.min() >= 1 - SHIFT_WINDOW
        assert torch.equal(qw.scale, torch.ldexp(torch.ones_like(qw.scale), exp.float()) * qw.row_scale[:, None])
    else:
        assert (exp.amax(1) - exp.amin(1)).max() < SHIFT_WINDOW
        assert torch.equal(qw.scale, torch.ldexp(torch.ones_like(qw.scale), exp.float()))
    # no clipping: every group's absmax fits into the grid at its scale
    assert (group_amax(w, group) <= qw.scale * FP4_E2M1.max * (1 + 1e-6)).all()
    sc = qw.to_shift_cast()
    assert sc.shift.min() >= SHIFT_MIN and sc.shift.max() <= SHIFT_MAX
    assert torch.equal(sc.packed, pack_nibbles(qw.codes)) and sc.group_size == (group or 512)
    fp8 = decode(fp4_to_fp8(sc.packed, sc.shift, sc.group_size), FP8_E4M3)
    assert torch.equal(fp8 * sc.dq_scale[:, None], qw.dequantize())


@pytest.mark.parametrize("fmt,constraint", [("fp4_e2m1", "none"), ("int4", "none"), ("fp8_e4m3", "none")])
def test_only_constrained_fp4_lowers_to_the_shift_cast(fmt, constraint):
    assert rtn(torch.randn(4, 64), fmt, 32, constraint).to_shift_cast() is None


def test_unconstrained_scales_are_absmax_over_max():
    w = torch.randn(8, 512)
    w[2, 256:] = 0  # a zero group gets the rule's 1 / max
    qw = rtn(w, "fp4_e2m1", 256)
    assert qw.scale_exp is None
    assert torch.equal(qw.scale, absmax_scale(group_amax(w, 256), 6.0))
    assert qw.scale[2, 1] == 1 / 6


def test_the_scale_rule():
    assert torch.equal(absmax_scale(torch.tensor([12.0, 0.0, 3.0]), 6.0), torch.tensor([2.0, 1 / 6, 0.5]))


def test_partial_last_group():
    w = torch.arange(1.0, 11.0)[None, :].repeat(2, 1)  # 10 columns in groups of 4: 4 + 4 + 2
    assert group_amax(w, 4).tolist() == [[4.0, 8.0, 10.0]] * 2
    assert expand_groups(torch.tensor([[1.0, 2.0, 3.0]]), 4, 10).tolist() == [[1.0] * 4 + [2.0] * 4 + [3.0] * 2]
    assert group_amax(w, 16).tolist() == [[10.0]] * 2  # a group wider than the row


def test_constraints_need_fp4():
    with pytest.raises(ValueError, match="fp4_e2m1"):
        WeightQuantizer("fp8_e4m3", 256, "m2")


def test_token_scales():
    x = torch.tensor([[1.0, -448.0 * 2], [0.0, 0.0]])
    assert torch.equal(token_scales(x, FP8_E4M3)[:, 0], torch.tensor([896.0, 1.0]) / 448)


def test_m2_loses_less_than_m1():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 1024, generator=g) * 0.02
    err = {c: (rtn(w, "fp4_e2m1", 256, c).dequantize() - w).norm() for c in ("none", "m1", "m2")}
    assert err["none"] <= err["m2"] < err["m1"]


def test_m1_exponent_range_is_checked_once_per_weight():
    """M1 exponents are int8: a row whose absmax needs exponents below -128 is refused when the row
    reference is made (before GPTQ's column loop, which must not synchronize the device)."""
    from fp_export.numerics.scales import row_reference

    ok = torch.tensor([[1.0, -2.0], [3.0e-30, 1.0e-30]])
    assert row_reference(ok, FP4_E2M1, "m1").row_exp.dtype == torch.int32
    with pytest.raises(ValueError, match="M1 exponent out of int8 range"):
        row_reference(torch.tensor([[1.0e-38, 0.0]]), FP4_E2M1, "m1")
