#!/usr/bin/env bash
# Stage what tools/compare_modelopt.py needs on the offline GPU machine (device tool) into
# .device-carry/ (gitignored): the wheels the machine lacks, and a GGUF file cut into parts small
# enough to travel one per call beside the working tree (64 MiB per call in all; the tracked tree
# is about 31 MB). Usage: tools/stage_modelopt_device.sh path/to/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
gguf_file=${1:?usage: $0 FILE.gguf}
rm -rf .device-carry && mkdir -p .device-carry/whl
python -m pip download -q --no-deps -d .device-carry/whl \
    nvidia-modelopt==0.47.0 omegaconf==2.4.0 pulp==3.3.2 nvidia-ml-py gguf==0.19.0
split -b 24M -d "$gguf_file" ".device-carry/gguf.part"
(cd "$(dirname "$gguf_file")" && sha256sum "$(basename "$gguf_file")") > .device-carry/gguf.sha256
du -sh .device-carry/* 
