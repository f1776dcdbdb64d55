#!/usr/bin/env bash
# The serving benchmark on the offline GPU machine (device tool), run from the root of the checkout
# it sends, which holds .device-carry/serve/ from tools/stage_serve_device.sh. State lives in /tmp,
# which the machine keeps while it stays warm between calls (a fresh machine needs `setup` again).
#   setup            copy the sent tree to /tmp/fpx with tree/ laid over it; install whl/ (and whl-grpc/
#                    when carried) and server.tar.xz into /tmp/site; make the serving venv /tmp/senv
#                    (a .pth puts /tmp/fpx, /tmp/site and the system torch's site-packages on its path:
#                    Triton's python backend runs model.py in it and does not see PYTHONPATH); probe
#   start SHAPE [LAYERS]
#                    tools/serve_h100.py run in a new session (it outlives the call): source model,
#                    W4A8 checkpoint, repository, server; log /tmp/serve-SHAPE.log
#   bench SHAPE WAIT_S NAME [bench_serve.py args]
#                    wait up to WAIT_S for /tmp/serve-SHAPE/server.json, run tools/bench_serve.py on
#                    bf16 (baseline) and w4a8 into $OUT/NAME.{json,md}, stop the server, copy the logs
# Steps chain: bash tools/serve_h100_device.sh setup start 7b 32   (one step word after another)
set -uo pipefail
carry=$PWD/.device-carry/serve
export PYTHONPATH=/tmp/fpx:/tmp/site PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
pyver=$(python3 -c 'import sys; print("python%d.%d" % sys.version_info[:2])')

setup() {
    mkdir -p /tmp/fpx /tmp/site
    tar -C . --exclude=./.device-carry --exclude=./.git -cf - . | tar -C /tmp/fpx -xf - || return 1
    cp -r "$carry/tree/." /tmp/fpx/ || return 1
    for d in whl whl-grpc; do
        if compgen -G "$carry/$d/*.whl" > /dev/null; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                "$carry"/$d/*.whl || return 1
        fi
    done
    if [ -f "$carry/server.tar.xz" ]; then tar -C /tmp/site -xJf "$carry/server.tar.xz" || return 1; fi
    local sp
    sp=$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
    [ -d /tmp/senv ] || python3 -m venv --without-pip /tmp/senv || return 1
    printf '%s\n' /tmp/fpx /tmp/site "$sp" > "/tmp/senv/lib/$pyver/site-packages/fp_export_serve.pth"
    echo "== probe"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import os, sys, sysconfig; d, f = sysconfig.get_config_var('LIBDIR'), sysconfig.get_config_var('LDLIBRARY'); print(sys.version.split()[0], sys.executable, sys.base_prefix, d, f, 'libpython found' if os.path.exists(os.path.join(d, f)) else 'LIBPYTHON MISSING')"
    python3 -m pip list 2>/dev/null | grep -i -E "^(grpcio|protobuf|numpy|transformers|torch|accelerate) "
    df -h /tmp | tail -1; free -g | head -2; nproc
    ldd /tmp/site/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub | grep -E "not found|libpython"
    LD_LIBRARY_PATH=/tmp/site/nvidia_pytriton.libs ldd /tmp/site/pytriton/tritonserver/bin/tritonserver | grep "not found"
    python3 -c "import tritonclient.grpc, grpc, google.protobuf as p; print('tritonclient.grpc ok; grpc', grpc.__version__, 'protobuf', p.__version__)"
    (cd /tmp && /tmp/senv/bin/python -c "import fp_export, torch, pydantic; print('serving env ok:', fp_export.__file__, torch.__version__, torch.cuda.is_available())")
}

start() {
    local shape=$1 layers=${2:-} w=/tmp/serve-$1
    mkdir -p "$w"
    # the whole background list redirected: a shell left holding the caller's stdout would keep a pipe open
    (cd /tmp/fpx && exec setsid python3 tools/serve_h100.py run --shape "$shape" ${layers:+--layers "$layers"} \
        --work "$w" --env /tmp/senv --device cuda) > "$w.log" 2>&1 < /dev/null &
    echo "started tools/serve_h100.py run --shape $shape${layers:+ --layers $layers} (log $w.log)"
}

bench() {
    local shape=$1 wait_s=$2 name=$3 w=/tmp/serve-$1 t0=$SECONDS rc=0
    shift 3
    mkdir -p "$OUT"
    while [ ! -f "$w/server.json" ]; do
        if [ -f "$w/failed.txt" ] || [ $((SECONDS - t0)) -ge "$wait_s" ]; then
            echo "no server after $((SECONDS - t0)) s"; cat "$w/failed.txt" 2>/dev/null | tail -20; rc=1; break
        fi
        sleep 10; echo "[$((SECONDS - t0)) s] $(tail -c 300 "$w.log" | tr '\r' '\n' | tail -1)"
    done
    if [ $rc = 0 ]; then
        local url dev
        url=$(python3 -c "import json; print(json.load(open('$w/server.json'))['grpc'])")
        dev=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
        (cd /tmp/fpx && python3 tools/bench_serve.py --url "$url" --model bf16 --model w4a8 --device "$dev" \
            --out "$OUT/$name" "$@") 2>&1 | tee "$OUT/bench.log"
        rc=$?
        nvidia-smi --query-gpu=memory.used --format=csv,noheader | sed 's/^/GPU memory in use with both models loaded: /'
        kill -TERM "$(python3 -c "import json; print(json.load(open('$w/server.json'))['pid'])")"
        for _ in $(seq 30); do [ -f "$w/server.json" ] || break; sleep 1; done
    fi
    cp "$w.log" "$OUT/run.log" 2>/dev/null; cp "$w/server.log" "$w/prepare.json" "$OUT/" 2>/dev/null
    return $rc
}

while [ $# -gt 0 ]; do
    case $1 in
        setup) shift; setup || { echo "setup failed"; exit 1; } ;;
        start) layers=""; [[ "${3:-}" =~ ^[0-9]+$ ]] && layers=$3
               start "$2" "$layers"; shift $((layers ? 3 : 2)) ;;
        bench) shift; bench "$@"; exit $? ;;
        *) echo "unknown step $1"; exit 2 ;;
    esac
done
