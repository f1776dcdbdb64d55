"""``fp-export build``: a TensorRT engine from an exported graph, with the Fp4ToFp8 plugin.

Thin on purpose: TensorRT's Python API parses the ONNX (its parser resolves ``fp_export::Fp4ToFp8``
from the plugin registry by name, version and namespace), builds a strongly typed network (the
FP8 Q/DQ and FP8 weights keep their types), reuses a timing cache, and saves the plan atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fp_export.runtime.kernels import PLUGINS

PLUGIN_LIB = PLUGINS / "build" / "libfp_export_trt_plugin.so"


class BuildUnavailable(RuntimeError):
    """TensorRT or the plugin library is missing; the message says what to install."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildUnavailable(
            "TensorRT's Python package is not installed: `pip install tensorrt-cu13` (or tensorrt-cu12) on a "
            "machine with NVIDIA's TensorRT, then rebuild the plugin with "
            "`cmake -S plugins -B plugins/build -DTensorRT_ROOT=<TensorRT dir> && cmake --build plugins/build`"
        ) from None
    return trt


def build_engine(onnx_path: Path, out: Path, plugin_lib: Path = PLUGIN_LIB, timing_cache: Path | None = None,
                 max_batch: int = 8, max_seq: int = 2048, opt_seq: int = 512, workspace_gib: float = 8.0) -> Path:
    """Build and save a serialized engine; returns ``out``."""
    onnx_path, out, plugin_lib = Path(onnx_path), Path(out), Path(plugin_lib)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: no such ONNX file")
    trt = import_tensorrt()
    if not plugin_lib.is_file():
        raise BuildUnavailable(
            f"plugin library {plugin_lib} not found: build it with `cmake -S plugins -B plugins/build "
            "-DTensorRT_ROOT=<TensorRT dir> && cmake --build plugins/build` (or pass --plugin)"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    trt.get_plugin_registry().load_library(str(plugin_lib))
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    profile.set_shape("input_ids", (1, 1), (1, opt_seq), (max_batch, max_seq))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ValueError(f"{onnx_path}: TensorRT could not build an engine (see the log above)")
    _write_atomic(out, bytes(plan))
    if timing_cache is not None:
        _write_atomic(timing_cache, bytes(cache.serialize()))
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
