"""The ONNX Runtime reference of an exported graph: nodes ORT cannot run, rewritten in standard ops.

- ``fp_export::Fp4ToFp8(packed uint8 [r, c/2], shift int8 [r, c/G])`` becomes: nibble unpacking
  (BitwiseAnd, BitShift; element 2i low nibble), a Gather from the 16-entry FP4 E2M1 value table,
  multiplication of each group by Pow(2, shift), and a Cast to FLOAT8E4M3FN. Every product is an
  E4M3 value (``scales.SHIFT_MIN..SHIFT_MAX``), so the Cast is exact and the output bits equal the
  integer shift of ``fp_export.numerics.fp4_to_fp8``.
- ``DequantizeLinear`` of a FLOAT4E2M1 initializer (opset 23; not implemented by ORT) becomes the
  same unpacking and table lookup, times its per-group (or per-row) scale.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from fp_export.export.graph import GraphBuilder
from fp_export.export.onnx import CUSTOM_DOMAIN, FP4_OP
from fp_export.numerics.formats import FP4_E2M1, decode_table


def fp4_values(g: GraphBuilder, packed: str, rows: int, cols: int, name: str) -> str:
    """Standard-op decode of packed FP4 codes uint8 [rows, cols/2] -> float32 [rows, cols]."""
    lo = g.op("BitwiseAnd", [packed, g.const(0x0F, np.uint8)], f"{name}.lo")
    hi = g.op("BitShift", [packed, g.const(4, np.uint8)], f"{name}.hi", direction="RIGHT")
    ax = g.const([-1], np.int64)
    both = g.op("Concat", [g.op("Unsqueeze", [lo, ax], f"{name}.lo3"),
                           g.op("Unsqueeze", [hi, ax], f"{name}.hi3")], f"{name}.pairs", axis=-1)
    codes = g.op("Reshape", [both, g.const([rows, cols], np.int64)], f"{name}.codes")
    idx = g.op("Cast", [codes], f"{name}.idx", to=TensorProto.INT64)
    return g.op("Gather", [g.const(decode_table(FP4_E2M1).numpy()), idx], f"{name}.values", axis=0)


def per_group(g: GraphBuilder, values: str, factor: str, rows: int, cols: int, groups: int, name: str,
              output: str | None = None) -> str:
    """values [rows, cols] times factor [rows, groups] (or [rows]), each over its group's columns."""
    v3 = g.op("Reshape", [values, g.const([rows, groups, cols // groups], np.int64)], f"{name}.v3")
    f3 = g.op("Reshape", [factor, g.const([rows, groups, 1], np.int64)], f"{name}.f3")
    return g.op("Reshape", [g.op("Mul", [v3, f3], f"{name}.scaled"), g.const([rows, cols], np.int64)],
                f"{name}.dequant", output=output)


def fp4_to_fp8_reference(g: GraphBuilder, packed: str, shift: str, rows: int, cols: int, group: int,
                         name: str, output: str | None = None) -> str:
    pow2 = g.op("Pow", [g.const(2.0), g.op("Cast", [shift], f"{name}.shift_f", to=TensorProto.FLOAT)],
                f"{name}.pow2")
    shifted = per_group(g, fp4_values(g, packed, rows, cols, name), pow2, rows, cols, cols // group,
                        f"{name}.shifted")
    return g.op("Cast", [shifted], f"{name}.fp8", to=TensorProto.FLOAT8E4M3FN, output=output)


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
        if node.domain == CUSTOM_DOMAIN and node.op_type == FP4_OP:
            packed, shift = node.input
            rows, half = inits[packed].dims
            group = helper.get_attribute_value(next(a for a in node.attribute if a.name == "group_size"))
            fp4_to_fp8_reference(g, packed, shift, rows, 2 * half, group, node.name, output=node.output[0])
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits \
                and inits[node.input[0]].data_type == TensorProto.FLOAT4E2M1:
            src = inits[node.input[0]]
            rows, cols = src.dims
            packed = g.name(f"{src.name}.u8")
            g.initializers.append(helper.make_tensor(packed, TensorProto.UINT8, [rows, cols // 2],
                                                     src.raw_data, raw=True))
            dropped.add(src.name)
            scale_dims = inits[node.input[1]].dims
            groups = scale_dims[1] if len(scale_dims) == 2 else 1
            per_group(g, fp4_values(g, packed, rows, cols, node.name), node.input[1], rows, cols, groups,
                      node.name, output=node.output[0])
        else:
            nodes.append(node)
            continue
        nodes.extend(g.nodes[start:])
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + g.initializers)
    custom = {n.output[0] for n in nodes if n.domain == CUSTOM_DOMAIN}
    remaining_vi = [v for v in graph.value_info if v.name in custom]
    del graph.value_info[:]
    graph.value_info.extend(remaining_vi)
    if not custom:
        ops = [o for o in out.opset_import if o.domain != CUSTOM_DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(ops)
    return out
