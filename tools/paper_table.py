"""Reproduce ZeroQuant-FP's comparison on one model: every bundled recipe, test perplexity each.

Writes ``<out>/paper_table.md`` (Markdown table, with the delta against W16A16), ``paper_table.json``
and ``paper_table.png`` (perplexity per recipe). Example (the README's table):
    python tools/paper_table.py --out benchmarks/
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from fp_export.hf.loading import DEFAULT_MODEL
from fp_export.ptq.job import quantize_to_checkpoint
from fp_export.quant.recipe import bundled_recipes, load_recipe

ORDER = ["w16a16", "w8a8-int8", "w8a8-fp8", "w8a8-fp8-static", "w4a8-int4", "w4a8-fp4", "w4a8-fp4-lorc",
         "w4a8-fp4-m1", "w4a8-fp4-m2", "w4a8-fp4-m2-lorc"]


def run(model: Path, recipes: list[str], nsamples: int | None, max_windows: int | None) -> list[dict]:
    rows = []
    with Progress(console=Console(stderr=True)) as prog, tempfile.TemporaryDirectory() as tmp:
        task = prog.add_task("recipes", total=len(recipes))
        for name in recipes:
            r = load_recipe(name)
            if nsamples:
                r = r.model_copy(update={"calibration": r.calibration.model_copy(update={"nsamples": nsamples})})
            t0 = time.time()
            m = quantize_to_checkpoint(model, r, Path(tmp) / r.name, max_eval_windows=max_windows)
            rows.append({"recipe": r.name, "description": r.description, **m["metrics"],
                         "calibration": f"{m['calibration']['nsamples']}x{m['calibration']['seqlen']}",
                         "seconds": round(time.time() - t0, 1)})
            prog.advance(task)
    return rows


def markdown(rows: list[dict], model_name: str) -> str:
    base = next((r["perplexity"] for r in rows if r["recipe"] == "w16a16"), None)
    lines = [f"Test perplexity of `{model_name}` ({rows[0]['tokens']} tokens, seqlen {rows[0]['seqlen']}; "
             f"calibration {rows[0]['calibration']} tokens; GPTQ where the recipe says so).", "",
             "| recipe | perplexity | vs W16A16 |", "|---|---|---|"]
    for r in rows:
        delta = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else "-"
        lines.append(f"| {r['recipe']} | {r['perplexity']:.3f} | {delta} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, model_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names = [r["recipe"] for r in rows]
    vals = [r["perplexity"] for r in rows]
    colors = ["#777" if n == "w16a16" else "#1f77b4" if "fp" in n else "#d62728" for n in names]
    ax.bar(names, vals, color=colors)
    lo = min(vals)
    ax.set_ylim(lo * 0.97, max(vals) * 1.01)
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title(f"ZeroQuant-FP recipes on {model_name}")
    ax.tick_params(axis="x", rotation=35)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--recipes", nargs="*", default=None, help="default: every bundled recipe")
    ap.add_argument("--nsamples", type=int, default=None, help="override calibration.nsamples")
    ap.add_argument("--max-windows", type=int, default=None, help="limit evaluation windows")
    args = ap.parse_args()
    names = args.recipes or [n for n in ORDER if n in bundled_recipes()] + [
        n for n in bundled_recipes() if n not in ORDER]
    rows = run(args.model, names, args.nsamples, args.max_windows)
    args.out.mkdir(parents=True, exist_ok=True)
    model_name = args.model.name
    (args.out / "paper_table.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "paper_table.md").write_text(markdown(rows, model_name))
    plot(rows, args.out / "paper_table.png", model_name)
    print(markdown(rows, model_name))


if __name__ == "__main__":
    main()
