"""The device a quantize job runs on, its determinism settings, and the CPU thread count.

GPU runs are bit-reproducible under these settings (``deterministic``): ``CUBLAS_WORKSPACE_CONFIG
=:4096:8`` (cuBLAS picks the same reduction order every call; must be set before the process's
first cuBLAS call, so ``resolve_device`` sets it when it is unset), ``torch.use_deterministic_
algorithms(True, warn_only=True)`` (deterministic kernels wherever torch has them; an op without
one warns instead of failing the job, and ``tests/test_gpu_quantize.py`` compares two runs byte for
byte), TF32 off for matmuls and cuDNN, and ``float32_matmul_precision("highest")``. All of them
are restored when the job ends.

CPU threads: the GPTQ column loop is thousands of tiny ops per layer; with more OpenMP threads
than free cores each op pays for thread wake-ups (issue 9 measured 20-40 s vs 2-6 s per layer on
2 cores). ``cpu_threads`` caps torch's intra-op threads at the cores this process may use
(``os.sched_getaffinity``), and at ``OMP_NUM_THREADS`` when the user set it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

CUBLAS_CONFIG = ":4096:8"


class DeviceError(ValueError):
    """A device that cannot be used, or a job that does not fit on it (CLI exit code 2)."""


def resolve_device(name: str | torch.device = "cpu") -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (the GPU when there is one) as a torch device."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise DeviceError(f"device {name!r}: choose cpu, cuda or auto")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name}: no CUDA GPU is available (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto")
    dev = torch.device(name)
    index = dev.index or 0
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_CONFIG)
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@contextmanager
def deterministic(device: torch.device):
    """The GPU determinism settings of the module docstring for the duration of a job (no-op on CPU)."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cuda.matmul.allow_tf32 = saved[2]
        torch.backends.cudnn.allow_tf32 = saved[3]
        torch.set_float32_matmul_precision(saved[4])


def memory_budget(device: torch.device, max_bytes: int | None) -> int:
    """Bytes a job may still take on CUDA ``device``: its free memory, at most ``max_bytes``."""
    free, _total = torch.cuda.mem_get_info(device)
    return free if max_bytes is None else min(free, max_bytes)


@contextmanager
def memory_cap(device: torch.device, max_bytes: int | None):
    """Cap this process's CUDA allocations on ``device`` at ``max_bytes`` for a job (torch's
    per-process memory fraction; a GPU shared with other work, or a test of a smaller GPU's
    budget): an allocation past it raises the out-of-memory error the job reports. No-op on the
    CPU or for None."""
    if device.type != "cuda" or max_bytes is None:
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if not 0 < max_bytes <= total:
        raise DeviceError(f"max GPU memory {max_bytes / 2**30:.2f} GiB: {device} has {total / 2**30:.2f} GiB")
    torch.cuda.set_per_process_memory_fraction(max_bytes / total, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextmanager
def cpu_threads():
    """torch intra-op threads capped at the usable cores (and ``OMP_NUM_THREADS`` if set) for a job."""
    saved = torch.get_num_threads()
    cap = usable_cores()
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        cap = min(cap, int(env))
    torch.set_num_threads(max(1, min(saved, cap)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)
