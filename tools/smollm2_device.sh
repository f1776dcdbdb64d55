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
#   convert  once every part is there: reassemble, check the sha256, fp-export convert --gguf
#   bundled  tools/paper_table.py, every bundled recipe on SmolLM2 (paper_table_smollm2-135m-instruct)
#   study    the study recipes on SmolLM2 (study_smollm2-135m-instruct)
#   default  the study recipes and their bases on the embedded model (study_kjv-llama-15m)
#   modelopt tools/compare_modelopt.py --device cuda, the configurations not yet done
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

for step in "$@"; do
  case $step in
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
      [ -f "$M/model.safetensors" ] && { log "converted model already at $M"; continue; }
      missing=$(cd "$W/parts" && while read -r name size; do
        [ "$(stat -c %s "$name" 2>/dev/null)" = "$size" ] || echo "$name"; done < "$W/gguf.parts")
      [ -n "$missing" ] && { log "parts missing: $missing"; continue; }
      read -r sha file < "$W/gguf.sha256"
      (cd "$W/parts" && cut -d' ' -f1 "$W/gguf.parts" | xargs cat) > "$W/$file"
      echo "$sha  $W/$file" | sha256sum -c - | tee -a "$LOG" || { log "sha256 mismatch: $file"; exit 1; }
      py -c 'from fp_export.cli import app; app()' convert --gguf "$W/$file" --out "$M" || exit 1
      (cd "$M" && sha256sum model.safetensors) | tee -a "$LOG"
      ;;
    bundled)
      need_model && py "$T/tools/paper_table.py" --model "$M" --device cuda --out "$W/res" --skip-existing \
        --cross-check benchmarks/paper_table_smollm2-135m-instruct.json
      ;;
    study)
      need_model && py "$T/tools/paper_table.py" --model "$M" --device cuda --out "$W/res" --skip-existing \
        --recipes "$T"/benchmarks/study_recipes/w*.yaml --name study_smollm2-135m-instruct
      ;;
    default)
      py "$T/tools/paper_table.py" --device cuda --out "$W/res" --skip-existing --name study_kjv-llama-15m \
        --recipes w16a16 w4a8-fp4 w4a8-fp4-m2 w4a8-fp4-m2-lorc "$T"/benchmarks/study_recipes/w*.yaml
      ;;
    modelopt)
      need_model || continue
      todo=$(python3 -c 'import json, sys, os
p = sys.argv[1]
done = {r["config"] for r in json.load(open(p))["rows"]} if os.path.exists(p) else set()
print(" ".join(c for c in ("fp8", "int4_awq", "w4a8_awq") if c not in done))' "$W/res/modelopt_smollm2-135m-instruct.json")
      [ -z "$todo" ] && { log "modelopt: every configuration done"; continue; }
      py "$T/tools/compare_modelopt.py" --model "$M" --device cuda --configs $todo --append \
        --ours "$W/res/paper_table_smollm2-135m-instruct.json" --out "$W/res"
      ;;
    *) log "unknown step $step"; exit 2 ;;
  esac
done
tar czf "$OUT/results.tgz" -C "$W" res && ls -l "$OUT"
