"""Write a Triton Inference Server model repository for an fp-export checkpoint.

Layout (``<repo>/<model>/config.pbtxt`` + ``<repo>/<model>/1/...``):

- backend ``python``: ``<name>/`` (generation, decoupled, dynamic batching) holding the copied
  checkpoint in ``1/checkpoint/`` and ``1/model.py``; ``<name>_logits/`` (``input_ids`` [-1, -1]
  -> ``logits``) whose ``CHECKPOINT`` parameter points at ``../<name>/1/checkpoint``. Both run in
  the Python environment named by ``EXECUTION_ENV_PATH`` (see :func:`check_env`).
- backend ``onnxruntime``: ``<name>/1/model.onnx`` (+ ``model.onnx.data``), the reference graph
  (standard ONNX ops only), platform ``onnxruntime_onnx``.
- backend ``tensorrt``: ``<name>/1/model.plan`` from ``fp_export.build_engine``, platform
  ``tensorrt_plan``, the plugin library copied to ``<name>/libfp_export_trt_plugin.so``.

For onnxruntime / tensorrt the checkpoint's manifest, config and tokenizer files travel in
``<name>/1/checkpoint/`` (the weights live in the graph / engine). Paths inside the repository are
relative, so a copied repository serves as it is. Models are staged in a temporary sibling of the
repository and renamed into place: a new repository appears whole; models added to an existing
repository appear one complete directory at a time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("python", "onnxruntime", "tensorrt")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# model.py of python-backend models; kept as a template (not a module of this package): it runs in the
# server's python backend, imports triton_python_backend_utils and uses the public API (fp_export.load/generate)
MODEL_TEMPLATE = Path(__file__).with_name("triton_python_model.py.tmpl")
WEIGHT_FILES = ("model.safetensors",)
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 7: "TYPE_INT64", 6: "TYPE_INT32", 9: "TYPE_BOOL"}


class DeployError(ValueError):
    """Bad deploy input (name, backend, environment, existing target); the message names it."""


@dataclass(frozen=True)
class Tensor:
    """One config.pbtxt input or output: name, Triton data type, dims (-1 = variable), optional flag."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False

    def pbtxt(self) -> str:
        opt = " optional: true" if self.optional else ""
        return f'  {{ name: "{self.name}" data_type: {self.data_type} dims: [ {", ".join(map(str, self.dims))} ]{opt} }}'


def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_pbtxt(name: str, inputs: list[Tensor], outputs: list[Tensor], *, backend: str | None = None,
                 platform: str | None = None, max_batch_size: int = 0, decoupled: bool = False,
                 dynamic_batching_us: int | None = None, instance_kind: str = "KIND_CPU",
                 parameters: dict[str, str] | None = None) -> str:
    """The text of a ``config.pbtxt`` (Triton's ModelConfig in protobuf text format)."""
    lines = [f"name: {_q(name)}"]
    lines += [f"backend: {_q(backend)}"] if backend else []
    lines += [f"platform: {_q(platform)}"] if platform else []
    lines.append(f"max_batch_size: {max_batch_size}")
    if decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    if dynamic_batching_us is not None:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {dynamic_batching_us} }}")
    lines += ["input ["] + [",\n".join(t.pbtxt() for t in inputs)] + ["]"]
    lines += ["output ["] + [",\n".join(t.pbtxt() for t in outputs)] + ["]"]
    lines.append(f"instance_group [ {{ count: 1 kind: {instance_kind} }} ]")
    for k, v in (parameters or {}).items():
        lines.append(f"parameters {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}")
    return "\n".join(lines) + "\n"


def generate_config(name: str, env: Path, max_batch_size: int = 8, device: str = "") -> str:
    """The generation model: decoupled, dynamic batching, one prompt per request (see model.py)."""
    scalar = (1,)
    inputs = [Tensor("input_ids", "TYPE_INT64", (-1,)), Tensor("max_tokens", "TYPE_INT32", scalar),
              Tensor("temperature", "TYPE_FP32", scalar, True), Tensor("top_k", "TYPE_INT32", scalar, True),
              Tensor("top_p", "TYPE_FP32", scalar, True), Tensor("seed", "TYPE_INT64", scalar, True),
              Tensor("stream", "TYPE_BOOL", scalar, True)]
    return config_pbtxt(name, inputs, [Tensor("output_ids", "TYPE_INT64", (-1,))], backend="python",
                        max_batch_size=max_batch_size, decoupled=True, dynamic_batching_us=2000,
                        parameters={"MODE": "generate", "CHECKPOINT": "1/checkpoint", "DEVICE": device,
                                    "EXECUTION_ENV_PATH": str(env)})


def logits_config(name: str, checkpoint: str, env: Path) -> str:
    """The validation model: ``input_ids`` INT64 [batch, seq] -> ``logits`` FP32 [batch, seq, vocab]."""
    return config_pbtxt(name, [Tensor("input_ids", "TYPE_INT64", (-1, -1))],
                        [Tensor("logits", "TYPE_FP32", (-1, -1, -1))], backend="python",
                        parameters={"MODE": "logits", "CHECKPOINT": checkpoint, "EXECUTION_ENV_PATH": str(env)})


def graph_io(model) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of an ONNX ModelProto as config tensors (symbolic dims become -1)."""
    def conv(vi) -> Tensor:
        tt = vi.type.tensor_type
        if tt.elem_type not in ONNX_TO_TRITON:
            raise DeployError(f"graph tensor {vi.name!r}: ONNX element type {tt.elem_type} has no Triton type here")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        return Tensor(vi.name, ONNX_TO_TRITON[tt.elem_type], dims)
    inits = {i.name for i in model.graph.initializer}
    return [conv(v) for v in model.graph.input if v.name not in inits], [conv(v) for v in model.graph.output]


def onnxruntime_config(name: str, model) -> str:
    inputs, outputs = graph_io(model)
    return config_pbtxt(name, inputs, outputs, platform="onnxruntime_onnx")


def tensorrt_config(name: str, model, instance_kind: str = "KIND_GPU") -> str:
    """``tensorrt_plan`` config; I/O from the ONNX graph the engine was built from."""
    inputs, outputs = graph_io(model)
    return config_pbtxt(name, inputs, outputs, platform="tensorrt_plan", instance_kind=instance_kind)


def tritonserver_command(repo: Path, plugin: Path) -> str:
    """The command line that serves a tensorrt repository with our plugin library loaded."""
    return (f"tritonserver --model-repository={Path(repo).resolve()} "
            f"--backend-config=tensorrt,plugins=\"{Path(plugin).resolve()}\"")


def check_env(env: Path | None) -> Path:
    """The serving environment for python-backend models: ``env`` or, for None, this interpreter's
    environment (``sys.prefix``). It must be a virtual environment (``bin/activate``, which the
    python backend sources) whose Python imports ``fp_export`` and torch."""
    env = Path(env if env is not None else sys.prefix).resolve()
    if not (env / "bin" / "activate").is_file():
        raise DeployError(f"{env}: not a virtual environment (no bin/activate), which Triton's python backend "
                          "needs as EXECUTION_ENV_PATH: create one (python -m venv), install fp-export into it "
                          "(pip install -e \".[serve]\") and pass --env")
    res = subprocess.run([str(env / "bin" / "python"), "-c", "import fp_export, torch"], capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        raise DeployError(f"{env}: the serving environment cannot import fp_export and torch ({last}): "
                          "install fp-export into it (pip install -e \".[serve]\")")
    return env


def _copy_checkpoint(src: Path, dst: Path, weights: bool) -> None:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and (weights or f.name not in WEIGHT_FILES):
            shutil.copy2(f, dst / f.name)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def deploy(model: str | Path, repo: str | Path, name: str | None = None, backend: str = "python",
           env: str | Path | None = None, overwrite: bool = False, plugin: str | Path | None = None,
           max_batch_size: int = 8, device: str = "") -> dict:
    """Write a Triton model repository for the checkpoint (or plain HF directory) ``model``.

    ``name``: Triton model name (default: the checkpoint directory's name). ``backend``: python,
    onnxruntime or tensorrt. ``env`` (python): the serving environment (see :func:`check_env`).
    ``overwrite``: replace models of the same name in an existing repository. ``plugin``
    (tensorrt): the plugin library (default: the one ``fp-export build`` uses). ``max_batch_size``
    (python): the generation model's dynamic batch limit. ``device`` (python): "" (auto), cpu, cuda.
    Returns ``{"repository", "models", "backend", "command"}`` (command: how to serve it).
    Raises DeployError / FileExistsError / CheckpointError-family errors before writing anything,
    and ``fp_export.build.engine.BuildUnavailable`` for tensorrt without TensorRT.
    """
    from fp_export.checkpoint.layout import MANIFEST, WEIGHTS, load_checkpoint, read_manifest
    from fp_export.hf.loading import check_model_dir, load_model

    model, repo = Path(model), Path(repo)
    if not model.is_dir():
        raise FileNotFoundError(f"{model}: no such checkpoint or model directory")
    if backend not in BACKENDS:
        raise DeployError(f"unknown backend {backend!r}: one of {', '.join(BACKENDS)}")
    name = name or model.resolve().name
    if not NAME_RE.fullmatch(name):
        raise DeployError(f"model name {name!r}: use letters, digits, '_', '.', '-' (pass --name)")
    if device not in ("", "cpu", "cuda"):
        raise DeployError(f"device {device!r}: '' (auto), cpu or cuda")
    names = [name, f"{name}_logits"] if backend == "python" else [name]
    if repo.exists() and not repo.is_dir():
        raise DeployError(f"{repo}: exists and is not a directory")
    clashes = [n for n in names if (repo / n).exists()]
    if clashes and not overwrite:
        raise FileExistsError(f"{repo}: already holds model(s) {', '.join(clashes)} (pass --overwrite to replace)")
    if backend == "tensorrt":
        from fp_export.build.engine import PLUGIN_LIB, import_tensorrt

        import_tensorrt()
        plugin = Path(plugin) if plugin else PLUGIN_LIB
    checkpoint = (model / MANIFEST).is_file()
    manifest = read_manifest(model) if checkpoint else None  # verifies every file's sha256
    if not checkpoint:
        check_model_dir(model)
    serving_env = check_env(Path(env) if env else None) if backend == "python" else None

    repo.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{repo.name}.deploy-", dir=repo.resolve().parent))
    try:
        root = stage / "repo"
        command = f"fp-export serve --repo {repo}"
        if backend == "python":
            write_python_models(root, name, model, serving_env, max_batch_size, device)
        else:
            import onnx

            from fp_export.export.onnx import export_model

            net = load_checkpoint(model)[0] if checkpoint else load_model(model)[0]
            meta = {} if manifest is None else {"fp_export.recipe": manifest["recipe"]["name"],
                                                "fp_export.checkpoint_sha256": manifest["files"][WEIGHTS],
                                                "fp_export.reference": int(backend == "onnxruntime")}
            onnx_file = export_model(net, stage / "model.onnx", backend == "onnxruntime", meta)
            proto = onnx.load(onnx_file, load_external_data=False)
            _copy_checkpoint(model, root / name / "1" / "checkpoint", weights=False)
            if backend == "onnxruntime":
                write_onnxruntime_model(root / name, name, onnx_file, proto)
                command = f"tritonserver --model-repository={repo.resolve()}  (needs Triton's onnxruntime backend)"
            else:
                from fp_export.build.engine import build_engine

                plan = build_engine(onnx_file, stage / "model.plan", plugin)
                write_tensorrt_model(root / name, name, plan, plugin, proto)
                command = tritonserver_command(repo, repo / name / plugin.name)
        _publish(root, repo, names)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"repository": repo, "models": names, "backend": backend, "command": command}


def write_python_models(root: Path, name: str, checkpoint: Path, env: Path, max_batch_size: int = 8,
                        device: str = "") -> None:
    """``root/<name>`` (generation, with the checkpoint copied into ``1/checkpoint``) and
    ``root/<name>_logits`` (sharing that checkpoint), both running ``model.py`` in ``env``."""
    _copy_checkpoint(Path(checkpoint), root / name / "1" / "checkpoint", weights=True)
    shutil.copy2(MODEL_TEMPLATE, root / name / "1" / "model.py")
    _write(root / name / "config.pbtxt", generate_config(name, env, max_batch_size, device))
    logits = f"{name}_logits"
    (root / logits / "1").mkdir(parents=True)
    shutil.copy2(MODEL_TEMPLATE, root / logits / "1" / "model.py")
    _write(root / logits / "config.pbtxt", logits_config(logits, f"../{name}/1/checkpoint", env))


def write_onnxruntime_model(model_dir: Path, name: str, onnx_file: Path, proto) -> None:
    """``model_dir/1/model.onnx`` (+ ``model.onnx.data``) and its ``onnxruntime_onnx`` config."""
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(onnx_file, model_dir / "1" / "model.onnx")
    data = Path(f"{onnx_file}.data")
    if data.is_file():
        shutil.copy2(data, model_dir / "1" / "model.onnx.data")
    _write(model_dir / "config.pbtxt", onnxruntime_config(name, proto))


def write_tensorrt_model(model_dir: Path, name: str, plan: Path, plugin: Path, proto) -> None:
    """``model_dir/1/model.plan``, the plugin library beside the config, and the ``tensorrt_plan``
    config (I/O of the ONNX graph ``proto`` the engine was built from)."""
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(plan, model_dir / "1" / "model.plan")
    shutil.copy2(plugin, model_dir / Path(plugin).name)
    _write(model_dir / "config.pbtxt", tensorrt_config(name, proto))


def _publish(root: Path, repo: Path, names: list[str]) -> None:
    """Rename the staged repository (or, into an existing one, each staged model) into place."""
    if not repo.exists():
        os.replace(root, repo)
        return
    for n in names:
        old = repo / n
        if old.exists():
            trash = root / f".old-{n}"
            os.replace(old, trash)
        os.replace(root / n, old)
