"""Programmatic dependent launch (Hopper and later): a kernel launched with it may be scheduled
before the previous kernel in its stream has finished; it does what does not depend on that kernel
(the W4A8 GEMM: read its weights) and waits (``griddepcontrol.wait``) before the rest. The W4A8
kernels and the fused FP8 quantizers use it, so in the decode engine each GEMM starts streaming its
weights while the quantizer that feeds it runs. ``FP_EXPORT_PDL=0`` turns it off (A/B timing)."""

from __future__ import annotations

import os

import torch


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch: a CUDA device of
    compute capability 9.0 or later, unless the environment sets ``FP_EXPORT_PDL=0``."""
    device = torch.device(device)
    return (device.type == "cuda" and os.environ.get("FP_EXPORT_PDL", "1") != "0"
            and torch.cuda.get_device_capability(device)[0] >= 9)
