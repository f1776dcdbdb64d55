"""Reproduce ZeroQuant-FP's comparison on one model: every bundled recipe, test perplexity each.

Writes ``<out>/<name>.md`` (Markdown table, with the delta against W16A16), ``<name>.json`` and
``<name>.png`` (perplexity per recipe); ``<name>`` is ``paper_table`` for the embedded model and
``paper_table_<model dir name>`` for another ``--model`` (a directory or a ``.gguf`` file).
``--name`` replaces ``<name>``. ``--recipes`` takes bundled names and recipe YAML files (a row is
named by the recipe's own ``name``). Each row records its wall and CPU seconds (calibration +
quantization + evaluation), the machine (the GPU's name with ``--device cuda``) and the torch
version. Token-wise dynamic activation-only recipes (``w16a8-*``) use no calibration data; they
run with a single calibration window. ``--cross-check JSON``: rows of another run of the same
model (another machine, say) listed under the table beside this run's rows of the same recipe.
Outputs are written atomically (a temporary sibling renamed into place). Examples:
    python tools/paper_table.py --out benchmarks/
    python tools/paper_table.py --model /path/smollm2-135m-instruct --recipes w16a16 w8a8-fp8 --out benchmarks/
    python tools/paper_table.py --model /path/smollm2-135m-instruct --device cuda \
        --recipes benchmarks/study_recipes/*.yaml --name study_smollm2-135m-instruct --out benchmarks/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from fp_export.hf.loading import DEFAULT_MODEL
from fp_export.ptq.device import resolve_device
from fp_export.ptq.job import quantize_to_checkpoint
from fp_export.quant.recipe import bundled_recipes, load_recipe

ORDER = ["w16a16", "w16a8-int8", "w16a8-fp8", "w8a8-int8", "w8a8-fp8", "w8a8-fp8-static", "w4a8-int4",
         "w4a8-fp4", "w4a8-fp4-lorc", "w4a8-fp4-m1", "w4a8-fp4-m2", "w4a8-fp4-m2-lorc"]


def uses_calibration(r) -> bool:
    """Whether a recipe reads its calibration windows (GPTQ Hessians or static activation scales)."""
    return (r.weights is not None and r.weights.method == "gptq") or (
        r.activations is not None and r.activations.granularity == "tensor")


def device_name(device: str | torch.device = "cpu") -> str:
    """The machine a run used, in words: the GPU's name for a CUDA device, else the CPU model and
    the cores this process may use; with the torch version."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"CPU: {cpu}, {len(os.sched_getaffinity(0))} cores, torch threads {torch.get_num_threads()}, "
            f"torch {torch.__version__}")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all: a temporary sibling, renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(model: Path, recipes: list, nsamples: int | None, max_windows: int | None,
        device: str = "cpu", on_row=None) -> list[dict]:
    """One row per recipe (``Recipe``), quantized and evaluated on ``device``; ``on_row(rows)`` is
    called after each row (the tables are rewritten then, so a run stopped early keeps its rows)."""
    machine = device_name(device)
    rows = []
    with Progress(console=Console(stderr=True)) as prog, tempfile.TemporaryDirectory() as tmp:
        task = prog.add_task("recipes", total=len(recipes))
        for r in recipes:
            n = (nsamples or r.calibration.nsamples) if uses_calibration(r) else 1
            r = r.model_copy(update={"calibration": r.calibration.model_copy(update={"nsamples": n})})
            t0, c0 = time.time(), time.process_time()
            m = quantize_to_checkpoint(model, r, Path(tmp) / r.name, max_eval_windows=max_windows, device=device)
            cal = m["calibration"]
            rows.append({"recipe": r.name, "description": r.description, **m["metrics"],
                         "calibration": f"{cal['nsamples']}x{cal['seqlen']}" if uses_calibration(r) else "none",
                         "calibration_tokens_sha256": cal["tokens_sha256"], "recipe_sha256": r.digest(),
                         "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
                         "load_average_1min": round(os.getloadavg()[0], 2), "device": machine})
            shutil.rmtree(Path(tmp) / r.name)
            if on_row:
                on_row(rows)
            prog.advance(task)
    return rows


def markdown(rows: list[dict], model_name: str, cross: list[dict] | None = None) -> str:
    """The table; one machine named in the header, or a machine column when the rows come from several
    (``--append`` across runs). ``cross``: rows of another run listed below beside this run's."""
    base = next((r["perplexity"] for r in rows if r["recipe"] == "w16a16"), None)
    cals = sorted({r["calibration"] for r in rows if r["calibration"] != "none"})
    cal = f"calibration {', '.join(cals)} tokens of the train split" if cals else "no calibration"
    machines = list(dict.fromkeys(r["device"] for r in rows))
    one = len(machines) == 1
    lines = [f"Test perplexity of `{model_name}` ({rows[0]['tokens']} tokens, seqlen {rows[0]['seqlen']}; "
             f"{cal}; GPTQ where the recipe says so). "
             + (f"Machine: {machines[0]}; " if one else "")
             + "seconds = calibration + quantization + evaluation, wall (CPU).", "",
             "| recipe | perplexity | vs W16A16 | calibration | seconds |" + ("" if one else " machine |"),
             "|---|---|---|---|---|" + ("" if one else "---|")]
    for r in rows:
        delta = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else "-"
        lines.append(f"| {r['recipe']} | {r['perplexity']:.3f} | {delta} | {r['calibration']} | "
                     f"{r['seconds']:.0f} ({r['cpu_seconds']:.0f}) |" + ("" if one else f" {r['device']} |"))
    mine = {r["recipe"]: r for r in rows}
    for c in cross or []:
        r = mine.get(c["recipe"])
        if r is None:
            continue
        if (c["tokens"], c["seqlen"]) != (r["tokens"], r["seqlen"]):
            raise SystemExit(f"cross-check row {c['recipe']}: evaluated on {c['tokens']} tokens at seqlen "
                             f"{c['seqlen']}, this run on {r['tokens']} at {r['seqlen']}")
        lines.append("")
        lines.append(f"Cross-check, {c['recipe']}: {r['perplexity']:.4f} here ({r['device']}) vs "
                     f"{c['perplexity']:.4f} on {c['device']} ({100 * (r['perplexity'] / c['perplexity'] - 1):+.3f}%).")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, model_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import io

    fig, ax = plt.subplots(figsize=(max(9, 0.6 * len(rows)), 4))
    names = [r["recipe"] for r in rows]
    vals = [r["perplexity"] for r in rows]
    colors = ["#777" if n == "w16a16" else "#1f77b4" if "fp" in n else "#d62728" for n in names]
    ax.bar(names, vals, color=colors)
    lo = min(vals)
    ax.set_ylim(lo * 0.97, max(vals) * 1.01)
    ax.set_ylabel("test perplexity (lower is better)")
    machines = list(dict.fromkeys(r["device"].split(",")[0] for r in rows))
    ax.set_title(f"ZeroQuant-FP recipes on {model_name} ({'; '.join(machines)})", fontsize=10)
    ax.tick_params(axis="x", rotation=35)
    plt.setp(ax.get_xticklabels(), ha="right")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF model directory or .gguf file")
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--recipes", nargs="*", default=None,
                    help="bundled recipe names or recipe YAML files; default: every bundled recipe")
    ap.add_argument("--nsamples", type=int, default=None,
                    help="override calibration.nsamples of the recipes that use calibration")
    ap.add_argument("--max-windows", type=int, default=None, help="limit evaluation windows")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                    help="where to quantize and evaluate (cuda: layer by layer on the GPU)")
    ap.add_argument("--name", default=None, help="output file stem (default: paper_table[_<model>])")
    ap.add_argument("--cross-check", type=Path, default=None,
                    help="paper_table JSON of another run of the same model: its rows of the recipes run now "
                         "are listed under the table")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of an existing <name>.json, replacing those of the recipes run now")
    ap.add_argument("--skip-existing", action="store_true",
                    help="implies --append; recipes that already have a row in <name>.json made on this machine "
                         "are not run again (a run split over several sessions)")
    args = ap.parse_args()
    names = args.recipes or [n for n in ORDER if n in bundled_recipes()] + [
        n for n in bundled_recipes() if n not in ORDER]
    recipes = [load_recipe(n) for n in names]  # every recipe checked before the first long job
    dup = sorted({r.name for r in recipes if [x.name for x in recipes].count(r.name) > 1})
    if dup:
        raise SystemExit(f"recipes named more than once: {', '.join(dup)}")
    cross = json.loads(args.cross_check.read_text()) if args.cross_check else None
    model_name = args.model.stem if args.model.suffix == ".gguf" else args.model.name
    stem = args.name or ("paper_table" if args.model.resolve() == DEFAULT_MODEL else f"paper_table_{model_name}")
    old = json.loads((args.out / f"{stem}.json").read_text()) if (args.append or args.skip_existing) and (
        args.out / f"{stem}.json").is_file() else []
    order = {n: i for i, n in enumerate(dict.fromkeys(ORDER + [r.name for r in recipes]))}
    if args.skip_existing:
        machine = device_name(args.device)
        done = {r["recipe"] for r in old if r["device"] == machine}
        recipes = [r for r in recipes if r.name not in done]
        print(f"skipping {len(done)} recipe(s) with rows on {machine}; {len(recipes)} to run", flush=True)
    if not recipes and not old:
        raise SystemExit("no recipe to run and no rows to keep")
    args.out.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict]) -> list[dict]:
        new = {r["recipe"] for r in rows}
        rows = rows + [r for r in old if r["recipe"] not in new]
        rows.sort(key=lambda r: order.get(r["recipe"], len(order)))
        write_atomic(args.out / f"{stem}.json", json.dumps(rows, indent=2) + "\n")
        write_atomic(args.out / f"{stem}.md", markdown(rows, model_name, cross))
        plot(rows, args.out / f"{stem}.png", model_name)
        return rows

    rows = write(run(args.model, recipes, args.nsamples, args.max_windows, args.device, write) if recipes else [])
    print(markdown(rows, model_name, cross))


if __name__ == "__main__":
    main()
