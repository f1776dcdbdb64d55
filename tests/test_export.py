"""ONNX export of every recipe: graph structure, ONNX Runtime reference vs PyTorch, determinism,
the Fp4ToFp8 reference on every (code, shift) pair, and bad input."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fp_export.checkpoint.layout import load_checkpoint
from fp_export.data.corpus import load_text
from fp_export.evaluate.perplexity import eval_windows, tokenize
from fp_export.export.graph import GraphBuilder
from fp_export.export.onnx import check
from fp_export.numerics import fp4_to_fp8 as op
from fp_export.numerics.formats import pack_nibbles
from fp_export.quant.recipe import bundled_recipes
from fp_export.numerics.fp4_to_fp8 import SHIFT_MAX, SHIFT_MIN, fp4_to_fp8
from fp_export.validate.compare import validate_onnx
from fp_export.validate.runners import OnnxFileError, load_onnx_for_ort

from conftest import export_checkpoint


def op_count(proto, op_type, domain=""):
    return sum(1 for n in proto.graph.node if n.op_type == op_type and n.domain == domain)


@pytest.mark.parametrize("recipe", bundled_recipes())
def test_every_recipe_exports_and_validates(quantized, tmp_path, recipe):
    qdir = quantized(recipe)
    model, tok, manifest = load_checkpoint(qdir)
    deploy = export_checkpoint(qdir, tmp_path / "m.onnx")
    ref = export_checkpoint(qdir, tmp_path / "m.ref.onnx", reference=True)
    for p in (deploy, ref):
        check(p)
        assert (p.parent / f"{p.name}.data").is_file()
    g = onnx.load(str(deploy), load_external_data=False)
    layers = manifest["layers"].values()
    n_act = sum(1 for s in layers if s["act_format"])
    n_shift = sum(1 for s in layers if s["weight_format"] == "fp4_e2m1" and s["scale_constraint"] != "none")
    assert op_count(g, "QuantizeLinear") == n_act  # one Q/DQ pair per quantized activation
    assert op_count(g, op.OP_TYPE, op.DOMAIN) == n_shift
    for node in (n for n in g.graph.node if n.op_type == op.OP_TYPE):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"fp_export" and attrs["plugin_version"] == b"1"
        assert attrs["group_size"] == 256
    fp8_zps = [i for i in g.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN and not i.dims]
    if any(s["act_format"] == "fp8_e4m3" for s in layers):
        assert fp8_zps, "FP8 activations use float8e4m3fn zero points"
    r = onnx.load(str(ref), load_external_data=False)
    assert op_count(r, op.OP_TYPE, op.DOMAIN) == 0
    ids = eval_windows(tokenize(tok, load_text("test")), 512, 4)
    ref_proto = load_onnx_for_ort(ref)
    report = validate_onnx(model, ref_proto, ids, "float32")
    assert report["passed"], report
    # float64: the same function to float64 rounding, every top-1 token the same
    report = validate_onnx(model, ref_proto, ids[:2], "float64")
    assert report["passed"] and report["top1_agreement"] == 1.0, report
    assert report["max_rel_logit_error"] < 1e-6 and report["perplexity_rel_diff"] < 1e-9, report
    # the deployable file validates too: its custom nodes are swapped for the reference in memory
    assert len(load_onnx_for_ort(deploy).graph.node) == len(r.graph.node)


def test_export_is_byte_identical(quantized, tmp_path):
    qdir = quantized("w4a8-fp4-m2-lorc")
    a = export_checkpoint(qdir, tmp_path / "a" / "m.onnx")
    b = export_checkpoint(qdir, tmp_path / "b" / "m.onnx")
    assert a.read_bytes() == b.read_bytes()
    assert (a.parent / "m.onnx.data").read_bytes() == (b.parent / "m.onnx.data").read_bytes()


def test_fp4_to_fp8_reference_graph_on_every_code_and_shift():
    shifts = torch.arange(SHIFT_MIN, SHIFT_MAX + 1, dtype=torch.int8)
    codes = torch.arange(16, dtype=torch.uint8).repeat(len(shifts), 2)  # [12, 32], group 32: one shift a row
    packed, shift = pack_nibbles(codes), shifts[:, None]
    g = GraphBuilder()
    p = g.init("packed", packed)
    s = g.init("shift", shift)
    out = op.onnx_reference(g, p, s, 12, 32, 32, "ref")
    bits = g.op("Cast", [g.op("DequantizeLinear", [out, g.const(1.0)], "dq")], "f", to=TensorProto.FLOAT)
    model = helper.make_model(helper.make_graph(g.nodes, "t", [], [helper.make_tensor_value_info(bits, 1, [12, 32])],
                                                initializer=g.initializers),
                              opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    onnx.checker.check_model(model)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    want = fp4_to_fp8(packed, shift, 32).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(got, want)


def test_bad_onnx_files(tmp_path):
    with pytest.raises(OnnxFileError, match="no such"):
        load_onnx_for_ort(tmp_path / "missing.onnx")
    trunc = tmp_path / "t.onnx"
    trunc.write_bytes(b"\x08\x07\x12\x05hello-not-a-model")
    with pytest.raises(OnnxFileError, match="not a readable ONNX model"):
        load_onnx_for_ort(trunc)
    foreign = tmp_path / "f.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])), foreign)
    with pytest.raises(OnnxFileError, match="not an fp-export graph"):
        load_onnx_for_ort(foreign)


def test_tampered_checkpoint_is_not_exported(quantized, tmp_path):
    import shutil

    from fp_export.checkpoint.layout import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(quantized("w8a8-fp8"), bad)
    (bad / "config.json").write_text((bad / "config.json").read_text().replace("512", "513", 1))
    with pytest.raises(CheckpointError, match="config.json"):
        export_checkpoint(bad, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.onnx.data").exists()
