#!/usr/bin/env bash
# The GPU half of the checks, for a lent GPU machine (device tool) or any CUDA box with torch + Triton:
# builds the extension for the local GPU, runs the GPU tests (cuda and triton backends against the
# reference ops), times the compiled kernels next to Triton's, profiles the layer and optimizer host
# time, and runs the benchmarks named in $BENCH (default: bandwidth). Logs go to $OUT (default ./gpu-out).
#   bash scripts/gpu_check.sh [stage ...]    stages: build tests time profile bench (default: all)
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${OUT:-$root/gpu-out}
mkdir -p "$out"
py=${PYTHON:-python3}
stages=${*:-build tests time profile bench}
arch=$($py -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
status=0
run() {  # run NAME COMMAND...: log to $out/NAME.log, keep going on failure, remember it
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - start)) s; tail:"; tail -n 4 "$out/$name.log" | sed 's/^/   /'
  [ $rc -eq 0 ] || status=1
}
for stage in $stages; do
  case $stage in
    # The system compiler: the lent machines' $CXX (/opt/gcc/bin/g++) is a wrapper whose libstdc++ ends up
    # inside the .so, and formatting a number in an error message then crashes (uninitialised locale).
    build) run build env CC="${GPU_CC:-/usr/bin/gcc}" CXX="${GPU_CXX:-/usr/bin/g++}" TORCH_CUDA_ARCH_LIST="$arch" \
             GRADNORMLORP_REQUIRE_EXTENSION=1 MAX_JOBS=16 $py setup.py build_ext --inplace ;;
    tests) run tests timeout 420 $py -m pytest -q -p no:cacheprovider --tb=short tests/test_extension.py \
             tests/test_row_norm.py tests/test_adam_update.py tests/test_project_back.py tests/test_triton_gpu.py \
             tests/test_optimizer_graph.py tests/test_quant8.py tests/test_adapter_linear.py ;;
    time) run time_cuda timeout 120 $py csrc/tools/time_cuda_kernels.py ;;
    profile) run profile_layer timeout 120 $py bench/profile_layer.py
             run profile_optimizer timeout 120 $py bench/profile_optimizer.py ;;
    bench) only=""; for b in ${BENCH:-bandwidth}; do only="$only --only $b"; done
           run bench timeout 540 $py -m gradnormlorp_kernels.benchmarks --out "$out" --no-plots $only ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
exit $status
