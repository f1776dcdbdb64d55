"""Quantize real-size model shapes on one GPU, layer by layer (issue 9, item 7).

1. ``--shape 7b``: a LLaMA-2-7B-shaped model (32 layers, hidden 4096, MLP 11008, 32 heads, vocab
   32000) with random weights (normal, std 0.02; norms 1) written as sharded bf16 safetensors +
   index on local disk, then ``fp-export quantize --device cuda`` by w4a8-fp4-m2-lorc with
   ``--nsamples`` x ``--seqlen`` calibration tokens (the packaged corpus, tokenized by the
   embedded model's tokenizer: ids < 4096 of the 32000-entry vocabulary).
2. ``--shape 70b``: ``--layers`` 70B-shaped decoder layers (hidden 8192, MLP 28672, GQA 64/8) through
   the same job: per-layer time and peak memory, and the 80-layer total extrapolated.

Each quantize runs in a child process (its own peak CPU RSS); stages are timed by wrapping the
job's functions with a CUDA synchronize on each side: load (materializing weights on the GPU),
calibration (layer forwards, Hessians, absmax), GPTQ, LoRC, write (checkpoint files). Results go
to ``<out>/bench_quantize_<shape>.json`` and ``.md`` (rewritten after each run, so a killed run
still leaves what finished).

    PYTHONPATH=$PWD python tools/bench_quantize.py --shape 7b --out benchmarks --workdir /tmp/bq
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
           "num_hidden_layers": 32, "vocab_size": 32000},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
            "num_hidden_layers": 80, "vocab_size": 32000},
}
RECIPE = "w4a8-fp4-m2-lorc"
SHARD_BYTES = 4 * 2**30


def make_model(path: Path, shape: dict, layers: int, seed: int = 0) -> float:
    """Random LLaMA-shaped bf16 model, sharded like Hugging Face; returns seconds taken."""
    from transformers import LlamaConfig

    from fp_export.hf.loading import DEFAULT_MODEL

    t0 = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEFAULT_MODEL / f, path / f)
    cfg = LlamaConfig(**{**shape, "num_hidden_layers": layers}, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, dtype="bfloat16")
    cfg.save_pretrained(path)
    h, m, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                       p + "mlp.down_proj.weight": (h, m)})
    gen = torch.Generator("cuda").manual_seed(seed)
    groups, size = [[]], 0
    for name, s in shapes.items():
        n = 2 * torch.Size(s).numel()
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    from safetensors.torch import save_file

    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            s = shapes[name]
            t = torch.ones(s, device="cuda") if len(s) == 1 else torch.randn(s, generator=gen, device="cuda") * 0.02
            tensors[name] = t.to(torch.bfloat16).cpu()
        save_file(tensors, path / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return time.perf_counter() - t0


def quantize_child(model: Path, out: Path, nsamples: int, seqlen: int, max_gpu_gib: float | None) -> dict:
    """Runs in the child process: the instrumented job; returns the measurements."""
    import logging

    import fp_export.ptq.job as job
    import fp_export.ptq.onload as onload
    import fp_export.ptq.sequential as seq
    from fp_export.quant.recipe import load_recipe

    stages = dict.fromkeys(("load", "calibration", "gptq", "lorc", "write"), 0.0)

    def timed(stage, fn):
        def wrapper(*a, **k):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.synchronize()
                stages[stage] += time.perf_counter() - t0
        return wrapper

    onload._materialize = timed("load", onload._materialize)
    seq.gptq = timed("gptq", seq.gptq)
    seq.lorc_factors = timed("lorc", seq.lorc_factors)
    onload._calibrate_and_replace = timed("calibration", onload._calibrate_and_replace)
    onload._run_layer = timed("calibration", onload._run_layer)
    onload.capture_layer_inputs = timed("calibration", onload.capture_layer_inputs)
    job.write_checkpoint = timed("write", job.write_checkpoint)
    layer_times: list[float] = []
    spilled = []

    class Collect(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            print("fp-export:", msg, flush=True)
            spilled.extend([msg] if "spill to pinned CPU memory" in msg else [])
            if msg.startswith("layer ") and " in " in msg:
                layer_times.append(float(msg.split(" in ")[1].split(" s")[0]))

    logging.getLogger("fp_export").addHandler(Collect())
    logging.getLogger("fp_export").setLevel(logging.INFO)
    r = load_recipe(RECIPE)
    r = r.model_copy(update={"calibration": r.calibration.model_copy(update={"nsamples": nsamples, "seqlen": seqlen})})
    t0 = time.perf_counter()
    cap = None if max_gpu_gib is None else int(max_gpu_gib * 2**30)
    manifest = job.quantize_to_checkpoint(model, r, out, overwrite=True, eval_text=None, device="cuda",
                                          max_gpu_bytes=cap)
    total = time.perf_counter() - t0
    # calibration's wrappers nest GPTQ and LoRC inside _calibrate_and_replace: report them apart
    stages["calibration"] -= stages["gptq"] + stages["lorc"]
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"total_s": total, "stages_s": stages, "layer_s": layer_times,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(),
            "max_gpu_gib": max_gpu_gib, "hidden_states": "pinned CPU memory" if spilled else "GPU",
            "peak_cpu_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "checkpoint_bytes": size, "checkpoint_files": sorted(f.name for f in out.iterdir()),
            "quantized_linears": len(manifest["layers"])}


def run_child(model: Path, out: Path, nsamples: int, seqlen: int, max_gpu_gib: float | None) -> dict:
    res = out.parent / f"{out.name}.result.json"
    cmd = [sys.executable, __file__, "--child", str(model), str(out), str(nsamples), str(seqlen), str(res),
           str(max_gpu_gib or "")]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return json.loads(res.read_text())


def write_report(out: Path, shape_name: str, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_quantize_{shape_name}.json").write_text(json.dumps(report, indent=2) + "\n")
    r = report.get("result")
    gib = 2**30
    md = [f"# fp-export quantize on {report['device']}: {shape_name}-shaped model", "",
          f"Recipe {RECIPE}; calibration {report['nsamples']} x {report['seqlen']} tokens; {report['layers']} layers "
          f"(random bf16 weights, sharded safetensors); torch {report['torch']}; one run.", ""]
    if r:
        md += ["| stage | seconds |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in r["stages_s"].items()]
        md.append(f"| other (model sha256 fingerprint, tokenizing, resume-state writes) | "
                  f"{r['total_s'] - sum(r['stages_s'].values()):.1f} |")
        md += [f"| **total (job)** | **{r['total_s']:.1f}** |", "",
               f"- per layer: median {statistics.median(r['layer_s']):.2f} s (min {min(r['layer_s']):.2f}, max "
               f"{max(r['layer_s']):.2f}) over {len(r['layer_s'])} layers",
               f"- peak GPU memory (torch.cuda.max_memory_allocated): {r['peak_gpu_bytes'] / gib:.2f} GiB "
               f"(reserved by the allocator: {r['peak_gpu_reserved_bytes'] / gib:.2f} GiB); job cap "
               f"{'none' if r['max_gpu_gib'] is None else str(r['max_gpu_gib']) + ' GiB'}; calibration hidden states "
               f"in {r['hidden_states']}",
               f"- peak CPU memory (max RSS of the quantize process): {r['peak_cpu_rss_bytes'] / gib:.2f} GiB",
               f"- checkpoint: {r['checkpoint_bytes'] / gib:.2f} GiB in {len(r['checkpoint_files'])} files",
               f"- writing the random model (not part of the job): {report['make_model_s']:.1f} s"]
        if "extrapolated_total_s" in report:
            md.append(f"- extrapolated to {report['full_layers']} layers: {report['extrapolated_total_s'] / 60:.1f} min "
                      "(job time minus per-layer time, plus the median layer time x layers)")
    (out / f"bench_quantize_{shape_name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, out, nsamples, seqlen, res, cap = sys.argv[2:]
        Path(res).write_text(json.dumps(quantize_child(Path(model), Path(out), int(nsamples), int(seqlen),
                                                       float(cap) if cap else None)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all of the shape)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_quantize"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--max-gpu-memory", type=float, default=None, help="GiB cap of the job (quantize's option)")
    ap.add_argument("--tag", default="", help="appended to the report's name after '_' (several runs of one shape)")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    layers = args.layers or shape["num_hidden_layers"]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": shape,
              "layers": layers, "full_layers": shape["num_hidden_layers"], "nsamples": args.nsamples,
              "seqlen": args.seqlen, "recipe": RECIPE}
    model = args.workdir / f"{args.shape}-model"
    report["make_model_s"] = make_model(model, shape, layers)
    name = args.shape + (f"_{args.tag}" if args.tag else "")
    write_report(args.out, name, report)
    r = run_child(model, args.workdir / f"{args.shape}-q", args.nsamples, args.seqlen, args.max_gpu_memory)
    report["result"] = r
    if layers < shape["num_hidden_layers"]:
        per = statistics.median(r["layer_s"])
        report["extrapolated_total_s"] = r["total_s"] - sum(r["layer_s"]) + per * shape["num_hidden_layers"]
    write_report(args.out, name, report)


if __name__ == "__main__":
    main()
