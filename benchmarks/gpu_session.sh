#!/usr/bin/env bash
# Issue #6 on a device machine, in as few calls as the 10-minute-per-command limit allows. From the repo root:
#   bash benchmarks/gpu_session.sh check      # build (sm_80..sm_90 + PTX), GPU tests, ptxas report   (~5 min)
#   bash benchmarks/gpu_session.sh sanitize   # compute-sanitizer memcheck/racecheck/synccheck/initcheck (~5 min)
#   bash benchmarks/gpu_session.sh bench      # bench_topk_gpu.py, full sweep                          (~5 min)
#   bash benchmarks/gpu_session.sh quick      # check + the benchmark's --quick set in one call
# Logs and results go to $OUT (the device tool's return folder) or ./gpu_out. Everything it needs is on the
# device image (python3 with torch, cupy, cuda-bindings, pytest, hypothesis; nvcc; compute-sanitizer).
# Commit the results under benchmarks/results/ (see benchmarks/README_gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
status=0

build() {
  nvidia-smi >"$OUT/nvidia_smi.txt" 2>&1
  { nvcc --version; "$PY" -c 'import torch, sys; print(sys.version); print("torch", torch.__version__, torch.version.cuda)'; } \
    >"$OUT/versions.txt" 2>&1
  make -C kernels -j3 NVCC_THREADS=5 >"$OUT/build.log" 2>&1 || { echo "build FAILED (see build.log)"; exit 3; }
}

check() {
  build
  make -C kernels report 2>&1 | grep -E "Compiling entry|registers|spill" >"$OUT/ptxas_sm90.txt"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_topk.py tests/test_kernels_build.py -m "not slow" \
    --maxfail=10 --durations=12 -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

sanitize() {
  [ -f zsbir_infer/gpu/_lib/libzsbir_kernels.so ] || build
  local sel='test_gpu_ip_integer_data_equals_cpu_exactly or test_gpu_hamming_equals_cpu or test_gpu_int8 or misaligned'
  for tool in memcheck racecheck synccheck initcheck; do
    if timeout "${SANITIZER_TIMEOUT:-150}" compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all \
      "$PY" -m pytest -q -x -p no:cacheprovider tests/test_gpu_topk.py -m gpu -k "$sel" >"$OUT/sanitizer_$tool.log" 2>&1; then
      echo "compute-sanitizer $tool: clean"
    else
      echo "compute-sanitizer $tool: FAILED (see sanitizer_$tool.log)"
      status=1
    fi
  done
}

bench() {
  [ -f zsbir_infer/gpu/_lib/libzsbir_kernels.so ] || build
  "$PY" benchmarks/bench_topk_gpu.py --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

case "${1:-check}" in
  check) check ;;
  sanitize) sanitize ;;
  bench) shift; bench "$@" ;;
  quick) check; bench --quick ;;
  *) echo "usage: $0 check|sanitize|bench [bench args]|quick" >&2; exit 2 ;;
esac
exit "$status"
