"""Each study recipe's perplexity beside the bundled recipe it starts from (issue 12, item 4).

Reads the rows of ``tools/paper_table.py`` runs: ``--study`` (the study recipes' rows) and
``--bases`` (rows of the bundled recipes, W16A16 among them; may be the same file), and
``benchmarks/study_recipes/studies.yaml`` (each study file's base and the keys it changes). A row
is compared only with a base measured on the same machine, evaluation tokens and calibration
windows; anything else is an error naming the row. Writes ``<out>/<name>.md`` and ``.json``
(atomically). Example:
    python tools/study_table.py --study benchmarks/study_smollm2-135m-instruct.json \\
        --bases benchmarks/paper_table_smollm2-135m-instruct.json --name study_smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_table import write_atomic  # noqa: E402

from fp_export.quant.recipe import load_recipe  # noqa: E402

STUDY_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "study_recipes"


def flat(d: dict, prefix: str = "") -> dict:
    """Nested recipe dict -> {dotted key: leaf value}; lists are leaves."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def change(study_file: Path, base: str) -> str:
    """The keys a study recipe changes against its base, as ``key: base value -> study value``
    (an override as ``/match/ -> part=format``, naming only the parts it sets)."""
    study, base_r = load_recipe(study_file), load_recipe(base)
    s, b = flat(study.model_dump()), flat(base_r.model_dump())
    keys = sorted(k for k in s.keys() | b.keys() if s.get(k) != b.get(k) and k not in ("name", "description"))

    def show(key, recipe, flat_value):
        if key == "overrides" and recipe.overrides:
            return "; ".join(f"/{o.match}/ -> " + ", ".join(
                f"{k}={'none' if getattr(o, k) is None else getattr(getattr(o, k), 'format', getattr(o, k))}"
                for k in ("weights", "activations", "lorc") if k in o.model_fields_set) for o in recipe.overrides)
        return "none" if flat_value is None or flat_value == [] else str(flat_value)

    return ", ".join(f"{k}: {show(k, base_r, b.get(k))} -> {show(k, study, s.get(k))}" for k in keys)


def table(study: list[dict], bases: list[dict], index: dict, study_dir: Path) -> list[dict]:
    by_name = {r["recipe"]: r for r in bases}
    files = {load_recipe(study_dir / f).name: f for f in index}
    w16 = by_name.get("w16a16")
    out = []
    for r in study:
        if r["recipe"] not in files:
            raise SystemExit(f"study row {r['recipe']}: not a recipe of {study_dir / 'studies.yaml'}")
        entry = index[files[r["recipe"]]]
        b = by_name.get(entry["base"])
        if b is None:
            raise SystemExit(f"study row {r['recipe']}: its base {entry['base']} has no row in --bases")
        for key in ("device", "tokens", "seqlen", "calibration", "calibration_tokens_sha256"):
            if r[key] != b[key]:
                raise SystemExit(f"study row {r['recipe']}: {key} {r[key]!r} differs from its base "
                                 f"{b['recipe']}'s {b[key]!r}; measure both in the same protocol and machine")
        out.append({"recipe": r["recipe"], "base": b["recipe"], "change": change(study_dir / files[r["recipe"]], b["recipe"]),
                    "perplexity": r["perplexity"], "base_perplexity": b["perplexity"],
                    "vs_base_pct": 100 * (r["perplexity"] / b["perplexity"] - 1),
                    "w16a16_perplexity": w16["perplexity"] if w16 else None,
                    "vs_w16a16_pct": 100 * (r["perplexity"] / w16["perplexity"] - 1) if w16 else None,
                    "base_vs_w16a16_pct": 100 * (b["perplexity"] / w16["perplexity"] - 1) if w16 else None,
                    "seconds": r["seconds"], "base_seconds": b["seconds"], "device": r["device"],
                    "tokens": r["tokens"], "calibration": r["calibration"]})
    return out


def markdown(rows: list[dict], model: str) -> str:
    w16 = rows[0]["w16a16_perplexity"]
    lines = [f"Recipe options on `{model}`: each study recipe beside the bundled recipe it starts from, same "
             f"machine and protocol ({rows[0]['tokens']} test tokens; calibration {rows[0]['calibration']} tokens "
             f"of the train split). Machine: {rows[0]['device']}. "
             + (f"W16A16 perplexity {w16:.3f}. " if w16 else "")
             + "Negative change = better than the base.", "",
             "| study recipe | changes | base | base ppl (vs W16A16) | ppl (vs W16A16) | change vs base | seconds |",
             "|---|---|---|---|---|---|---|"]
    pct = lambda v: f" ({v:+.2f}%)" if v is not None else ""  # noqa: E731
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['change']} | {r['base']} | {r['base_perplexity']:.3f}"
                     f"{pct(r['base_vs_w16a16_pct'])} | {r['perplexity']:.3f}{pct(r['vs_w16a16_pct'])} | "
                     f"{r['vs_base_pct']:+.2f}% | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--study", type=Path, required=True, help="paper_table JSON of the study recipes")
    ap.add_argument("--bases", type=Path, required=True, help="paper_table JSON holding their bases and W16A16")
    ap.add_argument("--recipes-dir", type=Path, default=STUDY_DIR, help="study recipes and their studies.yaml")
    ap.add_argument("--model", required=True, help="model name for the header")
    ap.add_argument("--name", required=True, help="output file stem")
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = ap.parse_args()
    index = yaml.safe_load((args.recipes_dir / "studies.yaml").read_text())
    study = [r for r in json.loads(args.study.read_text()) if r["recipe"] not in {
        load_recipe(b).name for b in {e["base"] for e in index.values()} | {"w16a16"}}]
    rows = table(study, json.loads(args.bases.read_text()), index, args.recipes_dir)
    if not rows:
        raise SystemExit(f"{args.study}: no study recipe rows")
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / f"{args.name}.json", json.dumps(rows, indent=2) + "\n")
    write_atomic(args.out / f"{args.name}.md", markdown(rows, args.model))
    print(markdown(rows, args.model))


if __name__ == "__main__":
    main()
