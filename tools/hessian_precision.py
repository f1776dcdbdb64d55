"""Float32 or float64 Hessians for GPTQ? A measurement on the default model (issue 9, item 4).

For every linear of the embedded model, the Hessian H = 2/n X^T X of its inputs over the recipe's
calibration windows (the unquantized model's activations) is accumulated twice: in float64 (what
``quant.gptq.HessianAccumulator`` does) and in float32 (a float32 sum of float32 X^T X products).
GPTQ by ``--recipe``'s weight grid runs on each; reported per linear: the float32 Hessian's
relative Frobenius error against the float64 one, the layer output error tr(E H64 E^T) of each
result (E = W - dequant(Q), H64 the reference), their ratio, and the share of weight codes that
differ. Writes ``<out>/hessian_precision.json`` and ``.md``.

    PYTHONPATH=$PWD python tools/hessian_precision.py --out benchmarks
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from fp_export.data.corpus import calibration_batch, load_text
from fp_export.evaluate.perplexity import model_seqlen, tokenize
from fp_export.hf.families import decoder_layers, linears
from fp_export.hf.loading import DEFAULT_MODEL, load_model
from fp_export.ptq.sequential import output_error
from fp_export.quant.gptq import HessianAccumulator, gptq
from fp_export.quant.quantizer import WeightQuantizer
from fp_export.quant.recipe import load_recipe


class Float32Accumulator:
    """H = 2/n sum x x^T summed in float32 (the alternative under test)."""

    def __init__(self, width: int):
        self.sum = torch.zeros(width, width)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += x.T @ x
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return (2.0 / self.rows) * self.sum.double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--recipe", default="w4a8-fp4-m2")
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    model, tok, _ = load_model(args.model)
    cal = recipe.calibration
    calib = calibration_batch(tokenize(tok, load_text(cal.source)), cal.nsamples,
                              model_seqlen(model, cal.seqlen), cal.seed)
    accs: dict[str, tuple[HessianAccumulator, Float32Accumulator]] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        for name, m in linears(layer).items():
            key = f"layers.{i}.{name}"
            accs[key] = (HessianAccumulator(m.in_features), Float32Accumulator(m.in_features))

            def hook(_m, a, _o, key=key):
                for acc in accs[key]:
                    acc.add(a[0].detach())
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for row in calib:
            model(row[None], use_cache=False)
    for h in handles:
        h.remove()
    wc = recipe.weights
    rows = []
    for i, layer in enumerate(decoder_layers(model)):
        for name, m in linears(layer).items():
            key = f"layers.{i}.{name}"
            h64, h32 = accs[key][0].hessian(), accs[key][1].hessian()
            w = m.weight.detach().float()
            q = [gptq(w, h, WeightQuantizer(wc.format, wc.group_size, wc.scale_constraint), wc.gptq.damp,
                      wc.gptq.block_size, wc.gptq.act_order, key) for h in (h64, h32)]
            e64, e32 = (output_error(w, x.dequantize(), h64) for x in q)
            rows.append({"linear": key, "hessian_rel_error": float((h32 - h64).norm() / h64.norm()),
                         "error_h64": e64, "error_h32": e32, "ratio": e32 / e64,
                         "codes_differing": float((q[0].codes != q[1].codes).float().mean())})
            print(json.dumps(rows[-1]), flush=True)
    ratios = [r["ratio"] for r in rows]
    report = {"model": args.model.name, "recipe": recipe.name, "calibration": f"{cal.nsamples}x{calib.shape[1]}",
              "machine": f"{platform.machine()}, torch {torch.__version__}", "rows": rows,
              "total_ratio": sum(r["error_h32"] for r in rows) / sum(r["error_h64"] for r in rows),
              "max_ratio": max(ratios), "min_ratio": min(ratios)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hessian_precision.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# GPTQ with float32 vs float64 Hessians: `{report['model']}`, {recipe.name}", "",
          f"Calibration {report['calibration']} tokens; {report['machine']}; `tools/hessian_precision.py`. "
          "Output error = tr(E H64 E^T) with the float64 Hessian as the reference.", "",
          f"Summed over the {len(rows)} linears, float32 / float64 output error = **{report['total_ratio']:.5f}** "
          f"(per linear {report['min_ratio']:.5f}..{report['max_ratio']:.5f}).", "",
          "| linear | H32 relative error | error (H64) | error (H32) | ratio | codes differing |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['linear']} | {r['hessian_rel_error']:.2e} | {r['error_h64']:.4g} | {r['error_h32']:.4g} | "
           f"{r['ratio']:.5f} | {100 * r['codes_differing']:.2f}% |" for r in rows]
    (args.out / "hessian_precision.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:6]))


if __name__ == "__main__":
    main()
