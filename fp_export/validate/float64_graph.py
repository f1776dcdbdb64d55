"""An exported graph's input-dependent arithmetic promoted from float32 to float64.

Every node of the graph is kept. Nodes that depend on ``input_ids`` compute in float64: their
float32 constant inputs (weights, dequantized weights, norms, eps, masks) are cast to float64,
a ``Cast`` to FLOAT becomes a Cast to DOUBLE, and ``logits`` is float64. Q/DQ operators exist
in float32 only, so an activation QuantizeLinear reads its input cast back to float32 and an
activation DequantizeLinear's output is cast to float64: the quantizers round exactly as in
the float32 graph, from float64 inputs. Constant-only subgraphs (weight decoding, weight
DequantizeLinear) are untouched. ``float64_model.float64_model`` is the PyTorch counterpart.
"""

from __future__ import annotations

from itertools import chain

import onnx
from onnx import TensorProto, helper

from fp_export.export.graph import GraphBuilder


def _elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of ``proto`` (strict shape inference)."""
    graph = onnx.shape_inference.infer_shapes(proto, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in chain(graph.value_info, graph.input, graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def to_float64(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` (a graph ONNX Runtime runs, e.g. ``reference.to_reference``'s) with
    float64 arithmetic downstream of the graph inputs; see the module docstring."""
    types = _elem_types(proto)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    g = GraphBuilder(set(types) | {n.name for n in graph.node})
    dynamic = {i.name for i in graph.input}
    promoted: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if not any(i in dynamic for i in node.input):
            nodes.append(node)
            continue
        dynamic.update(node.output)
        start = len(g.nodes)
        if node.op_type == "QuantizeLinear":
            node.input[0] = g.op("Cast", [node.input[0]], f"{node.name}.input_f32", to=TensorProto.FLOAT)
        elif node.op_type != "DequantizeLinear":
            for j, name in enumerate(node.input):
                if name and name not in dynamic and types.get(name) == TensorProto.FLOAT:
                    if name not in promoted:
                        promoted[name] = g.op("Cast", [name], f"{name}.f64", to=TensorProto.DOUBLE)
                    node.input[j] = promoted[name]
            if node.op_type == "Cast":
                to = next(a for a in node.attribute if a.name == "to")
                to.i = TensorProto.DOUBLE if to.i == TensorProto.FLOAT else to.i
        nodes.extend(g.nodes[start:])
        nodes.append(node)
        if node.op_type == "DequantizeLinear":
            result, node.output[0] = node.output[0], g.name(f"{node.output[0]}.f32")
            nodes.append(helper.make_node("Cast", [node.output[0]], [result], name=g.name(f"{node.name}.f64"),
                                          to=TensorProto.DOUBLE))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    for o in graph.output:
        if o.type.tensor_type.elem_type == TensorProto.FLOAT:
            o.type.tensor_type.elem_type = TensorProto.DOUBLE
    return out
