#!/usr/bin/env bash
# Fill the folder carried to the offline GPU machine for tools/smollm2_device.sh, one call at a time.
# A call carries at most 64 MiB with the working tree (about 31 MB tracked), so the 98 MB GGUF
# travels in parts of 25,000,000 bytes, one per call, into the device's /tmp (kept while the
# machine stays warm between back-to-back calls); part 0 also carries the wheels the machine lacks
# (gguf, nvidia-modelopt 0.47 and its omegaconf/pulp, pydantic), unpacked into site.tar.gz, pulp
# without its bundled CBC solver binaries (32 MB; ModelOpt's quantization never calls a solver).
#   tools/stage_smollm2_device.sh FILE.gguf DEST PART
# DEST (e.g. .device-carry/table, git-ignored) is rewritten whole: tools/, benchmarks/study_recipes/
# and stage/ (gguf.sha256, gguf.parts = "name size" per part, gguf.partPART, site.tar.gz for part 0).
# Then on the device: bash DEST/tools/smollm2_device.sh stage convert ... (in the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
gguf_file=${1:?usage: $0 FILE.gguf DEST PART}
dest=${2:?usage: $0 FILE.gguf DEST PART}
part=${3:?usage: $0 FILE.gguf DEST PART}
cache=${CACHE:-/tmp/smollm2-stage}
mkdir -p "$cache"
sha=$(sha256sum "$gguf_file" | cut -d' ' -f1)
if [ ! -f "$cache/gguf.sha256" ] || [ "$(cut -d' ' -f1 "$cache/gguf.sha256")" != "$sha" ]; then
  rm -f "$cache"/gguf.*
  split -b 25000000 -d -a 2 "$gguf_file" "$cache/gguf.part"
  (cd "$cache" && for f in gguf.part[0-9]*; do echo "$f $(stat -c %s "$f")"; done) > "$cache/gguf.parts"
  echo "$sha  $(basename "$gguf_file")" > "$cache/gguf.sha256"
fi
name=$(printf "gguf.part%02d" "$part")
[ -f "$cache/$name" ] || { echo "no part $part: $(wc -l < "$cache/gguf.parts") parts" >&2; exit 2; }
if [ "$part" = 0 ] && [ ! -f "$cache/site.tar.gz" ]; then
  rm -rf "$cache/whl" "$cache/site" && mkdir -p "$cache/whl" "$cache/site"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$cache/whl" nvidia-modelopt==0.47.0 omegaconf==2.4.0 pulp==3.3.2 gguf==0.19.0 \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  for w in "$cache"/whl/*.whl; do unzip -q -o "$w" -d "$cache/site"; done
  rm -rf "$cache/site/pulp/solverdir/cbc" "$cache/site/pulp/tests"
  tar czf "$cache/site.tar.gz" -C "$cache/site" .
fi
rm -rf "$dest" && mkdir -p "$dest/tools" "$dest/benchmarks" "$dest/stage"
cp tools/paper_table.py tools/compare_modelopt.py tools/study_table.py tools/smollm2_device.sh "$dest/tools/"
cp -r benchmarks/study_recipes "$dest/benchmarks/"
cp "$cache/gguf.sha256" "$cache/gguf.parts" "$cache/$name" "$dest/stage/"
[ "$part" = 0 ] && cp "$cache/site.tar.gz" "$dest/stage/"
du -sh "$dest"
