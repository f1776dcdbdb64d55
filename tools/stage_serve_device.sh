#!/usr/bin/env bash
# Stage what the serving benchmark needs on the offline GPU machine (device tool) into
# .device-carry/serve/ (gitignored) of the checkout the device tool sends:
#   server.tar.xz  the parts of the nvidia-pytriton 0.7.0 wheel that tools/serve_h100_device.sh
#                  uses (tritonserver, its libraries, the python backend and the Python 3.12 stub;
#                  150 MB unpacked, about 26 MB as xz), laid out as site-packages;
#   whl/           wheels the machine lacks (fp-export's pydantic; tritonclient and rapidjson);
#   whl-grpc/      grpcio and protobuf as new as tritonclient's generated code asks for: carry them
#                  in a second call only if the machine's own are older (tree + the above is ~62 MB
#                  of the 64 MiB a call may carry);
#   tree/          this checkout's tracked fp_export (less the embedded model and corpus, which do not
#                  change), plugins and serving tools, laid over the sent tree by `setup`: the device
#                  sends DEST_CHECKOUT's working tree, uncommitted edits included, and the benchmark
#                  must run the code of the commit it is reported for.
# Usage: tools/stage_serve_device.sh [DEST_CHECKOUT]   (default: this checkout)
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
dest=$(cd "${1:-$src}" && pwd)/.device-carry/serve
py=${PYTHON:-python3}
get() {  # wheels for CPython 3.12 on manylinux x86-64 (the device's interpreter)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 "$@"
}
rm -rf "$dest" && mkdir -p "$dest/whl" "$dest/whl-grpc" "$dest/tree/tools"
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
get -d "$tmp" nvidia-pytriton==0.7.0
(cd "$tmp" && unzip -q nvidia_pytriton-0.7.0-*.whl \
    && tar -cf - pytriton/__init__.py pytriton/tritonserver/bin pytriton/tritonserver/backends \
           pytriton/tritonserver/python_backend_stubs/3.12 \
           $(ls -d nvidia_pytriton.libs/* | grep -v '/libpython3-') \
    | xz -T0 -9e > "$dest/server.tar.xz")
get -d "$dest/whl" pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    tritonclient==2.73.0 python-rapidjson==1.25
get -d "$dest/whl-grpc" grpcio==1.85.1 protobuf==6.33.6
cp "$src"/tools/{serve_h100.py,serve_h100_device.sh,bench_serve.py,bench_quantize.py} "$dest/tree/tools/"
(cd "$src" && git ls-files fp_export plugins | grep -v -E '^fp_export/(models|data)/' | tar -cf - -T - | tar -C "$dest/tree" -xf -)
du -sh "$dest"/*
