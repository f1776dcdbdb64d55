"""``fp-export``: quantize, eval, export, validate, build. Bad input exits 2 with one clear line."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fp_export.model import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)
out = Console()

MODEL_HELP = "Local Hugging Face model directory or .gguf file (default: the embedded kjv-llama-15m)."


def _user_errors() -> tuple[type[BaseException], ...]:
    from fp_export.checkpoint import CheckpointError
    from fp_export.export.onnx import ExportError
    from fp_export.model import ModelError
    from fp_export.recipe import RecipeError

    return (CheckpointError, ExportError, ModelError, RecipeError, FileNotFoundError, FileExistsError,
            ValueError)


@contextmanager
def user_errors():
    """Turn the project's input errors into 'error: ...' on stderr and exit code 2."""
    try:
        yield
    except _user_errors() as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None


@contextmanager
def progress_bars(enabled: bool = True):
    """A rich progress display and a ``(task, done, total)`` callback that drives it."""
    prog = Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, disable=not enabled, transient=False)
    tasks: dict[str, int] = {}

    def update(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = prog.add_task(name, total=total)
        prog.update(tasks[name], completed=done, total=total)

    with prog:
        yield update


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
):
    """Quantize a causal LM by a recipe into an fp-export checkpoint."""
    from fp_export.pipeline import quantize_to_checkpoint
    from fp_export.recipe import load_recipe

    _quiet_transformers()
    with user_errors():
        r = load_recipe(recipe)
        cal = {k: v for k, v in (("nsamples", nsamples), ("seqlen", seqlen)) if v is not None}
        if cal:
            r = r.model_copy(update={"calibration": r.calibration.model_copy(update=cal)})
        with progress_bars() as bar:
            manifest = quantize_to_checkpoint(
                model, r, out_dir, resume=resume, overwrite=overwrite,
                eval_text="test" if evaluate else None, max_eval_windows=max_eval_windows, progress=bar,
            )
    _print_summary(manifest, out_dir)


def _print_summary(manifest: dict, out_dir: Path) -> None:
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
    table.add_row("time", f"{manifest.get('seconds', 0):.1f} s")
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
    from fp_export.data import load_text
    from fp_export.evaluate import model_seqlen, perplexity, tokenize
    from fp_export.pipeline import load_any

    _quiet_transformers()
    with user_errors():
        m, tok, _ = load_any(model)
        ids = tokenize(tok, load_text(text))
        with progress_bars(not as_json) as bar:
            res = perplexity(m, ids, model_seqlen(m, seqlen), max_windows, lambda i, n: bar("eval", i, n))
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
    import time

    from fp_export.export.onnx import check, export_checkpoint

    _quiet_transformers()
    t0 = time.time()
    with user_errors():
        path = export_checkpoint(model, out_file, reference=reference)
        check(path)
    size = path.stat().st_size + (path.parent / f"{path.name}.data").stat().st_size
    out.print(f"wrote {path} (+ {path.name}.data, {size / 2**20:.1f} MiB) in {time.time() - t0:.1f} s; "
              "onnx.checker and strict shape inference passed")


@app.command()
def validate(
    model: Path = typer.Option(..., help="fp-export checkpoint directory (the PyTorch reference)."),
    onnx_file: Optional[Path] = typer.Option(None, "--onnx", help="Exported graph to run in ONNX Runtime."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime, or gpu: the CUDA runtime vs the ONNX Runtime reference."),
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
    from fp_export.checkpoint import load_checkpoint
    from fp_export.data import load_text
    from fp_export.evaluate import eval_windows, model_seqlen, tokenize
    from fp_export.validate import OnnxFileError, load_onnx_for_ort, validate_onnx

    _quiet_transformers()
    with user_errors():
        try:
            m, tok, _ = load_checkpoint(model)
            ids = eval_windows(tokenize(tok, load_text(text)), model_seqlen(m, seqlen), windows)
            if save_inputs is not None:
                from polygraphy.json import save_json

                save_json([{"input_ids": b.numpy()} for b in ids.split(4)], str(save_inputs))
            if backend == "onnxruntime":
                if onnx_file is None:
                    raise ValueError("--onnx is required with --backend onnxruntime")
                report = validate_onnx(m, load_onnx_for_ort(onnx_file), ids, precision)
            elif backend == "gpu":
                from fp_export.runtime.validate import compare_gpu

                if precision != "float32":
                    raise ValueError("--backend gpu runs the GPU kernels as deployed: pass --precision float32")
                report = compare_gpu(m, model, onnx_file, ids)
            else:
                raise ValueError(f"unknown backend {backend!r}: onnxruntime or gpu")
        except OnnxFileError as e:
            raise ValueError(str(e)) from None
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
    from fp_export.trt_build import PLUGIN_LIB, BuildUnavailable, build_engine

    try:
        with user_errors():
            path = build_engine(onnx_file, plan, plugin or PLUGIN_LIB, timing_cache, max_batch, max_seq)
    except BuildUnavailable as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    out.print(f"wrote {path}")
