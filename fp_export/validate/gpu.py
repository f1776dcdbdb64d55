"""``fp-export validate --backend gpu``: the GPU runtime against the ONNX Runtime reference graph."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fp_export.checkpoint.layout import load_checkpoint
from fp_export.export.onnx import build_model
from fp_export.runtime.linear import to_gpu_runtime
from fp_export.validate.compare import Tolerances, TorchRunner, compare, onnx_runner, onnx_runner_from_proto

# The GPU runtime carries activations in bf16 between its kernels (8 significant bits, float32
# has 24), so it sits further from the float32 reference than a float32 backend: 2 points of top-1
# below the float32 noise floor instead of 0.5 (measured on the H100, default model, 8 windows:
# 96.1-96.3% against a 97.4% floor, perplexity within 0.03%). A wrong decode or scale costs tens
# of points.
GPU_TOLERANCES = Tolerances(floor_margin=0.02)


def compare_gpu(cpu_model: nn.Module, qdir: Path, onnx_file: Path | None, windows: torch.Tensor,
                mode: str = "fused") -> dict:
    """Report of the GPU runtime (``mode``) vs ONNX Runtime on ``onnx_file`` (or on the reference
    graph built in memory from the checkpoint)."""
    if not torch.cuda.is_available():
        raise ValueError("--backend gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
    if onnx_file is None:
        with torch.no_grad():
            reference = onnx_runner_from_proto(build_model(cpu_model, reference=True))
    else:
        reference = onnx_runner(onnx_file)
    gpu_model = to_gpu_runtime(load_checkpoint(qdir)[0], mode=mode)
    runner = TorchRunner(gpu_model, name=f"gpu-{mode}", device="cuda")
    return compare(runner, reference, windows, floor_model=cpu_model, tol=GPU_TOLERANCES)
