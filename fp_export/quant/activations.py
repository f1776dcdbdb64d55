"""``ActivationQuantizer``: how a quantized linear rounds its input, as deployed.

- token-wise dynamic: ``s = absmax_scale(max|x| per token)``, the GEMM operand ``x_u = round(x / s)``
  on the unit grid, and ``s`` returned for the epilogue (``y = (x_u W^T) * s``);
- per-tensor static: ``x_q = round(x / s_in) * s_in`` with the calibrated ``s_in``, nothing after.
float64 inputs (float64 validation) keep float64 except that the rounding happens in float32, as
ONNX QuantizeLinear / DequantizeLinear do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fp_export.numerics.formats import Format, fake_quantize, get_format, round_to_grid
from fp_export.numerics.scales import token_scales


@dataclass(frozen=True)
class ActivationQuantizer:
    format: str
    granularity: Literal["token", "tensor"] = "token"

    @property
    def fmt(self) -> Format:
        return get_format(self.format)

    def __call__(self, x: torch.Tensor, input_scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [..., in] float32 or float64 -> (GEMM operand in x's dtype, per-token scale [..., 1]
        for the epilogue, or None for static scales)."""
        if self.granularity == "tensor":
            if input_scale is None:
                raise ValueError("static (per-tensor) activation quantization needs input_scale")
            return fake_quantize(x.float(), input_scale.float(), self.fmt).to(x.dtype), None
        scale = token_scales(x, self.fmt)
        return round_to_grid(x / scale, self.fmt).to(x.dtype), scale
