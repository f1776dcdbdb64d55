"""The public Python API (re-exported by ``fp_export``): one function per stage, objects in and out.

Every stage talks to the next through its artifact: ``quantize`` writes a checkpoint directory
and returns it loaded; ``load`` reads one; ``export_onnx`` writes an ONNX file; ``build_engine``
a TensorRT plan; ``deploy`` a Triton model repository. Paths are taken only where an artifact is
read or written.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

from fp_export.checkpoint.layout import INDEX, MANIFEST, WEIGHTS, load_checkpoint
from fp_export.data.corpus import load_text
from fp_export.evaluate.perplexity import eval_windows, model_seqlen, perplexity, tokenize
from fp_export.export.onnx import export_model
from fp_export.hf.loading import DEFAULT_MODEL, load_model
from fp_export.ptq.job import quantize_to_checkpoint
from fp_export.quant.recipe import CalibrationConfig, Recipe, load_recipe

Progress = Callable[[str, int, int], None]


@dataclass
class QuantizedModel:
    """A loaded model: ``model`` (Hugging Face causal LM, float32, CPU, eval mode; ``QuantLinear``
    layers when quantized), its ``tokenizer``, the checkpoint ``manifest`` (None for a plain Hugging
    Face directory) and the directory it came from."""

    model: nn.Module
    tokenizer: object
    manifest: dict | None
    path: Path
    runtimes: dict = field(default_factory=dict, repr=False)  # device -> GPU runtime copy of model

    @property
    def recipe(self) -> Recipe | None:
        return None if self.manifest is None else Recipe.model_validate(self.manifest["recipe"])

    @property
    def metrics(self) -> dict:
        """What ``quantize`` measured (perplexity, tokens, seqlen, windows), or {}."""
        return {} if self.manifest is None else self.manifest.get("metrics") or {}


def load(path: str | Path) -> QuantizedModel:
    """An fp-export checkpoint (verified against its manifest) or a plain Hugging Face directory."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        model, tok, manifest = load_checkpoint(p)
    else:
        model, tok, _ = load_model(p)
        manifest = None
    return QuantizedModel(model, tok, manifest, p)


def quantize(model: str | Path, recipe: Recipe | str, *, out: str | Path,
             calibration: CalibrationConfig | dict | None = None, resume: bool = False,
             overwrite: bool = False, evaluate: bool = True, max_eval_windows: int | None = None,
             progress: Progress | None = None, device: str = "cpu",
             max_gpu_memory: float | None = None) -> QuantizedModel:
    """Quantize the Hugging Face model directory ``model`` by ``recipe`` (object, bundled name or
    YAML path) into the checkpoint ``out``; ``calibration`` overrides fields of the recipe's
    calibration section. Test perplexity is recorded in the manifest when ``evaluate``.
    ``device``: ``cpu`` (the whole model in float32), ``cuda`` (read lazily and quantized one decoder
    layer at a time on the GPU) or ``auto`` (the GPU when there is one). ``max_gpu_memory``: GiB the
    job may allocate on the GPU (default: all free memory); calibration hidden states that do not fit
    beside a layer's workspace wait in pinned CPU memory."""
    r = load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe
    if calibration is not None:
        fields = calibration.model_dump() if isinstance(calibration, CalibrationConfig) else dict(calibration)
        r = Recipe.model_validate({**r.model_dump(), "calibration": {**r.calibration.model_dump(), **fields}})
    quantize_to_checkpoint(Path(model), r, Path(out), resume=resume, overwrite=overwrite,
                           eval_text="test" if evaluate else None, max_eval_windows=max_eval_windows,
                           progress=progress, device=device,
                           max_gpu_bytes=None if max_gpu_memory is None else int(max_gpu_memory * 2**30))
    return load(out)


def evaluate(qm: QuantizedModel, text: str = "test", seqlen: int | None = None, max_windows: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity of ``qm`` on ``text`` (a corpus split or a text file), the paper's protocol:
    {"perplexity", "tokens", "seqlen", "windows"}."""
    ids = tokenize(qm.tokenizer, load_text(text))
    return perplexity(qm.model, ids, model_seqlen(qm.model, seqlen), max_windows, progress)


def export_onnx(qm: QuantizedModel, out: str | Path | None = None, reference: bool = False
                ) -> onnx.ModelProto | Path:
    """The ONNX graph of a quantized model (``reference``: the ONNX Runtime reference, no custom
    ops). With ``out``: written atomically (+ ``out.data``), checked, and its path returned."""
    meta = {}
    if qm.manifest is not None:
        meta = {"fp_export.recipe": qm.manifest["recipe"]["name"],
                "fp_export.checkpoint_sha256": qm.manifest["files"].get(WEIGHTS) or qm.manifest["files"][INDEX],
                "fp_export.reference": int(reference)}
    return export_model(qm.model, None if out is None else Path(out), reference, meta)


def validate(qm: QuantizedModel, onnx_model: str | Path | onnx.ModelProto | None = None, *, windows: int = 8,
             text: str = "test", seqlen: int | None = None, precision: str = "float64",
             backend: str = "onnxruntime", engine: str | Path | None = None, plugin: str | Path | None = None,
             save_inputs: str | Path | None = None) -> dict:
    """Compare a backend with the PyTorch quantized model ``qm`` on ``windows`` windows of ``text``
    through Polygraphy; the report's ``passed`` says whether the tolerances hold.

    backend ``onnxruntime``: the graph ``onnx_model`` (path or proto) at ``precision`` float64 or
    float32; ``gpu``: the CUDA runtime against ONNX Runtime on ``onnx_model`` (or the reference
    graph built from ``qm``), float32; ``tensorrt``: the ``engine`` (with the ``plugin`` library)
    against ONNX Runtime on ``onnx_model``."""
    from fp_export.validate.compare import validate_gpu, validate_onnx
    from fp_export.validate.runners import load_onnx_for_ort, tensorrt_runner

    ids = eval_windows(tokenize(qm.tokenizer, load_text(text)), model_seqlen(qm.model, seqlen), windows)
    if save_inputs is not None:
        from polygraphy.json import save_json

        save_json([{"input_ids": b.numpy()} for b in ids.split(4)], str(save_inputs))
    if isinstance(onnx_model, (str, Path)):
        proto = load_onnx_for_ort(Path(onnx_model))
    elif onnx_model is None:
        proto = None
    else:
        from fp_export.export.reference import to_reference

        proto = to_reference(onnx_model)
    if backend == "onnxruntime":
        if proto is None:
            raise ValueError("backend onnxruntime needs an ONNX graph (--onnx)")
        return validate_onnx(qm.model, proto, ids, precision)
    if precision != "float32":
        raise ValueError(f"backend {backend} runs as deployed: pass precision float32 (--precision float32)")
    if proto is None:
        proto = export_onnx(qm, reference=True)
    if backend == "gpu":
        return validate_gpu(qm.model, copy.deepcopy(qm.model), proto, ids)
    if backend == "tensorrt":
        from fp_export.build.engine import PLUGIN_LIB
        from fp_export.validate.compare import compare
        from fp_export.validate.runners import onnxrt_runner

        if engine is None:
            raise ValueError("backend tensorrt needs an engine file (--engine)")
        report = compare(tensorrt_runner(Path(engine), Path(plugin or PLUGIN_LIB)), onnxrt_runner(proto), ids,
                         floor_model=qm.model)
        return {"precision": "float32", **report}
    raise ValueError(f"unknown backend {backend!r}: onnxruntime, gpu or tensorrt")


def build_engine(onnx_path: str | Path, out: str | Path, *, plugin: str | Path | None = None,
                 timing_cache: str | Path | None = None, max_batch: int = 8, max_seq: int = 2048) -> Path:
    """A TensorRT engine (strongly typed, FP8) from an exported graph, with the Fp4ToFp8 plugin
    library (default ``plugins/build/libfp_export_trt_plugin.so``); raises ``BuildUnavailable``
    naming what to install when TensorRT or the plugin is missing."""
    from fp_export.build.engine import PLUGIN_LIB, build_engine as build

    return build(Path(onnx_path), Path(out), Path(plugin or PLUGIN_LIB),
                 None if timing_cache is None else Path(timing_cache), max_batch, max_seq)


def generate(qm: QuantizedModel, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = None,
             on_token: Callable[[int, torch.Tensor], None] | None = None, device: str | None = None
             ) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids`` int64 [batch, seq]; int64 [batch, n] out.
    Greedy at temperature 0, else sampled (top-k, top-p, ``seed``). ``on_token(step, tokens
    [batch])`` streams each step. ``device`` None: CUDA when available (LLaMA-family models through
    the CUDA-graph decode engine of ``runtime.engine``, others through the GPU runtime), else the
    CPU reference loop."""
    from fp_export.runtime.generate import generate as run

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
              on_token=on_token)
    if device == "cpu":
        return run(qm.model, ids, max_new_tokens, **kw)
    from fp_export.hf.families import LLAMA, family_of

    if family_of(qm.model) is LLAMA:  # the CUDA-graph decode engine (static KV cache, fused kernels)
        from fp_export.runtime.engine import generate_cuda

        return generate_cuda(qm.model, ids, max_new_tokens, device=device, **kw)
    from fp_export.runtime.linear import to_gpu_runtime

    if device not in qm.runtimes:
        qm.runtimes[device] = to_gpu_runtime(copy.deepcopy(qm.model), device=device)
    return run(qm.runtimes[device], ids, max_new_tokens, **kw)


def deploy(qm: QuantizedModel | str | Path, repo: str | Path, *, name: str | None = None, backend: str = "python",
           env: str | Path | None = None, overwrite: bool = False, plugin: str | Path | None = None,
           max_batch_size: int = 8, device: str = "") -> dict:
    """A Triton Inference Server model repository for the checkpoint of ``qm`` (a loaded model or
    its directory): ``python`` (generation ``<name>`` with streaming, and ``<name>_logits``),
    ``onnxruntime`` or ``tensorrt``. Returns {"repository", "models", "backend", "command"}."""
    from fp_export.deploy import deploy as write_repository

    src = qm.path if isinstance(qm, QuantizedModel) else Path(qm)
    return write_repository(src, Path(repo), name, backend, env, overwrite, plugin, max_batch_size, device)


def serve(repos: str | Path | list, http_port: int = 8000, grpc_port: int = 8001, host: str = "127.0.0.1",
          log: str | Path | None = None, timeout: float = 300.0):
    """Start the bundled ``tritonserver`` on model repositories; returns a ``TritonServer`` (a
    context manager with ``.stop()``, ``.http_url``, ``.grpc_url``) once it is ready."""
    from fp_export.deploy import serve as start

    return start(repos, http_port, grpc_port, host, None if log is None else Path(log), timeout=timeout)

