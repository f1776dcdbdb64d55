"""Float64 validation: the graph rewrite (every node kept, Q/DQ still in float32, float64 around
them) and the PyTorch context (float64 inside, the model exactly restored after)."""

import onnx
import torch
from onnx import TensorProto

from fp_export.checkpoint.layout import load_checkpoint
from fp_export.validate.float64_graph import to_float64
from fp_export.export.onnx import build_model
from fp_export.validate.float64_model import float64_model


def test_graph_rewrite_keeps_every_node_and_rounds_in_float32(quantized):
    model, _, _ = load_checkpoint(quantized("w8a8-fp8-static"))
    ref = build_model(model, reference=True)
    f64 = to_float64(ref)
    onnx.checker.check_model(f64)
    inferred = onnx.shape_inference.infer_shapes(f64, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({t.name: t.data_type for t in f64.graph.initializer})
    producer = {o: n for n in f64.graph.node for o in n.output}
    assert {n.name for n in ref.graph.node} <= {n.name for n in f64.graph.node}
    assert f64.graph.output[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    qs = [n for n in f64.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 28  # 7 linears x 4 layers, each quantizer fed a float32 cast of its float64 input
    for q in qs:
        assert producer[q.input[0]].op_type == "Cast" and types[q.input[0]] == TensorProto.FLOAT
        assert types[q.input[1]] == TensorProto.FLOAT
    for name in ("rope_cos", "model.layers.0.input_layernorm", "model.layers.0.self_attn.q_proj.matmul",
                 "model.layers.0.self_attn.q_proj.input_dq", "model.layers.3.probs", "model.norm"):
        assert types[name] == TensorProto.DOUBLE, name
    assert types["model.layers.0.self_attn.q_proj.input_dq.f32"] == TensorProto.FLOAT


def test_float64_model_runs_in_float64_and_restores_everything(quantized):
    model, _, _ = load_checkpoint(quantized("w4a8-fp4-m2-lorc"))
    ids = torch.arange(64)[None] % 4096
    attention = model.config._attn_implementation
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        with float64_model(model) as m64:
            inside = m64(ids, use_cache=False).logits
        after = model(ids, use_cache=False).logits
    assert inside.dtype == torch.float64 and before.dtype == torch.float32
    assert torch.equal(before, after)
    assert (inside - before.double()).abs().max() < 0.5  # float32 vs float64 arithmetic: near, not equal
    assert all(t.dtype == torch.float32 for t in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert model.config._attn_implementation == attention
