"""ONNX export of a quantized checkpoint: the whole causal LM, ``input_ids`` [batch, seq] -> ``logits``.

Opset 23. Per quantized linear (see README "ONNX graph"):
- activations: FP8 (or INT8) QuantizeLinear / DequantizeLinear. Per-tensor static: the calibrated
  scale as an initializer. Token-wise dynamic: s = max(|x|, axis=-1) / max_q computed in the graph,
  Q/DQ of x / s with unit scale, and s multiplied into the GEMM output (the epilogue);
- FP4 weights under M1/M2: packed uint8 codes and int8 shifts feed one ``fp_export::Fp4ToFp8``
  node (attributes group_size, plugin_namespace, plugin_version) whose FP8 E4M3 output goes through
  a per-channel DequantizeLinear into the MatMul: an FP8 GEMM for TensorRT;
- other weights: their integer / FP8 / FP4 initializers and a per-channel or blocked
  DequantizeLinear (FP4 ones only as opset-23 FLOAT4E2M1: no shift cast without M1/M2);
- LoRC: two small MatMuls on the dequantized activation, added before the epilogue scale.
``reference=True`` passes the graph through ``reference.to_reference``, which replaces every node
ONNX Runtime cannot run by standard ops of identical semantics. The family registry
(``hf.families.export_dims``) says which models export.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from fp_export.export.graph import GraphBuilder
from fp_export.export.reference import to_reference
from fp_export.hf.families import export_dims
from fp_export.numerics import fp4_to_fp8 as op
from fp_export.numerics.formats import pack_nibbles
from fp_export.numerics.scales import token_scales_onnx
from fp_export.quant.qlinear import QuantLinear

OPSET = 23
IR_VERSION = 11
RAW_TYPES = {"fp8_e4m3": TensorProto.FLOAT8E4M3FN, "int4": TensorProto.INT4, "fp4_e2m1": TensorProto.FLOAT4E2M1}


class _Builder:
    def __init__(self, g: GraphBuilder):
        self.g = g

    def dq(self, x: str, scale: torch.Tensor, group_size: int | None, name: str) -> str:
        """DequantizeLinear of a weight-like [rows, in]: per-axis (axis 0) for one group per row,
        else blocked along axis 1 (``block_size`` = group size; ONNX blocks may end partial)."""
        g = self.g
        if group_size is None or scale.dim() == 1 or scale.shape[1] == 1:
            return g.op("DequantizeLinear", [x, g.init(f"{name}.dq_scale", scale.reshape(-1).float())], name, axis=0)
        return g.op("DequantizeLinear", [x, g.init(f"{name}.dq_scale", scale.float())], name,
                    axis=1, block_size=group_size)

    def shift_cast(self, packed: str, shift: str, rows: int, cols: int, group: int, name: str) -> str:
        """FP8 E4M3 [rows, cols] from packed FP4 codes and per-group shifts: the custom op."""
        g = self.g
        out = g.op(op.OP_TYPE, [packed, shift], f"{name}.fp4_to_fp8", domain=op.DOMAIN,
                   group_size=group, plugin_namespace=op.PLUGIN_NAMESPACE, plugin_version=op.PLUGIN_VERSION)
        g.declare(out, TensorProto.FLOAT8E4M3FN, [rows, cols])
        return out

    def weight_t(self, prefix: str, module: nn.Module) -> str:
        """The layer's weight as float [in, out] for MatMul."""
        g = self.g
        qw = module.qweight if isinstance(module, QuantLinear) else None
        if qw is None:
            return g.init(f"{prefix}.weight_t", module.weight.detach().float().T.contiguous())
        rows, cols = qw.shape
        fmt = qw.fmt
        sc = qw.to_shift_cast()
        if sc is not None:
            packed = g.init(f"{prefix}.qweight", sc.packed)
            shift_name = g.init(f"{prefix}.shift", sc.shift)
            fp8 = self.shift_cast(packed, shift_name, rows, cols, sc.group_size, prefix)
            w = self.dq(fp8, sc.dq_scale, None, f"{prefix}.weight")
        else:
            if fmt.name in RAW_TYPES:
                data = pack_nibbles(qw.codes) if fmt.packed else qw.codes
                x = g.init_raw(f"{prefix}.qweight", RAW_TYPES[fmt.name], [rows, cols], data.numpy().tobytes())
            else:
                x = g.init(f"{prefix}.qweight", qw.codes.view(torch.int8))
            w = self.dq(x, qw.scale, qw.group_size, f"{prefix}.weight")
        return g.op("Transpose", [w], f"{prefix}.weight_t", perm=[1, 0])

    def factor_t(self, prefix: str, which: str, module: QuantLinear) -> str:
        """LoRC factor (u [out, r] or v [r, in]) transposed for MatMul."""
        g = self.g
        lorc = module.lorc
        if lorc.factor_format == "none":
            return g.init(f"{prefix}.lorc_{which}_t", getattr(lorc, which).T.contiguous())
        codes, scale = getattr(lorc, f"{which}_codes"), getattr(lorc, f"{which}_scale")
        if lorc.factor_format == "fp8_e4m3":
            x = g.init_raw(f"{prefix}.lorc_{which}", TensorProto.FLOAT8E4M3FN, list(codes.shape),
                           codes.numpy().tobytes())
        else:
            x = g.init(f"{prefix}.lorc_{which}", codes.view(torch.int8))
        f = self.dq(x, scale, None, f"{prefix}.lorc_{which}")
        return g.op("Transpose", [f], f"{prefix}.lorc_{which}_t", perm=[1, 0])

    def quant_input(self, x: str, module: nn.Module, prefix: str) -> tuple[str, str | None]:
        """(dequantized activation, per-token scale to apply after the GEMM or None)."""
        act = module.act if isinstance(module, QuantLinear) else None
        if act is None:
            return x, None
        g = self.g
        fmt = act.fmt
        zp = g.fp8_zero() if fmt.kind == "fp" else g.int8_zero()
        if act.granularity == "tensor":
            s = g.init(f"{prefix}.input_scale", module.input_scale.reshape(()).float())
            q = g.op("QuantizeLinear", [x, s, zp], f"{prefix}.input_q")
            return g.op("DequantizeLinear", [q, s, zp], f"{prefix}.input_dq"), None
        s = token_scales_onnx(g, x, fmt, f"{prefix}.input_scale")
        xs = g.op("Div", [x, s], f"{prefix}.input_scaled")
        one = g.const(1.0)
        q = g.op("QuantizeLinear", [xs, one, zp], f"{prefix}.input_q")
        return g.op("DequantizeLinear", [q, one, zp], f"{prefix}.input_dq"), s

    def linear(self, x: str, prefix: str, module: nn.Module) -> str:
        g = self.g
        xd, post = self.quant_input(x, module, prefix)
        y = g.op("MatMul", [xd, self.weight_t(prefix, module)], f"{prefix}.matmul")
        if isinstance(module, QuantLinear) and module.lorc is not None:
            low = g.op("MatMul", [xd, self.factor_t(prefix, "v", module)], f"{prefix}.lorc_down")
            y = g.op("Add", [y, g.op("MatMul", [low, self.factor_t(prefix, "u", module)], f"{prefix}.lorc_up")],
                     f"{prefix}.lorc_add")
        if post is not None:
            y = g.op("Mul", [y, post], f"{prefix}.epilogue_scale")
        if module.bias is not None:
            y = g.op("Add", [y, g.init(f"{prefix}.bias", module.bias.detach().float())], f"{prefix}.bias_add")
        return y

    def rms_norm(self, x: str, weight: torch.Tensor, eps: float, name: str) -> str:
        g = self.g
        var = g.op("ReduceMean", [g.op("Mul", [x, x], f"{name}.sq"), g.const([-1], np.int64)],
                   f"{name}.var", keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(eps)], f"{name}.eps")], f"{name}.std")],
                   f"{name}.inv")
        normed = g.op("Mul", [x, inv], f"{name}.normed")
        return g.op("Mul", [g.init(f"{name}.weight", weight.detach().float()), normed], name)


def build_llama_graph(model: nn.Module) -> onnx.GraphProto:
    """The deployable graph of a LLaMA-family model whose linears may be ``QuantLinear``."""
    dims = export_dims(model)
    g = GraphBuilder()
    b = _Builder(g)
    core = model.model
    ids = "input_ids"
    seq = g.op("Gather", [g.op("Shape", [ids], "seq_shape"), g.const(1, np.int64)], "seq_len", axis=0)
    pos = g.op("Range", [g.const(0, np.int64), seq, g.const(1, np.int64)], "positions")
    mask = g.op("Where", [
        g.op("Greater", [g.op("Unsqueeze", [pos, g.const([0], np.int64)], "pos_row"),
                         g.op("Unsqueeze", [pos, g.const([1], np.int64)], "pos_col")], "future"),
        g.const(np.finfo(np.float32).min), g.const(0.0)], "causal_mask")
    rot = core.rotary_emb
    freqs = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", [pos], "pos_f", to=TensorProto.FLOAT),
                                            g.const([1], np.int64)], "pos_f2"),
                         g.init("rotary.inv_freq", rot.inv_freq.float()[None, :])], "rope_freqs")
    emb = g.op("Concat", [freqs, freqs], "rope_emb", axis=1)
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    cos, sin = g.op("Cos", [emb], "rope_cos"), g.op("Sin", [emb], "rope_sin")
    if scaling != 1.0:
        cos = g.op("Mul", [cos, g.const(scaling)], "rope_cos_scaled")
        sin = g.op("Mul", [sin, g.const(scaling)], "rope_sin_scaled")
    half = g.const([dims.head_dim // 2, dims.head_dim // 2], np.int64)

    def rope(x: str, name: str) -> str:
        x1, x2 = g.op("Split", [x, half], f"{name}.split", n_out=2, axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [x2], f"{name}.neg"), x1], f"{name}.rot", axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos], f"{name}.cos"), g.op("Mul", [rotated, sin], f"{name}.sin")], name)

    embed = g.init("model.embed_tokens.weight", core.embed_tokens.weight.detach().float())
    h = g.op("Gather", [embed, ids], "embed", axis=0)
    rep = dims.heads // dims.kv_heads
    for i, layer in enumerate(core.layers):
        p = f"model.layers.{i}"
        att = layer.self_attn
        x = b.rms_norm(h, layer.input_layernorm.weight, dims.eps, f"{p}.input_layernorm")

        def heads(t: str, n: int, name: str) -> str:
            r = g.op("Reshape", [t, g.const([0, 0, n, dims.head_dim], np.int64)], f"{name}.heads")
            return g.op("Transpose", [r], f"{name}.bhsd", perm=[0, 2, 1, 3])

        q = rope(heads(b.linear(x, f"{p}.self_attn.q_proj", att.q_proj), dims.heads, f"{p}.q"), f"{p}.q_rope")
        k = rope(heads(b.linear(x, f"{p}.self_attn.k_proj", att.k_proj), dims.kv_heads, f"{p}.k"), f"{p}.k_rope")
        v = heads(b.linear(x, f"{p}.self_attn.v_proj", att.v_proj), dims.kv_heads, f"{p}.v")
        q5 = g.op("Reshape", [q, g.const([0, dims.kv_heads, rep, -1, dims.head_dim], np.int64)], f"{p}.q_groups")
        unsq = g.const([2], np.int64)
        k5 = g.op("Transpose", [g.op("Unsqueeze", [k, unsq], f"{p}.k5")], f"{p}.k_t", perm=[0, 1, 2, 4, 3])
        v5 = g.op("Unsqueeze", [v, unsq], f"{p}.v5")
        scores = g.op("Mul", [g.op("MatMul", [q5, k5], f"{p}.qk"), g.const(dims.head_dim ** -0.5)], f"{p}.scores")
        probs = g.op("Softmax", [g.op("Add", [scores, mask], f"{p}.masked")], f"{p}.probs", axis=-1)
        ctx = g.op("MatMul", [probs, v5], f"{p}.ctx")
        ctx = g.op("Reshape", [ctx, g.const([0, dims.heads, -1, dims.head_dim], np.int64)], f"{p}.ctx_heads")
        ctx = g.op("Transpose", [ctx], f"{p}.ctx_bshd", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([0, 0, dims.heads * dims.head_dim], np.int64)], f"{p}.ctx_flat")
        h = g.op("Add", [h, b.linear(ctx, f"{p}.self_attn.o_proj", att.o_proj)], f"{p}.attn_residual")
        x = b.rms_norm(h, layer.post_attention_layernorm.weight, dims.eps, f"{p}.post_attention_layernorm")
        mlp = layer.mlp
        gate = b.linear(x, f"{p}.mlp.gate_proj", mlp.gate_proj)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}.mlp.sigmoid")], f"{p}.mlp.silu")
        up = b.linear(x, f"{p}.mlp.up_proj", mlp.up_proj)
        down = b.linear(g.op("Mul", [act, up], f"{p}.mlp.gated"), f"{p}.mlp.down_proj", mlp.down_proj)
        h = g.op("Add", [h, down], f"{p}.mlp_residual")
    h = b.rms_norm(h, core.norm.weight, dims.eps, "model.norm")
    head = model.lm_head
    if head.weight.data_ptr() == core.embed_tokens.weight.data_ptr():
        w_t = g.op("Transpose", [embed], "lm_head.weight_t", perm=[1, 0])
    else:
        w_t = g.init("lm_head.weight_t", head.weight.detach().float().T.contiguous())
    g.op("MatMul", [h, w_t], "logits")
    return helper.make_graph(
        g.nodes, "fp_export_causal_lm",
        [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", dims.vocab])],
        initializer=g.initializers, value_info=g.value_info,
    )


def build_model(model: nn.Module, reference: bool = False, metadata: dict | None = None) -> onnx.ModelProto:
    """The deployable model proto, or (``reference``) its ONNX Runtime reference
    (``fp_export.export.reference.to_reference``)."""
    graph = build_llama_graph(model)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(op.DOMAIN, op.DOMAIN_VERSION)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="fp-export", producer_version="0.1.0")
    proto.ir_version = IR_VERSION
    for k, v in sorted((metadata or {}).items()):
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    if reference:
        proto = to_reference(proto)
    return proto


def save_atomic(proto: onnx.ModelProto, out: Path) -> Path:
    """Write ``out`` and its external data ``out.data`` through a temporary directory, then move
    both into place (data first), so no reader sees a half-written pair."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        onnx.save_model(proto, tmp / out.name, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{out.name}.data", size_threshold=1024)
        os.replace(tmp / f"{out.name}.data", out.parent / f"{out.name}.data")
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check(path: Path) -> None:
    """onnx.checker (with the external data) and strict shape inference."""
    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes_path(str(path), str(path) + ".inferred", strict_mode=True)
    os.remove(str(path) + ".inferred")


def export_model(model: nn.Module, out: Path | None = None, reference: bool = False,
                 metadata: dict | None = None) -> onnx.ModelProto | Path:
    """The model's graph (``build_model``); with ``out``, written atomically (weights in
    ``out.data``), checked (``check``) and its path returned instead of the proto."""
    with torch.no_grad():
        proto = build_model(model, reference, metadata)
    if out is None:
        return proto
    path = save_atomic(proto, out)
    check(path)
    return path

