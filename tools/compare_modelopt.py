"""NVIDIA ModelOpt on the same model, calibration windows and evaluation as fp-export's rows.

For each ModelOpt configuration: the model loaded as fp-export loads it (``load_model``: float32,
CPU), ``mtq.quantize(model, cfg, forward_loop)`` with ``forward_loop`` running the very windows
fp-export calibrates on (``data.calibration_batch`` of the train split, seed 0, same count and
length; their sha256 is recorded and compared with fp-export's rows), then test perplexity by
``evaluate.perplexity`` (the whole test split, non-overlapping windows of the model's seqlen up
to 2048). ModelOpt runs as fake quantization (quantize-dequantize in float32), which is what its
``mtq.quantize`` does on any device before export.

Configurations (ModelOpt names):
- ``fp8``: FP8_DEFAULT_CFG, W8A8 FP8 E4M3, per-tensor weight and static per-tensor input scales
  (max calibration);
- ``int4_awq``: INT4_AWQ_CFG, W4A16, INT4 weights in blocks of 128 along the input, AWQ-lite;
- ``w4a8_awq``: W4A8_AWQ_BETA_CFG, INT4 block-128 weights (AWQ-lite) and FP8 per-tensor inputs.
lm_head stays unquantized in all of them, as in fp-export's recipes.

Writes ``<out>/modelopt_<model>.json`` and ``.md``; with ``--ours`` (a ``paper_table`` JSON of the
same model) our rows and the W16A16 baseline are placed beside ModelOpt's, and the table checks
that both used the same calibration tokens. Example:
    python tools/compare_modelopt.py --model /path/smollm2-135m-instruct --nsamples 16 \\
        --ours benchmarks/paper_table_smollm2-135m-instruct.json --out benchmarks/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_table import device_name, write_atomic  # noqa: E402

from fp_export.data.corpus import calibration_batch, load_text  # noqa: E402
from fp_export.evaluate.perplexity import model_seqlen, perplexity, tokenize  # noqa: E402
from fp_export.hf.loading import DEFAULT_MODEL, check_model_dir, load_model  # noqa: E402

CONFIGS = {
    "fp8": ("FP8_DEFAULT_CFG", "W8A8: FP8 E4M3 weights per tensor, FP8 static per-tensor activations (max calibration)"),
    "int4_awq": ("INT4_AWQ_CFG", "W4A16: INT4 weights, blocks of 128 input columns, AWQ-lite"),
    "w4a8_awq": ("W4A8_AWQ_BETA_CFG", "W4A8: INT4 block-128 weights (AWQ-lite), FP8 per-tensor static activations"),
}
# the fp-export row each ModelOpt configuration is compared with (issue 12)
PEERS = {"fp8": ["w8a8-fp8", "w8a8-fp8-static"], "int4_awq": [], "w4a8_awq": ["w4a8-fp4-m2-lorc"]}


def tokens_sha256(t: torch.Tensor) -> str:
    """sha256 of the int64 calibration windows, as fp-export's manifest records them."""
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


class OnDevice(torch.nn.Module):
    """``model`` on ``device`` behind the CPU interface ``evaluate.perplexity`` calls: int64 ids
    [1, S] on the CPU in, ``.logits`` float32 [1, S, V] on the CPU out."""

    def __init__(self, model: torch.nn.Module, device: str):
        super().__init__()
        self.model, self.device, self.config = model, device, model.config

    def forward(self, ids: torch.Tensor, **kw):
        out = self.model(ids.to(self.device), **kw)
        out.logits = out.logits.float().cpu()
        return out


def run_config(model_dir: Path, key: str, calib: torch.Tensor, max_windows: int | None, device: str,
               batch: int = 1) -> dict:
    """One ModelOpt configuration: ``calib`` [n, seqlen] int64 windows fed ``batch`` at a time to its
    calibration loop (max calibration and AWQ-lite's statistics are sums/maxima over tokens, so the
    batch changes the time, and what is measured only by float rounding), then perplexity on the test split."""
    import modelopt.torch.quantization as mtq

    model, tok, _ = load_model(model_dir)
    model.to(device)
    cfg = getattr(mtq, CONFIGS[key][0])

    def forward_loop(m):
        with torch.no_grad():
            for rows in calib.split(batch):
                m(rows.to(device), use_cache=False)

    t0, c0 = time.time(), time.process_time()
    mtq.quantize(model, cfg, forward_loop)
    quant_s, quant_cpu = time.time() - t0, time.process_time() - c0
    quantized = sum(1 for n, m in model.named_modules() if n.endswith("weight_quantizer") and m.is_enabled)
    ids = tokenize(tok, load_text("test"))
    t1, c1 = time.time(), time.process_time()
    res = perplexity(OnDevice(model, device), ids, model_seqlen(model), max_windows)
    return {"config": key, "device": device, "machine": device_name(device), "calibration_batch": batch,
            "modelopt_config": CONFIGS[key][0],
            "description": CONFIGS[key][1], **res,
            "quantized_linears": quantized,
            "quantize_seconds": round(quant_s, 1), "quantize_cpu_seconds": round(quant_cpu, 1),
            "eval_seconds": round(time.time() - t1, 1), "eval_cpu_seconds": round(time.process_time() - c1, 1),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def markdown(report: dict, ours: list[dict]) -> str:
    rows = report["rows"]
    base = next((r["perplexity"] for r in ours if r["recipe"] == "w16a16"), None)
    delta = lambda p: f"{100 * (p / base - 1):+.2f}%" if base else "-"  # noqa: E731
    machines = "; ".join(dict.fromkeys(r.get("machine", report["device"]) for r in rows))
    lines = [f"Test perplexity of `{report['model']}` ({rows[0]['tokens']} tokens, seqlen {rows[0]['seqlen']}), "
             f"ModelOpt {report['versions']['nvidia-modelopt']} (fake quantization, torch "
             f"{report['versions']['torch']}) next to fp-export, same protocol: calibration "
             f"{report['calibration']['nsamples']}x{report['calibration']['seqlen']} tokens of the train split "
             f"(seed 0, tokens sha256 {report['calibration']['tokens_sha256'][:12]}...), whole test split. "
             f"Machine of the ModelOpt rows: {machines}.", "",
             "| tool | configuration | perplexity | vs W16A16 | quantize s | eval s | calibration batch |",
             "|---|---|---|---|---|---|---|"]
    for r in ours:
        same = r.get("calibration_tokens_sha256") == report["calibration"]["tokens_sha256"]
        mark = "" if r["calibration"] == "none" or same else " (other calibration windows)"
        lines.append(f"| fp-export | {r['recipe']}{mark} | {r['perplexity']:.3f} | {delta(r['perplexity'])} | "
                     f"{r['seconds']:.0f} (with eval) | | |")
    for r in rows:
        lines.append(f"| ModelOpt | {r['modelopt_config']} | {r['perplexity']:.3f} | {delta(r['perplexity'])} | "
                     f"{r['quantize_seconds']:.0f} | {r['eval_seconds']:.0f} | {r.get('calibration_batch', 1)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF model directory or .gguf file")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows (fp-export's recipes: 128)")
    ap.add_argument("--max-windows", type=int, default=None, help="limit evaluation windows")
    ap.add_argument("--calib-batch", type=int, default=1,
                    help="calibration windows per forward in ModelOpt's calibration loop (AWQ's search is "
                         "bound by Python per forward: 8 makes it several times faster on a GPU)")
    ap.add_argument("--ours", type=Path, default=None, help="paper_table JSON of the same model")
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (float32 model and fake quantization there)")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of an existing modelopt_<model>.json made with the same calibration windows, "
                         "replacing those of the configurations run now")
    args = ap.parse_args()

    model_dir = check_model_dir(args.model)
    name = args.model.stem if args.model.suffix == ".gguf" else args.model.name
    model, tok, _ = load_model(model_dir)
    seqlen = model_seqlen(model)
    calib = calibration_batch(tokenize(tok, load_text("train")), args.nsamples, seqlen, 0)
    del model
    report = {
        "model": name, "device": device_name(args.device),
        "versions": {p: version(p) for p in ("nvidia-modelopt", "torch", "transformers")},
        "calibration": {"source": "train", "nsamples": args.nsamples, "seqlen": seqlen, "seed": 0,
                        "tokens_sha256": tokens_sha256(calib)},
        "rows": [],
    }
    stem = f"modelopt_{name}"
    args.out.mkdir(parents=True, exist_ok=True)
    ours = json.loads(args.ours.read_text()) if args.ours else []
    old = args.out / f"{stem}.json"
    if args.append and old.is_file():
        prev = json.loads(old.read_text())
        if prev["calibration"]["tokens_sha256"] != report["calibration"]["tokens_sha256"]:
            raise SystemExit(f"{old}: made with other calibration windows; run without --append")
        report["rows"] = [r for r in prev["rows"] if r["config"] not in args.configs]
    for key in args.configs:
        report["rows"].append(run_config(model_dir, key, calib, args.max_windows, args.device, args.calib_batch))
        print(json.dumps(report["rows"][-1]), flush=True)
        # rewritten after every configuration so a long run leaves its finished rows
        write_atomic(args.out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
        write_atomic(args.out / f"{stem}.md", markdown(report, ours))
    print(markdown(report, ours))


if __name__ == "__main__":
    main()
