"""``GpuQuantLinear``: a ``QuantLinear`` as the H100 runs it.

FP4 weights under M1/M2 stay packed (0.5 byte per weight) with int8 shifts; each forward either
runs the fused Triton W4A8 GEMM on the kernel's split layout (``mode="fused"``), or the CUDA
shift-cast kernel into an FP8 weight followed by ``torch._scaled_mm`` (``mode="cast"``), or picks
per call by the number of tokens (``mode="auto"``, which keeps both layouts: 1 byte per weight). FP8 weights per channel go straight to
``_scaled_mm``. Activations are quantized token-wise (or with the static scale) to FP8 E4M3; the
token scale and the per-channel weight scale are applied in the GEMM epilogue. Other weight grids
(INT4/INT8, unconstrained FP4, grouped FP8) run as dequantized bf16 weights. On CPU tensors every
path computes the same math in float32 with the reference cast, so it is testable without a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp_export.hf.families import set_module
from fp_export.numerics.formats import FP8_E4M3, decode, round_to_grid
from fp_export.numerics.scales import token_scales
from fp_export.quant.activations import ActivationQuantizer
from fp_export.quant.qlinear import QuantLinear
from fp_export.runtime.kernels import fp4_to_fp8
from fp_export.runtime.layout import repack_split, unsplit

MODES = ("fused", "cast", "auto")
AUTO_FUSED_MAX_M = 64  # "auto": the fused kernel up to this many tokens, cast + _scaled_mm beyond


def quantize_tokens(x: torch.Tensor, static_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 E4M3 operand [M, K], scale float32 [M]): token-wise, or the static scale."""
    if x.is_cuda and static_scale is None:
        from fp_export.runtime.triton_w4a8 import quantize_rows_fp8

        return quantize_rows_fp8(x.contiguous())
    xf = x.float()
    s = token_scales(xf, FP8_E4M3)[:, 0] if static_scale is None else static_scale.float().expand(x.shape[0])
    q = round_to_grid(xf / s[:, None], FP8_E4M3)
    return (q.to(torch.float8_e4m3fn) if x.is_cuda else q), s.contiguous()


class GpuQuantLinear(nn.Module):
    """Build with ``from_quant_linear`` (a checkpoint's layer) or ``from_packed`` (raw W4A8 data)."""

    def __init__(self, in_features: int, out_features: int, mode: str = "fused",
                 act: ActivationQuantizer | None = None, static_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, lorc_u: torch.Tensor | None = None,
                 lorc_v: torch.Tensor | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose one of {MODES}")
        self.mode = mode
        self.in_features, self.out_features = in_features, out_features
        self.act = act
        self.kind = "dense"
        self.group_size = None
        self.register_buffer("static_scale", static_scale)
        self.register_buffer("bias", bias)
        self.register_buffer("lorc_u", lorc_u)
        self.register_buffer("lorc_v", lorc_v)

    @classmethod
    def from_quant_linear(cls, ql: QuantLinear, mode: str = "fused") -> "GpuQuantLinear":
        act, qw = ql.act, ql.qweight
        static = ql.input_scale if act is not None and act.granularity == "tensor" else None
        self = cls(ql.in_features, ql.out_features, mode, act, static, ql.bias, ql.lorc_u, ql.lorc_v)
        fp8_act = act is not None and act.format == "fp8_e4m3"
        sc = qw.to_shift_cast() if fp8_act and qw is not None else None
        if sc is not None:
            self._set_fp4(sc.packed, sc.shift, sc.dq_scale, sc.group_size)
        elif fp8_act and qw is not None and qw.fmt.name == "fp8_e4m3" and qw.scale.shape[1] == 1:
            self.kind = "fp8"
            self.register_buffer("w_fp8_bits", qw.codes)
            self.register_buffer("w_scale", qw.scale[:, 0].contiguous())
        else:
            self.source = ql  # other grids: the reference layer, run as is
        return self

    @classmethod
    def from_packed(cls, packed: torch.Tensor, shift: torch.Tensor, w_scale: torch.Tensor,
                    mode: str = "fused") -> "GpuQuantLinear":
        """A W4A8 layer straight from shift-cast parameters (packed uint8 [N, K/2], shift int8
        [N, K/G], w_scale float32 [N]); FP8 token-wise activations, no bias or LoRC."""
        self = cls(packed.shape[1] * 2, packed.shape[0], mode, ActivationQuantizer("fp8_e4m3"))
        self._set_fp4(packed, shift, w_scale, self.in_features // shift.shape[1])
        return self

    def _set_fp4(self, packed: torch.Tensor, shift: torch.Tensor, w_scale: torch.Tensor, group_size: int) -> None:
        self.kind = "fp4_shift"
        self.group_size = group_size
        self.register_buffer("packed", packed if self.mode != "fused" else None)
        self.register_buffer("split", repack_split(packed) if self.mode != "cast" else None)
        self.register_buffer("shift", shift)
        self.register_buffer("w_scale", w_scale)

    def fp8_weight(self) -> torch.Tensor:
        """E4M3 weight [N, K] (uint8 bits on CPU, float8_e4m3fn on CUDA)."""
        if self.kind == "fp4_shift":
            packed = self.packed if self.packed is not None else unsplit(self.split)
            bits = fp4_to_fp8(packed, self.shift, self.group_size)
        else:
            bits = self.w_fp8_bits
        return bits.view(torch.float8_e4m3fn) if bits.is_cuda else bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        if self.kind == "dense":
            y = self.source.to(x.device)(x2.float())
            return y.to(dtype).reshape(*shape[:-1], self.out_features)
        xq, s = quantize_tokens(x2, self.static_scale)
        if not x.is_cuda:
            w = decode(self.fp8_weight(), FP8_E4M3)
            y = (xq @ w.T) * s[:, None] * self.w_scale[None, :]
        elif self.kind == "fp4_shift" and (self.mode == "fused" or
                                            (self.mode == "auto" and x2.shape[0] <= AUTO_FUSED_MAX_M)):
            from fp_export.runtime.triton_w4a8 import w4a8_matmul

            y = w4a8_matmul(xq, s, self.split, self.shift, self.w_scale, self.group_size).float()
        else:
            y = torch._scaled_mm(xq, self.fp8_weight().t(), scale_a=s[:, None], scale_b=self.w_scale[None, :],
                                 out_dtype=torch.bfloat16).float()
        if self.lorc_u is not None:
            xu = xq.float()
            y = y + F.linear(F.linear(xu, self.lorc_v), self.lorc_u) * s[:, None]
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*shape[:-1], self.out_features)


def to_gpu_runtime(model: nn.Module, mode: str = "fused", device: str = "cuda") -> nn.Module:
    """Replace every ``QuantLinear`` of ``model`` by a ``GpuQuantLinear``; move the model to
    ``device`` (bf16 elsewhere on CUDA)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            set_module(model, name, GpuQuantLinear.from_quant_linear(m, mode))
    if device != "cpu":
        for m in model.modules():
            if not isinstance(m, GpuQuantLinear):
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(torch.bfloat16)
    return model.to(device)
