"""Serve a W4A8 and a BF16 model of one shape from one Triton server (issue 11, item 4).

``run`` = ``prepare`` then ``serve``, meant to be started in the background on the GPU machine
(``tools/serve_h100_device.sh start``) while the benchmark client waits for ``<work>/server.json``:

1. prepare: the BF16 source model (``--shape 7b``: a LLaMA-2-7B-shaped model with random bf16
   weights written by ``tools/bench_quantize.make_model``, ``--layers`` of its 32 decoder layers;
   ``--shape default``: the embedded ``kjv-llama-15m``), its W4A8 checkpoint by the bundled
   ``w4a8-fp4-m2-lorc`` recipe with ``weights.method`` replaced by ``--method`` (``rtn``: the
   weights' bytes and the serving path are GPTQ's; only their values differ, which a speed
   benchmark does not see), and both deployed with ``fp_export.deploy`` into ``<work>/repo`` as
   python-backend models ``w4a8`` (the checkpoint) and ``bf16`` (the unquantized model
   directory, served by the same model.py: its plain ``nn.Linear`` layers run in bf16 in the
   same CUDA-graph decode engine).
2. serve: ``tritonserver`` on that repository with only the two generation models loaded (the
   ``*_logits`` validation models would load each model a second time); writes
   ``<work>/server.json`` {"grpc", "http", "pid"} once ready and runs until SIGTERM/SIGINT.

Every stage's seconds and the artifacts' sizes go to ``<work>/prepare.json``; a failure writes
``<work>/failed.txt`` with the error, so that a waiting client stops at once.

    PYTHONPATH=$PWD python tools/serve_h100.py run --shape 7b --work /tmp/s7b --env /tmp/senv --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPE = "w4a8-fp4-m2-lorc"
MODELS = ("bf16", "w4a8")  # Triton model names; the first is the benchmark's baseline


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _recipe(method: str, nsamples: int, seqlen: int):
    from fp_export.quant.recipe import Recipe, load_recipe

    r = load_recipe(RECIPE)
    return Recipe.model_validate({**r.model_dump(), "weights": {**r.weights.model_dump(), "method": method},
                                  "calibration": {**r.calibration.model_dump(), "nsamples": nsamples, "seqlen": seqlen}})


def prepare(shape: str, layers: int | None, work: Path, env: Path | None, device: str, method: str,
            nsamples: int, seqlen: int, max_batch_size: int) -> dict:
    """Source model, W4A8 checkpoint, repository ``work/repo``; returns the stage report."""
    from fp_export.deploy import deploy
    from fp_export.hf.loading import DEFAULT_MODEL
    from fp_export.ptq.job import quantize_to_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"shape": shape, "recipe": RECIPE, "method": method, "calibration": [nsamples, seqlen],
                    "max_batch_size": max_batch_size, "seconds": {}}
    t = time.perf_counter()
    if shape == "7b":
        from bench_quantize import SHAPES, make_model

        src = work / "bf16-model"
        n = layers or SHAPES["7b"]["num_hidden_layers"]
        make_model(src, SHAPES["7b"], n)
        report["layers"] = n
        report["model"] = (f"LLaMA-2-7B-shaped, random bf16 weights ({n} layers, hidden 4096, MLP 11008, 32 heads, "
                           "vocab 32000)")
    else:
        src = DEFAULT_MODEL
        report["model"] = f"embedded default model ({DEFAULT_MODEL.name})"
    report["seconds"]["make_model"] = time.perf_counter() - t
    report["bf16_model_bytes"] = _size(src)
    print(f"serve_h100: source model {src} ({report['bf16_model_bytes'] / 2**30:.2f} GiB) "
          f"in {report['seconds']['make_model']:.0f} s", flush=True)

    t = time.perf_counter()
    ckpt = work / "w4a8-ckpt"
    quantize_to_checkpoint(src, _recipe(method, nsamples, seqlen), ckpt, overwrite=True, eval_text=None,
                           device="cuda" if device == "cuda" else "cpu")
    report["seconds"]["quantize"] = time.perf_counter() - t
    report["w4a8_checkpoint_bytes"] = _size(ckpt)
    print(f"serve_h100: W4A8 checkpoint ({report['w4a8_checkpoint_bytes'] / 2**30:.2f} GiB) "
          f"in {report['seconds']['quantize']:.0f} s", flush=True)

    repo = work / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    t = time.perf_counter()
    for name, model in (("w4a8", ckpt), ("bf16", src)):
        deploy(model, repo, name=name, env=env, device=device, max_batch_size=max_batch_size)
        if model != DEFAULT_MODEL:  # the repository holds its own copy; the disk holds two 7B models at most
            shutil.rmtree(model)
    report["seconds"]["deploy"] = time.perf_counter() - t
    print(f"serve_h100: repository {repo} in {report['seconds']['deploy']:.0f} s", flush=True)
    return report


def serve_until_stopped(work: Path, report: dict, timeout: float) -> None:
    """Start the server on ``work/repo`` (generation models only), write ``server.json``, wait for a signal."""
    from fp_export.deploy import serve

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    t = time.perf_counter()
    server = serve(work / "repo", log=work / "server.log", load=list(MODELS), timeout=timeout)
    try:
        report["seconds"]["server_ready"] = time.perf_counter() - t
        (work / "prepare.json").write_text(json.dumps(report, indent=2) + "\n")
        tmp = work / "server.json.tmp"
        tmp.write_text(json.dumps({"grpc": server.grpc_url, "http": server.http_url, "pid": os.getpid(),
                                   "server_pid": server.process.pid, "models": list(MODELS)}))
        os.replace(tmp, work / "server.json")
        print(f"serve_h100: ready in {report['seconds']['server_ready']:.0f} s: gRPC {server.grpc_url}", flush=True)
        while not stop.wait(1.0):
            if server.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {server.process.returncode} (see server.log)")
    finally:
        print(f"serve_h100: server stopped, exit code {server.stop()}", flush=True)
        (work / "server.json").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("prepare", "run"))
    ap.add_argument("--shape", choices=("7b", "default"), default="7b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the 7b shape (default 32)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--env", type=Path, default=None, help="serving environment (EXECUTION_ENV_PATH); default: this one")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    ap.add_argument("--nsamples", type=int, default=1, help="calibration windows (RTN needs data only to run the layers)")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--max-batch-size", type=int, default=32, help="the generation models' dynamic batch limit")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for the server to load the models")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    (a.work / "failed.txt").unlink(missing_ok=True)
    try:
        report = prepare(a.shape, a.layers, a.work, a.env, a.device, a.method, a.nsamples, a.seqlen, a.max_batch_size)
        (a.work / "prepare.json").write_text(json.dumps(report, indent=2) + "\n")
        if a.step == "run":
            serve_until_stopped(a.work, report, a.timeout)
    except BaseException:
        (a.work / "failed.txt").write_text(traceback.format_exc())
        raise


if __name__ == "__main__":
    main()
