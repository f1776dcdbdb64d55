"""The CUDA shift-cast kernel of ``plugins/fp4_to_fp8.cu`` through its C entry point (ctypes).

The library is ``plugins/build/libfp_export_kernels.so`` (CMake) or the file named by
``FP_EXPORT_KERNELS``; ``build_library`` compiles it with nvcc when neither exists. On CPU
tensors ``fp4_to_fp8`` runs the integer reference of ``fp_export.numerics.fp4_to_fp8`` instead.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from fp_export.numerics.fp4_to_fp8 import fp4_to_fp8 as fp4_to_fp8_reference

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
LIB_NAME = "libfp_export_kernels.so"
NVCC_FLAGS = ["-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC", "-shared"]


class KernelUnavailable(RuntimeError):
    """No CUDA device, no nvcc, or the library failed to build or load."""


def compile_cuda(source: str | Path, lib_name: str, out_dir: Path, error: type[Exception],
                 defines: dict[str, int] | None = None) -> Path:
    """Compile ``plugins/<source>`` (or the file ``source``, with plugins/ on the include path) into
    ``out_dir/<lib_name>`` with nvcc (sm_90a) and ``-D`` of ``defines``, written under a per-process
    temporary name and renamed (concurrent builds never load a half-written library). Raises
    ``error`` when nvcc is missing."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise error(f"nvcc not found: install the CUDA toolkit to build plugins/{source} (or build plugins/ with CMake)")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / lib_name
    tmp = out.with_suffix(f".so.{os.getpid()}.tmp")
    flags = [f"-D{k}={v}" for k, v in (defines or {}).items()]
    subprocess.run([nvcc, *NVCC_FLAGS, *flags, f"-I{PLUGINS}", "-o", str(tmp), str(PLUGINS / source)], check=True)
    os.replace(tmp, out)
    return out


def build_library(out_dir: Path = PLUGINS / "build") -> Path:
    """Compile ``fp4_to_fp8.cu`` into ``out_dir/libfp_export_kernels.so``."""
    return compile_cuda("fp4_to_fp8.cu", LIB_NAME, out_dir, KernelUnavailable)


def library_path() -> Path:
    env = os.environ.get("FP_EXPORT_KERNELS")
    return Path(env) if env else PLUGINS / "build" / LIB_NAME


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    path = library_path()
    if not path.is_file():
        path = build_library()
    lib = ctypes.CDLL(str(path))
    fn = lib.fp_export_fp4_to_fp8
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return lib


def fp4_to_fp8(packed: torch.Tensor, shift: torch.Tensor, group_size: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """E4M3 bits uint8 [rows, cols] of packed FP4 uint8 [rows, cols/2] times 2**shift
    (int8 [rows, cols/group_size]): the CUDA kernel on CUDA tensors, the reference on CPU ones."""
    if not packed.is_cuda:
        return fp4_to_fp8_reference(packed, shift, group_size)
    rows, half = packed.shape
    if out is None:
        out = torch.empty(rows, 2 * half, dtype=torch.uint8, device=packed.device)
    packed, shift = packed.contiguous(), shift.contiguous()
    rc = load_library().fp_export_fp4_to_fp8(
        packed.data_ptr(), shift.data_ptr(), out.data_ptr(), rows, 2 * half, group_size,
        torch.cuda.current_stream(packed.device).cuda_stream,
    )
    if rc != 0:
        raise KernelUnavailable(f"fp_export_fp4_to_fp8 failed with CUDA error {rc}")
    return out
