"""A small deterministic ONNX graph builder: unique names, typed initializers, constants."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    def __init__(self, taken: set[str] | None = None) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set(taken or ())
        self._consts: dict[tuple, str] = {}

    def name(self, base: str) -> str:
        n, i = base, 0
        while n in self._names:
            i += 1
            n = f"{base}_{i}"
        self._names.add(n)
        return n

    def op(self, op_type: str, inputs: list[str], name: str, domain: str = "", n_out: int = 1,
           output: str | None = None, **attrs):
        """Add a node; returns its output name (or list of names when ``n_out`` > 1).
        ``output`` forces the name of a single output (to stand in for a replaced node)."""
        node_name = self.name(name)
        if output is not None:
            outs = [output]
        else:
            outs = [node_name] if n_out == 1 else [f"{node_name}:{i}" for i in range(n_out)]
        self._names.update(outs)
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name: str, array: np.ndarray | torch.Tensor) -> str:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        n = self.name(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), n))
        return n

    def init_raw(self, name: str, data_type: int, dims: list[int], raw: bytes) -> str:
        """An initializer from raw bytes (FLOAT8E4M3FN, INT4, FLOAT4E2M1: packed as ONNX stores them)."""
        n = self.name(name)
        self.initializers.append(helper.make_tensor(n, data_type, dims, raw, raw=True))
        return n

    def const(self, value, dtype=np.float32) -> str:
        """A shared small constant initializer."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def fp8_zero(self) -> str:
        key = ("fp8_zero",)
        if key not in self._consts:
            n = self.name("const_fp8_zero")
            self.initializers.append(helper.make_tensor(n, TensorProto.FLOAT8E4M3FN, [], [0.0]))
            self._consts[key] = n
        return self._consts[key]

    def int8_zero(self) -> str:
        return self.const(0, np.int8)

    def declare(self, name: str, elem_type: int, shape: list) -> None:
        """value_info for an output shape inference cannot derive (custom-domain ops)."""
        self.value_info.append(helper.make_tensor_value_info(name, elem_type, shape))
