"""``fp-export``: quantize, eval, export, validate, build, generate, deploy, serve. Each command parses
its options, calls the Python API (``fp_export``) and prints; bad input exits 2 with one clear line."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import fp_export as fx
from fp_export import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)
out = Console()

MODEL_HELP = "Local Hugging Face model directory or .gguf file (default: the embedded kjv-llama-15m)."


def _user_errors() -> tuple[type[BaseException], ...]:
    from fp_export.build.engine import BuildUnavailable
    from fp_export.checkpoint.layout import CheckpointError
    from fp_export.hf.loading import ModelError
    from fp_export.ptq.device import DeviceError
    from fp_export.quant.recipe import RecipeError

    return (BuildUnavailable, CheckpointError, ModelError, RecipeError, DeviceError, FileNotFoundError,
            FileExistsError, ValueError)


@contextmanager
def user_errors():
    """Turn the project's input errors into 'error: ...' on stderr and exit code 2."""
    try:
        yield
    except _user_errors() as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None


@contextmanager
def progress_bars(enabled: bool = True):
    """A rich progress display and a ``(task, done, total)`` callback that drives it. When stderr
    is not a terminal (CI, services) rich shows nothing live: plain log lines go to stderr instead,
    one per step, with the ``fp_export`` logger's INFO lines (per-layer times) alongside."""
    if enabled and not err.is_terminal:
        with log_lines() as update:
            yield update
        return
    prog = Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, disable=not enabled, transient=False)
    tasks: dict[str, int] = {}

    def update(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = prog.add_task(name, total=total)
        prog.update(tasks[name], completed=done, total=total)

    with prog:
        yield update


@contextmanager
def log_lines():
    """``(task, done, total)`` callback printing "fp-export: <task> <done>/<total> (<s> s)" lines to
    stderr, and the ``fp_export`` logger at INFO on stderr, for the duration."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fp-export: %(message)s"))
    logger = logging.getLogger("fp_export")
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    t0 = time.time()

    def update(name: str, done: int, total: int) -> None:
        # layers: the logger's per-layer line says each; other tasks: about every tenth step
        step = total if name == "layers" else max(1, total // 10)
        if done == total or (done and done % step == 0):
            print(f"fp-export: {name} {done}/{total} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)

    try:
        yield update
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@app.command()
def quantize(
    recipe: str = typer.Option(..., help="Recipe YAML file or bundled name (e.g. w4a8-fp4-m2-lorc)."),
    out_dir: Path = typer.Option(..., "--out", help="Checkpoint directory to write."),
    model: Path = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its per-layer state."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    nsamples: Optional[int] = typer.Option(None, min=1, help="Override calibration.nsamples."),
    seqlen: Optional[int] = typer.Option(None, min=8, help="Override calibration.seqlen."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Measure test perplexity and record it."),
    max_eval_windows: Optional[int] = typer.Option(None, min=1, help="Limit evaluation windows."),
    device: str = typer.Option("cpu", help="cpu (whole model in float32); cuda (lazy loading, one decoder layer "
                                            "at a time on the GPU); auto (cuda when there is a GPU)."),
    max_gpu_memory: Optional[float] = typer.Option(None, min=0.01, help="GiB the job may allocate on the GPU "
                                                   "(default: all free); hidden states that do not fit spill to "
                                                   "pinned CPU memory."),
):
    """Quantize a causal LM by a recipe into an fp-export checkpoint."""
    _quiet_transformers()
    cal = {k: v for k, v in (("nsamples", nsamples), ("seqlen", seqlen)) if v is not None}
    t0 = time.time()
    with user_errors(), progress_bars() as bar:
        qm = fx.quantize(model, recipe, out=out_dir, calibration=cal or None, resume=resume, overwrite=overwrite,
                         evaluate=evaluate, max_eval_windows=max_eval_windows, progress=bar, device=device,
                         max_gpu_memory=max_gpu_memory)
    peak = None
    if (qm.manifest.get("device") or {}).get("type") == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated()
    _print_summary(qm.manifest, out_dir, time.time() - t0, peak)


def _print_summary(manifest: dict, out_dir: Path, seconds: float, peak_gpu: int | None = None) -> None:
    r = manifest["recipe"]
    w, a, lorc = r.get("weights"), r.get("activations"), r.get("lorc")
    table = Table(title=f"fp-export quantize: {r['name']}")
    table.add_column("item")
    table.add_column("value")
    table.add_row("quantized linears", str(len(manifest["layers"])))
    if w:
        g = w["group_size"] or "channel"
        table.add_row("weights", f"{w['format']} group {g} scales {w['scale_constraint']} ({w['method']})")
    table.add_row("activations", f"{a['format']} per {a['granularity']}" if a else "16-bit")
    table.add_row("lorc", f"rank {lorc['rank']} {lorc['factor_format']}" if lorc else "-")
    cal = manifest["calibration"]
    table.add_row("calibration", f"{cal['nsamples']} x {cal['seqlen']} tokens of {cal['source']}")
    m = manifest.get("metrics") or {}
    if m:
        table.add_row("perplexity", f"{m['perplexity']:.3f} ({m['tokens']} tokens, seqlen {m['seqlen']})")
    size = sum(f.stat().st_size for f in Path(out_dir).iterdir())
    table.add_row("checkpoint", f"{out_dir} ({size / 2**20:.1f} MiB)")
    table.add_row("time", f"{seconds:.1f} s")
    if peak_gpu is not None:
        table.add_row("device", f"{manifest['device']['name']}, peak GPU memory {peak_gpu / 2**30:.2f} GiB")
    out.print(table)


@app.command()
def convert(
    gguf_file: Path = typer.Option(..., "--gguf", help="GGUF file (llama.cpp) to convert."),
    out_dir: Path = typer.Option(..., "--out", help="Hugging Face model directory to write."),
    dtype: str = typer.Option("auto", help="auto (from the GGUF file type; bfloat16 for quantized types), "
                                           "bfloat16, float16 or float32."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
):
    """Convert a GGUF file into a Hugging Face safetensors directory (config, tokenizer, weights)."""
    import time

    from fp_export.hf.gguf import SIDECAR, convert_gguf

    _quiet_transformers()
    t0 = time.time()
    with user_errors():
        path = convert_gguf(gguf_file, out_dir, dtype=dtype, overwrite=overwrite)
    info = json.loads((path / SIDECAR).read_text())
    out.print(f"wrote {path} ({info['architecture']}, {info['dtype']}; source sha256 {info['sha256'][:16]}...) "
              f"in {time.time() - t0:.1f} s")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Option(DEFAULT_MODEL, help="Checkpoint, HF model directory or .gguf file."),
    text: str = typer.Option("test", help="Corpus split (train/validation/test) or a text file."),
    seqlen: Optional[int] = typer.Option(None, min=8, help="Window length (default min(2048, max positions))."),
    max_windows: Optional[int] = typer.Option(None, min=1, help="Score only the first N windows."),
    as_json: bool = typer.Option(False, "--json", help="Print {perplexity, tokens, seqlen} as JSON."),
):
    """Perplexity on held-out text (non-overlapping windows, the paper's protocol)."""
    _quiet_transformers()
    with user_errors(), progress_bars(not as_json) as bar:
        res = fx.evaluate(fx.load(model), text, seqlen, max_windows, lambda i, n: bar("eval", i, n))
    if as_json:
        print(json.dumps({"perplexity": res["perplexity"], "tokens": res["tokens"], "seqlen": res["seqlen"]}))
    else:
        out.print(f"perplexity {res['perplexity']:.4f} over {res['tokens']} tokens (seqlen {res['seqlen']})")


@app.command()
def export(
    model: Path = typer.Option(..., help="fp-export checkpoint directory."),
    out_file: Path = typer.Option(..., "--out", help="ONNX file to write (weights go to <out>.data)."),
    reference: bool = typer.Option(False, help="Write the ONNX Runtime reference graph (no custom ops)."),
):
    """Export a quantized checkpoint to ONNX (FP8 Q/DQ, Fp4ToFp8 custom op)."""
    _quiet_transformers()
    t0 = time.time()
    with user_errors():
        path = fx.export_onnx(fx.load(model), out_file, reference=reference)
    size = path.stat().st_size + (path.parent / f"{path.name}.data").stat().st_size
    out.print(f"wrote {path} (+ {path.name}.data, {size / 2**20:.1f} MiB) in {time.time() - t0:.1f} s; "
              "onnx.checker and strict shape inference passed")


@app.command()
def validate(
    model: Path = typer.Option(..., help="fp-export checkpoint directory (the PyTorch reference)."),
    onnx_file: Optional[Path] = typer.Option(None, "--onnx", help="Exported graph to run in ONNX Runtime."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime; gpu: the CUDA runtime vs the ONNX Runtime reference; "
                                                     "tensorrt: an engine (--engine) vs the ONNX Runtime reference."),
    engine: Optional[Path] = typer.Option(None, help="TensorRT engine for --backend tensorrt."),
    plugin: Optional[Path] = typer.Option(None, help="Fp4ToFp8 plugin library for --backend tensorrt."),
    text: str = typer.Option("test", help="Corpus split or text file for the input windows."),
    windows: int = typer.Option(8, min=1, help="Number of input windows."),
    seqlen: Optional[int] = typer.Option(None, min=8, help="Window length (default the model's, up to 2048)."),
    precision: str = typer.Option("float64", help="float64: the graph's function, float32 rounding noise removed "
                                                   "(onnxruntime backend); float32: the graph as exported."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    save_inputs: Optional[Path] = typer.Option(None, help="Also write the input windows as Polygraphy JSON "
                                                           "(for `polygraphy run --load-inputs`)."),
):
    """Compare a backend with the PyTorch quantized model (Polygraphy); exit 1 past tolerances."""
    _quiet_transformers()
    with user_errors():
        report = fx.validate(fx.load(model), onnx_file, windows=windows, text=text, seqlen=seqlen,
                             precision=precision, backend=backend, engine=engine, plugin=plugin,
                             save_inputs=save_inputs)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        table = Table(title=f"fp-export validate: {report['runner']} vs {report['reference']}")
        table.add_column("metric")
        table.add_column("value")
        for k, v in report.items():
            if k != "tolerances":
                table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
        out.print(table)
    if not report["passed"]:
        err.print("[bold red]validation failed[/]: outside the tolerances above")
        raise typer.Exit(1)


@app.command()
def build(
    onnx_file: Path = typer.Option(..., "--onnx", help="Exported (deployable) ONNX graph."),
    plan: Path = typer.Option(..., "--out", help="TensorRT engine file to write."),
    plugin: Optional[Path] = typer.Option(None, help="Plugin library (default plugins/build/libfp_export_trt_plugin.so)."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file to read and update."),
    max_batch: int = typer.Option(8, min=1),
    max_seq: int = typer.Option(2048, min=1),
):
    """Build a TensorRT engine (strongly typed, FP8) with the Fp4ToFp8 plugin."""
    with user_errors():
        path = fx.build_engine(onnx_file, plan, plugin=plugin, timing_cache=timing_cache, max_batch=max_batch,
                               max_seq=max_seq)
    out.print(f"wrote {path}")


@app.command()
def generate(
    model: Path = typer.Option(..., help="fp-export checkpoint or Hugging Face model directory."),
    prompt: str = typer.Option(..., help="Text to continue."),
    max_tokens: int = typer.Option(32, min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, min=0.0, help="0: greedy; > 0: sampled."),
    top_k: int = typer.Option(0, min=0, help="Sample among the k most likely tokens (0: all)."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, help="Seed of the sampler."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
):
    """Continue a prompt with the quantized model, streaming the text as it is generated."""
    _quiet_transformers()
    with user_errors():
        qm = fx.load(model)
        ids = qm.tokenizer(prompt, return_tensors="pt")["input_ids"]
        done: list[int] = []

        def stream(_step, tokens):
            done.append(int(tokens[0]))
            text = qm.tokenizer.decode(done)
            out.print(text[len(stream.shown):], end="", highlight=False, markup=False)
            stream.shown = text

        stream.shown = ""
        out.print(prompt, end="", highlight=False, markup=False)
        fx.generate(qm, ids, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    eos_token_id=qm.tokenizer.eos_token_id, on_token=stream, device=device)
    out.print()


@app.command()
def deploy(
    model: Path = typer.Option(..., help="fp-export checkpoint (or plain HF model) directory."),
    repo: Path = typer.Option(..., help="Triton model repository to write (created, or models added to it)."),
    name: Optional[str] = typer.Option(None, help="Model name (default: the checkpoint directory's name)."),
    backend: str = typer.Option("python", help="python (generation + logits, runs here), onnxruntime or tensorrt."),
    env: Optional[Path] = typer.Option(None, help="python backend: the virtual environment the models run in "
                                                  "(EXECUTION_ENV_PATH; default: this one)."),
    plugin: Optional[Path] = typer.Option(None, help="tensorrt: plugin library (default plugins/build/libfp_export_trt_plugin.so)."),
    max_batch_size: int = typer.Option(8, min=1, help="python: dynamic batch limit of the generation model."),
    device: str = typer.Option("", help="python: generation device, '' = CUDA when available, cpu or cuda."),
    overwrite: bool = typer.Option(False, help="Replace models of the same name in the repository."),
):
    """Write a Triton Inference Server model repository for a checkpoint."""
    _quiet_transformers()
    with user_errors():
        res = fx.deploy(model, repo, name=name, backend=backend, env=env, overwrite=overwrite, plugin=plugin,
                        max_batch_size=max_batch_size, device=device)
    out.print(f"wrote {res['repository']}: models {', '.join(res['models'])} ({res['backend']} backend)")
    out.print(f"serve it with: {res['command']}", highlight=False)


@app.command()
def serve(
    repo: list[Path] = typer.Option(..., help="Model repository (repeat for several)."),
    http_port: int = typer.Option(8000, min=0, max=65535, help="HTTP port (0: a free one)."),
    grpc_port: int = typer.Option(8001, min=0, max=65535, help="gRPC port (0: a free one)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind HTTP and gRPC to."),
    log: Optional[Path] = typer.Option(None, help="Write the server's log to this file (default: the terminal)."),
    timeout: float = typer.Option(300.0, min=1, help="Seconds to wait for the server to be ready."),
):
    """Start the bundled Triton Inference Server on a repository; Ctrl-C (or SIGTERM) stops it."""
    import signal

    from fp_export.deploy import ServerUnavailable

    try:
        with user_errors():
            server = fx.serve(repo, http_port, grpc_port, host, log, timeout=timeout)
    except ServerUnavailable as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    # `kill` (SIGTERM) stops the server as Ctrl-C does; SIGINT too when this process was started
    # with it ignored (a background job of a non-interactive shell, `nohup ... &`)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:  # from here on, Ctrl-C (KeyboardInterrupt) stops the server
        out.print(f"tritonserver ready: HTTP http://{server.http_url}  gRPC {server.grpc_url}  (Ctrl-C stops it)",
                  soft_wrap=True)
        while server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        code = server.stop()
    out.print(f"tritonserver stopped (exit code {code})")
    if code not in (0, -2):
        raise typer.Exit(1)
