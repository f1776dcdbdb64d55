#!/usr/bin/env bash
# Issue 12's tables on the offline GPU machine (device tool): SmolLM2-135M-Instruct through every
# bundled recipe, the study recipes (benchmarks/study_recipes/) on SmolLM2 and on the embedded
# model, and NVIDIA ModelOpt's FP8 / INT4-AWQ / W4A8-AWQ in the same protocol, all with
# --device cuda (quantized layer by layer on the GPU, evaluated there).
#
# Run in the repository root whose fp_export package is to be measured:
#     OUT=... bash tools/smollm2_device.sh STEP...
# Steps, in the order they are needed (each does nothing that is already done, so a step stopped
# by the call's time limit continues in the next call while the machine stays warm):
#   stage    copy what stage_smollm2_device.sh put in <this script's tree>/stage (a GGUF part, the
#            wheels in site-*.tar.gz, the GGUF's sha256 and part list) into $WORK
#   seed     copy the committed SmolLM2 tables (benchmarks/) into the results, so that the steps
#            below run only the rows missing on this machine
#   convert  once every part is there: reassemble, check the sha256, fp-export convert --gguf
#   bundled  tools/paper_table.py, every bundled recipe on SmolLM2 (paper_table_smollm2-135m-instruct)
#   study    the study recipes on SmolLM2 (study_smollm2-135m-instruct), in SHARDS (default 4)
#            paper_table processes side by side on the one GPU, merged into one table
#   default  the study recipes and their bases on the embedded model (study_kjv-llama-15m)
#   modelopt tools/compare_modelopt.py --device cuda, the configurations without a row on this machine
# Steps joined by + run side by side (e.g. bundled+study+modelopt).
# Every call ends by packing the results so far and the log into $OUT/results.tgz.
# WORK (default /tmp/fpx) holds the parts, the converted model and the results between calls;
# DEADLINE (epoch seconds; default now + 540) stops a step in time for the packing to run.
set -uo pipefail
T=$(cd "$(dirname "$0")/.." && pwd)  # tools/, benchmarks/study_recipes/ and stage/ of this script's tree
W=${WORK:-/tmp/fpx}
OUT=${OUT:-$W/out}
DEADLINE=${DEADLINE:-$(( $(date +%s) + 540 ))}
M=$W/smollm2-135m-instruct
mkdir -p "$W/parts" "$W/res" "$OUT"
export PYTHONPATH=$PWD:$W/site PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
LOG=$W/res/log.txt
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - $(date +%s) - 20 )); }  # 20 s kept for pack
py() {  # python3 under the time left; output to the log
  local t; t=$(left)
  if [ "$t" -lt 30 ]; then log "skipped (only ${t}s left): $*"; return 124; fi
  timeout "$t" python3 "$@" 2>&1 | grep --line-buffered -v -E "Loading weights|^fp-export: layer|it/s\]" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}; log "rc=$rc: python3 $*"; return "$rc"
}
need_model() { [ -f "$M/model.safetensors" ] || { log "no converted model at $M: run stage/convert first"; return 1; }; }

merge() {  # $W/res/shard*/NAME.json and $W/res/NAME.json into $W/res/NAME.json (+ .md, .png): per recipe a
           # shard's row first, a GPU row over a CPU one
  python3 - "$T/tools" "$W/res" "$1" "$M" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from paper_table import markdown, plot, write_atomic
res, name, model = Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]).name
on_gpu = lambda r: not r["device"].startswith("CPU")  # noqa: E731
rows = {}
for f in sorted(res.glob(f"shard*/{name}.json")) + [res / f"{name}.json"]:
    for r in json.loads(f.read_text()) if f.is_file() else []:
        if r["recipe"] not in rows or on_gpu(r) > on_gpu(rows[r["recipe"]]):
            rows[r["recipe"]] = r
if rows:
    rows = sorted(rows.values(), key=lambda r: r["recipe"])
    write_atomic(res / f"{name}.json", json.dumps(rows, indent=2) + "\n")
    write_atomic(res / f"{name}.md", markdown(rows, model, None))
    plot(rows, res / f"{name}.png", model)
print(f"{name}: {len(rows)} rows merged")
PY
}

one() {
  local step=$1
  case $step in
    seed)
      for f in paper_table_smollm2-135m-instruct study_smollm2-135m-instruct modelopt_smollm2-135m-instruct; do
        [ -f "$W/res/$f.json" ] || cp "benchmarks/$f.json" "$W/res/" && log "seeded $f.json"
      done
      ;;
    stage)
      cp -n "$T"/stage/gguf.part[0-9]* "$W/parts/" 2>/dev/null
      cp "$T"/stage/gguf.sha256 "$T"/stage/gguf.parts "$W/" 2>/dev/null
      for t in "$T"/stage/site-*.tar.gz; do  # wheels unpacked (site-core: pydantic, gguf; site-modelopt)
        [ -f "$t" ] && mkdir -p "$W/site" && tar xzf "$t" -C "$W/site" && log "unpacked $(basename "$t")"
      done
      nvidia-smi -L | tee -a "$LOG"
      python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$LOG"
      log "parts here: $(cd "$W/parts" && ls | tr '\n' ' ')"
      ;;
    convert)
      [ -f "$M/model.safetensors" ] && { log "converted model already at $M"; return 0; }
      missing=$(cd "$W/parts" && while read -r name size; do
        [ "$(stat -c %s "$name" 2>/dev/null)" = "$size" ] || echo "$name"; done < "$W/gguf.parts")
      [ -n "$missing" ] && { log "parts missing: $missing"; return 1; }
      read -r sha file < "$W/gguf.sha256"
      (cd "$W/parts" && cut -d' ' -f1 "$W/gguf.parts" | xargs cat) > "$W/$file"
      echo "$sha  $W/$file" | sha256sum -c - | tee -a "$LOG" || { log "sha256 mismatch: $file"; exit 1; }
      py -c 'from fp_export.cli import app; app()' convert --gguf "$W/$file" --out "$M" || exit 1
      (cd "$M" && sha256sum model.safetensors) | tee -a "$LOG"
      ;;
    bundled)
      need_model && py "$T/tools/paper_table.py" --model "$M" --device cuda --out "$W/res" --skip-existing
      ;;
    study)
      need_model || return 1
      local name=study_smollm2-135m-instruct k i sel todo
      merge "$name"  # rows of an earlier call's shards first
      mapfile -t todo < <(python3 -c 'import json, sys, pathlib
p = pathlib.Path(sys.argv[1])
done = {r["recipe"] for r in json.loads(p.read_text()) if not r["device"].startswith("CPU")} if p.is_file() else set()
for f in sys.argv[2:]:
    if pathlib.Path(f).stem not in done:
        print(f)' "$W/res/$name.json" "$T"/benchmarks/study_recipes/w*.yaml)
      log "study: ${#todo[@]} recipe(s) without a row on this machine"
      for (( k = 0; k < ${SHARDS:-4} && k < ${#todo[@]}; k++ )); do
        sel=(); for i in "${!todo[@]}"; do (( i % ${SHARDS:-4} == k )) && sel+=("${todo[$i]}"); done
        rm -rf "$W/res/shard$k" && mkdir -p "$W/res/shard$k"
        OMP_NUM_THREADS=2 py "$T/tools/paper_table.py" --model "$M" --device cuda --out "$W/res/shard$k" \
          --recipes "${sel[@]}" --name "$name" &
      done
      wait
      merge "$name"
      ;;
    default)
      py "$T/tools/paper_table.py" --device cuda --out "$W/res" --skip-existing --name study_kjv-llama-15m \
        --recipes w16a16 w4a8-fp4 w4a8-fp4-m2 w4a8-fp4-m2-lorc "$T"/benchmarks/study_recipes/w*.yaml
      ;;
    modelopt)
      need_model || return 1
      local todo
      todo=$(python3 -c 'import json, sys, os
p = sys.argv[1]
done = {r["config"] for r in json.load(open(p))["rows"] if r.get("machine", "").startswith("GPU")} if os.path.exists(p) else set()
print(" ".join(c for c in ("fp8", "int4_awq", "w4a8_awq") if c not in done))' "$W/res/modelopt_smollm2-135m-instruct.json")
      [ -z "$todo" ] && { log "modelopt: every configuration done"; return 0; }
      py "$T/tools/compare_modelopt.py" --model "$M" --device cuda --configs $todo --append ${MODELOPT_ARGS:-} \
        --ours "$W/res/paper_table_smollm2-135m-instruct.json" --out "$W/res"
      ;;
    *) log "unknown step $step"; exit 2 ;;
  esac
}

for group in "$@"; do  # a+b+c: the steps a, b and c side by side
  IFS=+ read -ra steps <<< "$group"
  for step in "${steps[@]}"; do one "$step" & done
  wait
done
tar czf "$OUT/results.tgz" -C "$W" res && ls -l "$OUT"
