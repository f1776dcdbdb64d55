"""The ONNX Runtime reference of an exported graph: nodes ORT cannot run, rewritten in standard ops.

- ``fp_export::Fp4ToFp8`` becomes its standard-op lowering, owned by the op
  (``numerics.fp4_to_fp8.onnx_reference``).
- ``DequantizeLinear`` of a FLOAT4E2M1 initializer (opset 23; not implemented by ORT) becomes the
  same unpacking and table lookup, times its per-group (or per-row) scale.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from fp_export.export.graph import GraphBuilder
from fp_export.numerics import fp4_to_fp8 as op


def to_reference(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` that ONNX Runtime's CPU provider runs, with identical semantics."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    taken = set(inits) | {n.name for n in graph.node} | {o for n in graph.node for o in n.output}
    g = GraphBuilder(taken)
    nodes: list[onnx.NodeProto] = []
    dropped: set[str] = set()
    for node in graph.node:
        start = len(g.nodes)
        if node.domain == op.DOMAIN and node.op_type == op.OP_TYPE:
            packed, shift = node.input
            rows, half = inits[packed].dims
            group = helper.get_attribute_value(next(a for a in node.attribute if a.name == "group_size"))
            op.onnx_reference(g, packed, shift, rows, 2 * half, group, node.name, output=node.output[0])
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits \
                and inits[node.input[0]].data_type == TensorProto.FLOAT4E2M1:
            src = inits[node.input[0]]
            rows, cols = src.dims
            packed = g.name(f"{src.name}.u8")
            g.initializers.append(helper.make_tensor(packed, TensorProto.UINT8, [rows, cols // 2],
                                                     src.raw_data, raw=True))
            dropped.add(src.name)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            group = attrs.get("block_size") or cols  # blocked along axis 1, else per row (axis 0)
            op.per_group_onnx(g, op.fp4_values_onnx(g, packed, rows, cols, node.name), node.input[1], rows, cols,
                              group, node.name, output=node.output[0])
        else:
            nodes.append(node)
            continue
        nodes.extend(g.nodes[start:])
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + g.initializers)
    custom = {n.output[0] for n in nodes if n.domain == op.DOMAIN}
    remaining_vi = [v for v in graph.value_info if v.name in custom]
    del graph.value_info[:]
    graph.value_info.extend(remaining_vi)
    if not custom:
        ops = [o for o in out.opset_import if o.domain != op.DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(ops)
    return out
