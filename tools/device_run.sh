#!/bin/bash
# One device session: wheels if needed, build, GPU tests, GEMM benchmark, ncu of the decode kernel,
# decode benchmark. Results under $OUT. Usage (repo root): bash tools/device_run.sh [tests|gputests|sweep|kernels|ncu|decode]...
# Wheels of missing packages in ../whl (WHL=...), the W4A8 checkpoint of the default model in ../ckpt (CKPT=...).
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import pydantic" 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --target /tmp/site ${WHL:-../whl}/*.whl && export PYTHONPATH=$PWD:/tmp/site; }
python3 -c "from fp_export.runtime import w4a8_gemm as W; W.build_library()" || exit 1
for step in "$@"; do
  case $step in
    tests) python3 -m pytest -q -m gpu tests/test_w4a8_gemm.py tests/test_engine.py > $OUT/tests.txt 2>&1; tail -3 $OUT/tests.txt ;;
    gputests) python3 -m pytest -q -m gpu tests/test_gpu.py -k "not validate" > $OUT/gputests.txt 2>&1; tail -3 $OUT/gputests.txt ;;
    sweep) SKIP_CHECKS=1 timeout 200 python3 tools/device_check_w4a8.py 2>&1 | grep -E "^M=|copy" | tee $OUT/sweep.txt ;;
    kernels) python3 tools/bench_kernels.py --out $OUT 2>&1 | grep -v "^|" ;;
    ncu) ncu --clock-control none -k regex:w4a8_gemm_kernel -c 3 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section LaunchStats \
           python3 tools/profile_w4a8_decode.py 2>&1 | grep -v "^==PROF==" > $OUT/ncu.txt; grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers|Stall|Long Scoreboard|Warp Cycles" $OUT/ncu.txt | head -40 ;;
    decode) python3 tools/bench_decode.py --checkpoint ${CKPT:-../ckpt} --out $OUT 2>&1 | tail -40 ;;
  esac
done
