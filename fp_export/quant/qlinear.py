"""``QuantLinear``: the quantized replacement of an ``nn.Linear`` (reference forward, any device).

Forward, in float32, as deployed (the exported graph and GPU runtime compute the same):
- static per-tensor activations: x_q = round_to_grid(x / s) * s, y = x_q W^T (+ (x_q v^T) u^T) + b;
- token-wise dynamic: s per token, x_u = round_to_grid(x / s) on the unit grid,
  y = (x_u W^T (+ (x_u v^T) u^T)) * s + b, i.e. the token scale applied in the GEMM epilogue
(``quant.activations``); W is the dequantized weight (``quant.weights``), u and v the dequantized
LoRC factors. Output in the input's dtype; float64 inputs are computed in float64 (float64
validation), the quantizers still rounding in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fp_export.quant.activations import ActivationQuantizer
from fp_export.quant.lorc import LoRCFactors
from fp_export.quant.weights import QuantizedWeight


@dataclass(frozen=True)
class LayerSpec:
    """What a checkpoint records of one quantized linear (``fp_export.json`` ``layers`` entry)."""

    in_features: int
    out_features: int
    bias: bool
    weight_format: str | None
    group_size: int | None
    scale_constraint: str
    act_format: str | None
    act_granularity: str | None
    lorc_rank: int
    lorc_format: str | None

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        return cls(**d)


class QuantLinear(nn.Module):
    def __init__(
        self,
        weight: QuantizedWeight | torch.Tensor,
        bias: torch.Tensor | None,
        act: ActivationQuantizer | None = None,
        input_scale: torch.Tensor | None = None,
        lorc: LoRCFactors | None = None,
    ):
        super().__init__()
        self.qweight = weight if isinstance(weight, QuantizedWeight) else None
        w = weight.dequantize() if self.qweight is not None else weight.detach().float()
        self.out_features, self.in_features = w.shape
        self.act = act
        if act is not None and act.granularity == "tensor" and input_scale is None:
            raise ValueError("static (per-tensor) activation quantization needs input_scale")
        self.lorc = lorc
        # contiguous: a strided operand can take another BLAS path and round differently, and the
        # forward must be the same whether the layer was just quantized or loaded from a checkpoint
        self.register_buffer("weight", w.contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)
        self.register_buffer("input_scale", input_scale, persistent=False)
        self.register_buffer("lorc_u", None if lorc is None else lorc.u.contiguous(), persistent=False)
        self.register_buffer("lorc_v", None if lorc is None else lorc.v.contiguous(), persistent=False)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [..., in] float32 or float64 -> (GEMM operand in x's dtype, per-token scale [..., 1]
        for the epilogue or None)."""
        return (x, None) if self.act is None else self.act(x, self.input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        xq, post = self.quantize_input(x.to(compute))
        y = F.linear(xq, self.weight.to(compute))
        if self.lorc_u is not None:
            y = y + F.linear(F.linear(xq, self.lorc_v.to(compute)), self.lorc_u.to(compute))
        if post is not None:
            y = y * post
        if self.bias is not None:
            y = y + self.bias.to(compute)
        return y.to(dtype)

    def spec(self) -> LayerSpec:
        qw, act, lorc = self.qweight, self.act, self.lorc
        return LayerSpec(
            in_features=self.in_features,
            out_features=self.out_features,
            bias=self.bias is not None,
            weight_format=None if qw is None else qw.fmt.name,
            group_size=None if qw is None else qw.group_size,
            scale_constraint="none" if qw is None else qw.constraint,
            act_format=None if act is None else act.format,
            act_granularity=None if act is None else act.granularity,
            lorc_rank=0 if lorc is None else lorc.u.shape[1],
            lorc_format=None if lorc is None else lorc.factor_format,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors by suffix (``qweight``, ``scale``, ``bias`` ...); see README."""
        out = self.qweight.tensors() if self.qweight is not None else {"weight": self.weight}
        if self.bias is not None:
            out["bias"] = self.bias
        if self.input_scale is not None:
            out["input_scale"] = self.input_scale
        if self.lorc is not None:
            out.update(self.lorc.tensors())
        return out

    @classmethod
    def from_tensors(cls, spec: LayerSpec, t: dict[str, torch.Tensor]) -> "QuantLinear":
        if spec.weight_format is None:
            weight = t["weight"]
        else:
            weight = QuantizedWeight.from_tensors(
                t, spec.weight_format, spec.group_size, spec.scale_constraint, spec.in_features
            )
        act = None if spec.act_format is None else ActivationQuantizer(spec.act_format, spec.act_granularity)
        lorc = None if spec.lorc_rank == 0 else LoRCFactors.from_tensors(t, spec.lorc_format)
        return cls(weight, t.get("bias"), act, t.get("input_scale"), lorc)
