#!/usr/bin/env bash
# Fill the folder carried to the offline GPU machine for tools/smollm2_device.sh, one call at a time.
# A call carries at most 64 MiB with the working tree (about 31.4 MB tracked), so the 98 MB GGUF
# travels in three parts, one per call, into the device's /tmp (kept while the machine stays warm
# between back-to-back calls), with the wheels the machine lacks unpacked into two tarballs:
# site-core.tar.gz (pydantic, gguf; with part 0) and site-modelopt.tar.gz (nvidia-modelopt 0.47,
# omegaconf, pulp without its bundled CBC solver binaries, 32 MB that ModelOpt's quantization never
# calls; with part 1). Part sizes (PARTS, bytes, the last part is the rest) even out what each call
# carries: 31,575,318 + 2.8 MB, 32,429,220 + 1.9 MB, 34,357,894.
#   tools/stage_smollm2_device.sh FILE.gguf DEST PART
# DEST (e.g. .device-carry/table, git-ignored) is rewritten whole: tools/, benchmarks/study_recipes/
# and stage/ (gguf.sha256, gguf.parts = "name size" per part, gguf.partPART, a site tarball).
# Then on the device: bash DEST/tools/smollm2_device.sh stage convert ... (in the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
gguf_file=${1:?usage: $0 FILE.gguf DEST PART}
dest=${2:?usage: $0 FILE.gguf DEST PART}
part=${3:?usage: $0 FILE.gguf DEST PART}
cache=${CACHE:-/tmp/smollm2-stage}
parts=${PARTS:-31575318 32429220}
mkdir -p "$cache"
sha=$(sha256sum "$gguf_file" | cut -d' ' -f1)
if [ ! -f "$cache/gguf.sha256" ] || [ "$(cat "$cache/gguf.key" 2>/dev/null)" != "$sha $parts" ]; then
  rm -f "$cache"/gguf.*
  off=0 i=0 total=$(stat -c %s "$gguf_file")
  for n in $parts $(( total - $(echo $parts | tr ' ' '+') )); do
    dd if="$gguf_file" of="$cache/$(printf "gguf.part%02d" $i)" bs=1M iflag=skip_bytes,count_bytes skip=$off count="$n" status=none
    off=$(( off + n )) i=$(( i + 1 ))
  done
  (cd "$cache" && for f in gguf.part[0-9]*; do echo "$f $(stat -c %s "$f")"; done) > "$cache/gguf.parts"
  echo "$sha  $(basename "$gguf_file")" > "$cache/gguf.sha256"
  echo "$sha $parts" > "$cache/gguf.key"
fi
name=$(printf "gguf.part%02d" "$part")
[ -f "$cache/$name" ] || { echo "no part $part: $(wc -l < "$cache/gguf.parts") parts" >&2; exit 2; }
if [ ! -f "$cache/site-core.tar.gz" ] || [ ! -f "$cache/site-modelopt.tar.gz" ]; then
  rm -rf "$cache/whl" "$cache/core" "$cache/modelopt" && mkdir -p "$cache/whl" "$cache/core" "$cache/modelopt"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$cache/whl" nvidia-modelopt==0.47.0 omegaconf==2.4.0 pulp==3.3.2 gguf==0.19.0 \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  for w in "$cache"/whl/*.whl; do
    case $(basename "$w") in nvidia_modelopt*|omegaconf*|pulp*) d=modelopt ;; *) d=core ;; esac
    unzip -q -o "$w" -d "$cache/$d"
  done
  rm -rf "$cache/modelopt/pulp/solverdir/cbc" "$cache/modelopt/pulp/tests"
  tar czf "$cache/site-core.tar.gz" -C "$cache/core" .
  tar czf "$cache/site-modelopt.tar.gz" -C "$cache/modelopt" .
fi
rm -rf "$dest" && mkdir -p "$dest/tools" "$dest/benchmarks" "$dest/stage"
cp tools/paper_table.py tools/compare_modelopt.py tools/study_table.py tools/smollm2_device.sh "$dest/tools/"
cp -r benchmarks/study_recipes "$dest/benchmarks/"
cp "$cache/gguf.sha256" "$cache/gguf.parts" "$cache/$name" "$dest/stage/"
case $part in 0) cp "$cache/site-core.tar.gz" "$dest/stage/" ;; 1) cp "$cache/site-modelopt.tar.gz" "$dest/stage/" ;; esac
du -sh "$dest"
