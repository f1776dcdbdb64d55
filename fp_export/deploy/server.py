"""Start, wait for and stop the ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel.

The wheel carries ``pytriton/tritonserver/bin/tritonserver`` (Triton 2.51), its shared libraries
in ``nvidia_pytriton.libs`` and the python backend with one stub binary per Python version
(``python_backend_stubs/3.X/triton_python_backend_stub``). A server needs: ``LD_LIBRARY_PATH``
holding those libraries and the directory of the serving interpreter's ``libpython3.X.so``, and a
backend directory whose ``python/`` folder holds the stub built for the Python version of the
environment the models run in (their ``EXECUTION_ENV_PATH``). :func:`serve` builds that backend
directory in a private temporary folder (removed by :meth:`TritonServer.stop`), binds HTTP and
gRPC to ``host`` only, disables the metrics endpoint, and waits until ``/v2/health/ready``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

INSTALL_HINT = 'pip install -e ".[serve]"  (in the fp-export source tree; it installs nvidia-pytriton and tritonclient)'
ENV_PARAM = re.compile(r'key:\s*"EXECUTION_ENV_PATH"\s*,?\s*value:\s*\{\s*string_value:\s*"([^"]*)"')


class ServerUnavailable(RuntimeError):
    """The bundled server is not installed, or it exited / did not become ready; says what to do."""


@dataclass(frozen=True)
class ServerFiles:
    """Paths inside the installed ``nvidia-pytriton`` wheel."""

    binary: Path
    libs: Path
    python_backend: Path
    stubs: Path


def locate() -> ServerFiles:
    """The bundled server's files; :class:`ServerUnavailable` naming the install command when absent."""
    spec = importlib.util.find_spec("pytriton")  # located, not imported: only its files are used
    if spec is None or not spec.origin:
        raise ServerUnavailable(f"Triton Inference Server is not installed (no `pytriton` package): {INSTALL_HINT}")
    root = Path(spec.origin).resolve().parent
    files = ServerFiles(root / "tritonserver" / "bin" / "tritonserver", root.parent / "nvidia_pytriton.libs",
                        root / "tritonserver" / "backends" / "python", root / "tritonserver" / "python_backend_stubs")
    for p in (files.binary, files.libs, files.python_backend / "libtriton_python.so"):
        if not p.exists():
            raise ServerUnavailable(f"{p}: missing from the installed nvidia-pytriton wheel: reinstall it with {INSTALL_HINT}")
    return files


@dataclass(frozen=True)
class PythonEnv:
    """A Python environment models run in: its version (``3.11``) and the directory of its libpython."""

    prefix: Path | None
    version: str
    libdir: Path


def python_env(prefix: Path | None) -> PythonEnv:
    """Inspect the environment at ``prefix`` (a venv directory) or, for ``None``, this interpreter."""
    code = "import sys, sysconfig; print('%d.%d' % sys.version_info[:2]); print(sysconfig.get_config_var('LIBDIR'))"
    if prefix is None:
        exe = sys.executable
    else:
        exe = str(Path(prefix) / "bin" / "python")
        if not (Path(prefix) / "bin" / "activate").is_file():
            raise ServerUnavailable(f"{prefix}: EXECUTION_ENV_PATH names no Python environment (no bin/activate)")
    try:
        res = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise ServerUnavailable(f"{exe}: cannot run the serving environment's Python ({e})") from None
    version, libdir = res.stdout.split()
    return PythonEnv(None if prefix is None else Path(prefix), version, Path(libdir))


def repository_envs(repos: Sequence[Path]) -> list[Path]:
    """Every distinct ``EXECUTION_ENV_PATH`` named by a ``config.pbtxt`` in the repositories."""
    envs: list[Path] = []
    for repo in repos:
        for cfg in sorted(Path(repo).glob("*/config.pbtxt")):
            for value in ENV_PARAM.findall(cfg.read_text()):
                if Path(value) not in envs:
                    envs.append(Path(value))
    return envs


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """A running ``tritonserver`` process (see :func:`serve`)."""

    process: subprocess.Popen
    host: str
    http_port: int
    grpc_port: int
    workdir: Path
    log_path: Path | None
    _log_file: IO | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def log(self) -> str:
        """The server's output so far ('' when it goes to the terminal)."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT (Triton's graceful shutdown), then SIGKILL after ``timeout`` seconds; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _backend_dir(files: ServerFiles, version: str, workdir: Path) -> Path:
    stub = files.stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in files.stubs.iterdir())
        raise ServerUnavailable(f"the bundled python backend has no stub for Python {version} (it has {', '.join(have)})")
    dst = workdir / "backends" / "python"
    dst.mkdir(parents=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(files.python_backend / f, dst / f)
    shutil.copy2(stub, dst / "triton_python_backend_stub")
    return workdir / "backends"


def serve(repos: Path | Sequence[Path], http_port: int = 0, grpc_port: int = 0, host: str = "127.0.0.1",
          log: Path | None = None, load: Sequence[str] | None = None, timeout: float = 300.0,
          extra_args: Sequence[str] = ()) -> TritonServer:
    """Start ``tritonserver`` on ``repos`` and wait until it is ready.

    ``http_port`` / ``grpc_port`` 0 pick free ports. ``log``: file for the server's output (None:
    this process's stdout/stderr). ``load``: None loads every model at startup (model control mode
    ``none``); a list starts in ``explicit`` mode with only those models loaded (more can be loaded
    through the repository API). Raises :class:`ServerUnavailable` when the server is missing, exits,
    or is not ready within ``timeout`` seconds (with the end of its log).
    """
    repos = [Path(repos)] if isinstance(repos, (str, Path)) else [Path(r) for r in repos]
    for r in repos:
        if not r.is_dir():
            raise FileNotFoundError(f"{r}: no such model repository")
    files = locate()
    envs = [python_env(e) for e in repository_envs(repos)] or [python_env(None)]
    versions = sorted({e.version for e in envs})
    if len(versions) > 1:
        raise ServerUnavailable(f"the repositories' EXECUTION_ENV_PATHs use Python {' and '.join(versions)}: "
                                "one server runs one python backend stub; use environments of one Python version")
    workdir = Path(tempfile.mkdtemp(prefix="fp-export-triton-"))
    try:
        backends = _backend_dir(files, versions[0], workdir)
        http_port = http_port or free_port(host)
        grpc_port = grpc_port or free_port(host)
        env = dict(os.environ)
        libpaths = [str(files.libs)] + [str(e.libdir) for e in envs]
        env["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(libpaths + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]))
        cmd = [str(files.binary), *(f"--model-repository={r.resolve()}" for r in repos),
               f"--backend-directory={backends}", f"--http-address={host}", f"--http-port={http_port}",
               f"--grpc-address={host}", f"--grpc-port={grpc_port}", "--allow-metrics=false",
               "--exit-timeout-secs=10"]
        if load is not None:
            cmd += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in load)]
        cmd += list(extra_args)
        log_file = open(log, "w") if log is not None else None
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                                stdin=subprocess.DEVNULL)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = TritonServer(proc, host, http_port, grpc_port, workdir, Path(log) if log else None, log_file)
    try:
        wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def wait_ready(server: TritonServer, timeout: float) -> None:
    """Poll ``/v2/health/ready`` every 0.2 s until 200, the process exits, or ``timeout`` seconds pass."""
    url = f"http://{server.http_url}/v2/health/ready"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = "\n".join(server.log().splitlines()[-20:])
            raise ServerUnavailable(f"tritonserver exited with code {server.process.returncode} before it was ready"
                                    + (f"; end of its log:\n{tail}" if tail else " (see its output above)"))
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise ServerUnavailable(f"tritonserver was not ready at {url} within {timeout:.0f} s")
