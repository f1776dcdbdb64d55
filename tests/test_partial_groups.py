"""Groups that do not divide ``in_features`` end in a partial last group, through GPTQ, LoRC, the
checkpoint, the ONNX graph (blocked DequantizeLinear and Fp4ToFp8 with a ragged last group) and
its ONNX Runtime reference, on a random LLaMA whose sizes are not multiples of 256."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from transformers import LlamaConfig, LlamaForCausalLM

import fp_export as fx
from fp_export.export.graph import GraphBuilder
from fp_export.numerics import fp4_to_fp8 as op
from fp_export.numerics.formats import pack_nibbles
from fp_export.validate.compare import validate_onnx
from fp_export.validate.runners import load_onnx_for_ort

from conftest import fast_recipe
from test_families import save_random

CONFIG = LlamaConfig(vocab_size=4096, hidden_size=320, intermediate_size=704, num_hidden_layers=2,
                     num_attention_heads=5, num_key_value_heads=5, max_position_embeddings=256)


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    return save_random(LlamaForCausalLM, CONFIG, tmp_path_factory.mktemp("odd") / "llama-320")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["w4a8-fp4-m2-lorc", "w4a8-fp4-m1", "w4a8-fp4", "w4a8-int4"])
def test_partial_groups_quantize_export_and_validate(odd_model, tmp_path, recipe):
    qm = fx.quantize(odd_model, fast_recipe(recipe), out=tmp_path / "q", evaluate=False)
    spec = qm.manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert spec["in_features"] == 704 and spec["group_size"] == 256
    lin = qm.model.model.layers[0].mlp.down_proj
    assert lin.qweight.scale.shape == (320, 3)  # 256 + 256 + 192
    assert qm.model.model.layers[0].self_attn.q_proj.qweight.scale.shape == (320, 2)  # 256 + 64
    path = fx.export_onnx(qm, tmp_path / "q.onnx")
    ids = torch.randint(0, 4096, (1, 64), generator=torch.Generator().manual_seed(0))
    report = validate_onnx(qm.model, load_onnx_for_ort(path), ids, "float64")
    assert report["top1_agreement"] == 1.0 and report["max_rel_logit_error"] < 1e-6, report
    again = fx.load(tmp_path / "q")  # the checkpoint round-trips the partial groups bit for bit
    assert torch.equal(again.model.model.layers[0].mlp.down_proj.weight, lin.weight)


def test_fp4_to_fp8_reference_graph_with_a_ragged_last_group():
    rows, cols, group = 12, 40, 16  # groups of 16, 16, 8
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.uint8)
    shift = torch.randint(op.SHIFT_MIN, op.SHIFT_MAX + 1, (rows, 3), generator=gen, dtype=torch.int8)
    g = GraphBuilder()
    out = op.onnx_reference(g, "packed", "shift", rows, cols, group, "ref")
    graph = helper.make_graph(
        g.nodes, "t", [helper.make_tensor_value_info("packed", TensorProto.UINT8, [rows, cols // 2]),
                       helper.make_tensor_value_info("shift", TensorProto.INT8, [rows, 3])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT8E4M3FN, [rows, cols])], initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    packed = pack_nibbles(codes)
    got = sess.run(None, {"packed": packed.numpy(), "shift": shift.numpy()})[0]
    want = op.fp4_to_fp8(packed, shift, group)
    assert np.array_equal(np.asarray(got).view(np.uint8), want.numpy())
    with pytest.raises(ValueError, match="need 3 groups of 16, got 2"):
        op.fp4_to_fp8(packed, shift[:, :2], group)
