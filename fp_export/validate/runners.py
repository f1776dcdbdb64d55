"""Validation runners, one per backend, all behind Polygraphy's runner interface
(``input_ids`` int64 [batch, seq] -> ``logits`` [batch, seq, vocab]):

- ``TorchRunner``: a PyTorch causal LM (the quantized reference, or the GPU runtime on CUDA);
- ``onnxrt_runner``: ONNX Runtime (CPU provider, basic graph optimization) on a graph it can run
  (``load_onnx_for_ort`` swaps custom nodes for their reference subgraphs);
- ``tensorrt_runner``: a TensorRT engine through ``polygraphy.backend.trt`` with the Fp4ToFp8
  plugin library loaded (for users with TensorRT; here it says clearly that TensorRT is missing).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from torch import nn

from fp_export.build.engine import BuildUnavailable, import_tensorrt
from fp_export.export.reference import to_reference


class OnnxFileError(ValueError):
    """An ONNX file that is missing, truncated or not an fp-export causal LM graph."""


class TorchRunner(BaseRunner):
    """Polygraphy runner for a PyTorch causal LM: ``input_ids`` int64 [batch, seq] -> ``logits``."""

    def __init__(self, model: nn.Module, name: str | None = None, device: str = "cpu"):
        super().__init__(name=name, prefix="pytorch-runner")
        self.model = model
        self.device = device

    def activate_impl(self):
        self.model.eval()

    def get_input_metadata_impl(self):
        return TensorMetadata().add("input_ids", np.int64, ["batch", "seq"])

    def infer_impl(self, feed_dict):
        ids = torch.from_numpy(np.asarray(feed_dict["input_ids"])).to(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            logits = self.model(ids, use_cache=False).logits
        logits = (logits if logits.dtype == torch.float64 else logits.float()).cpu().numpy()
        self.inference_time = time.perf_counter() - start
        return OrderedDict(logits=logits)

    def deactivate_impl(self):
        pass


def load_onnx_for_ort(path: Path) -> onnx.ModelProto:
    """Load and check an exported graph; nodes ONNX Runtime cannot run (custom ``Fp4ToFp8``, FP4
    DequantizeLinear) are replaced by their reference subgraphs."""
    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as e:  # onnx raises DecodeError, ValidationError, OSError for bad files
        raise OnnxFileError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    names = [i.name for i in proto.graph.input]
    outs = [o.name for o in proto.graph.output]
    if names != ["input_ids"] or outs != ["logits"]:
        raise OnnxFileError(f"{path}: expected input_ids -> logits, found {names} -> {outs} (not an fp-export graph)")
    return to_reference(proto)


def onnxrt_runner(proto: onnx.ModelProto) -> OnnxrtRunner:
    """ONNX Runtime (CPU) at basic graph optimization: the graph's own op semantics, without the
    extended Q/DQ fusions (some ORT releases fuse FP8 Q/DQ into integer-only kernels and fail)."""
    if proto.ByteSize() >= 2**31 - 1:
        raise OnnxFileError("graph over 2 GiB in memory; validate its --reference export file instead")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return OnnxrtRunner(session, name="onnxruntime")


def gpu_runner(model: nn.Module, mode: str = "fused") -> TorchRunner:
    """The GPU runtime (``runtime.linear.to_gpu_runtime``) of a loaded quantized ``model`` (converted
    in place) on CUDA."""
    if not torch.cuda.is_available():
        raise ValueError("--backend gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
    from fp_export.runtime.linear import to_gpu_runtime

    return TorchRunner(to_gpu_runtime(model, mode=mode), name=f"gpu-{mode}", device="cuda")


def tensorrt_runner(engine: Path, plugin: Path) -> BaseRunner:
    """A TensorRT engine file (``fp-export build``) with the Fp4ToFp8 plugin library ``plugin``."""
    import_tensorrt()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    engine, plugin = Path(engine), Path(plugin)
    for f, what in ((engine, "engine"), (plugin, "plugin library")):
        if not f.is_file():
            raise BuildUnavailable(f"{f}: no such TensorRT {what}")
    import tensorrt as trt

    trt.get_plugin_registry().load_library(str(plugin))
    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="tensorrt")
