"""Every grid against independent references: ml_dtypes float8 / float4 dtypes, torch float8 decoding, onnx."""

import ml_dtypes
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fp_export.numerics.formats import (FP4_E2M1, FP8_E4M3, FP8_E5M2, FORMATS, INT4, INT8, decode, decode_table, encode,
                               get_format, pack_nibbles, round_to_grid, unpack_nibbles)

TORCH8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
ML8 = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}


def ref_encode(x: torch.Tensor, name: str) -> torch.Tensor:
    """Independent encoder: clamp to +-max (saturation), then ml_dtypes' RNE cast."""
    fmt = get_format(name)
    xc = x.clamp(-fmt.max, fmt.max)
    if name in ML8:
        return torch.from_numpy(xc.numpy().astype(ML8[name]).view(np.uint8))
    if name == "fp4_e2m1":
        return torch.from_numpy(xc.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF)
    lim = 2 ** (fmt.bits - 1)
    return torch.from_numpy((np.rint(xc.numpy()).astype(np.int64) % (2 * lim)).astype(np.uint8))


def same_values(a, b):
    return torch.equal(torch.nan_to_num(a, 1e30, 1e31, -1e31), torch.nan_to_num(b, 1e30, 1e31, -1e31))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_decode_all_256_codes(name):
    codes = torch.arange(256, dtype=torch.uint8)
    assert same_values(decode(codes, get_format(name)), codes.view(TORCH8[name]).float())


def test_fp4_decode_all_16_codes():
    codes = np.arange(16, dtype=np.uint8)
    ref = torch.from_numpy(codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    assert torch.equal(decode(torch.from_numpy(codes), FP4_E2M1), ref)
    assert decode(torch.from_numpy(codes), FP4_E2M1).abs().unique().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_int_decode_all_codes(name):
    fmt = get_format(name)
    codes = torch.arange(2**fmt.bits, dtype=torch.uint8)
    expect = [c - 2**fmt.bits if c >= 2 ** (fmt.bits - 1) else c for c in range(2**fmt.bits)]
    assert decode(codes, fmt).tolist() == expect


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_finite_code_round_trips(name):
    fmt = get_format(name)
    table = decode_table(fmt)
    ok = torch.isfinite(table) & (table.abs() <= fmt.max)
    if fmt.kind == "int":
        ok &= table.abs() <= fmt.max
    codes = torch.arange(2**fmt.bits, dtype=torch.uint8)[ok]
    assert torch.equal(encode(table[ok], fmt), codes)


def grid_points(name):
    fmt = get_format(name)
    t = decode_table(fmt)
    vals = torch.unique(t[torch.isfinite(t) & (t.abs() <= fmt.max)])
    mids = (vals[1:] + vals[:-1]) / 2  # exact ties between neighbours
    nudge = torch.cat([mids * (1 + 2**-20), mids * (1 - 2**-20)])
    return torch.cat([vals, mids, nudge, torch.tensor([fmt.max * 1.01, -fmt.max * 3, 1e30, -1e30])])


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_ties_neighbours_and_saturation_match_reference(name):
    x = grid_points(name)
    assert torch.equal(encode(x, get_format(name)), ref_encode(x, name))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_random_values_match_reference(name):
    g = torch.Generator().manual_seed(1)
    fmt = get_format(name)
    x = torch.randn(200_000, generator=g) * fmt.max * torch.logspace(-8, 0.3, 200_000)
    assert torch.equal(encode(x, fmt), ref_encode(x, name))


def test_fp8_subnormals_exhaustive_against_reference():
    # every multiple of 2^-12 below the smallest normal, including all subnormal ties
    x = torch.arange(-(2**7), 2**7 + 1, dtype=torch.float32) * 2.0**-12
    assert torch.equal(encode(x, FP8_E4M3), ref_encode(x, "fp8_e4m3"))
    x = torch.arange(-(2**6), 2**6 + 1, dtype=torch.float32) * 2.0**-18
    assert torch.equal(encode(x, FP8_E5M2), ref_encode(x, "fp8_e5m2"))


def test_infinities_saturate_and_nan_is_an_error():
    x = torch.tensor([float("inf"), float("-inf")])
    assert round_to_grid(x, FP8_E4M3).tolist() == [448.0, -448.0]
    assert round_to_grid(x, INT4).tolist() == [7.0, -7.0]
    with pytest.raises(ValueError, match="NaN"):
        encode(torch.tensor([1.0, float("nan")]), FP4_E2M1)


def test_int_grids_are_symmetric():
    x = torch.tensor([-200.0, -127.5, -0.5, 0.5, 1.5, 2.5, 127.4, 300.0])
    assert round_to_grid(x, INT8).tolist() == [-127, -127, -0, 0, 2, 2, 127, 127]
    assert round_to_grid(torch.tensor([-9.0, -7.5, 7.5, 9.0]), INT4).tolist() == [-7, -7, 7, 7]


def test_pack_nibbles_matches_onnx_float4_and_int4_layout():
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)
    packed = pack_nibbles(codes)
    assert packed[0] == (0 | 1 << 4)
    t = helper.make_tensor("w", TensorProto.FLOAT4E2M1, [32], packed.numpy().tobytes(), raw=True)
    onnx_vals = numpy_helper.to_array(t).astype(np.float32)
    assert torch.equal(torch.from_numpy(onnx_vals), decode(codes, FP4_E2M1))
    t = helper.make_tensor("w", TensorProto.INT4, [32], packed.numpy().tobytes(), raw=True)
    assert torch.equal(torch.from_numpy(numpy_helper.to_array(t).astype(np.float32)), decode(codes, INT4))
    assert torch.equal(unpack_nibbles(packed), codes)


def test_pack_nibbles_rejects_odd_length():
    with pytest.raises(ValueError, match="odd"):
        pack_nibbles(torch.zeros(3, dtype=torch.uint8))


def test_decode_rejects_out_of_range_codes():
    with pytest.raises(ValueError):
        decode(torch.tensor([16], dtype=torch.uint8), FP4_E2M1)
    with pytest.raises(TypeError):
        decode(torch.tensor([1]), FP4_E2M1)
