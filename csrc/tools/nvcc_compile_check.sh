#!/usr/bin/env bash
# Compile every CUDA source of the extension with nvcc for the target architectures, against the
# headers of the given Python's torch: a compile check for machines without a GPU (or with a CPU-only
# torch, whose headers lack the CMake-generated CUDA config; the macro below stands in for it). Objects
# go to build/nvcc_check/ and are not used.
#   usage: csrc/tools/nvcc_compile_check.sh [python]    (default: python3)
#   TORCH_CUDA_ARCH_LIST   architectures, default "8.0;8.6;8.9;9.0" (as setup.py)
#   NVCC                   the compiler, default: nvcc on PATH, else /usr/local/cuda/bin/nvcc
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${1:-python3}
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$nvcc" ]; then
  echo "nvcc_compile_check: no nvcc found; CUDA sources not checked" >&2
  exit 0
fi
include=$("$python" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
gencode=()
IFS=';' read -ra archs <<< "${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0}"
for arch in "${archs[@]}"; do
  sm=${arch//./}
  gencode+=("-gencode=arch=compute_${sm},code=sm_${sm}")
done
out="$root/build/nvcc_check"
mkdir -p "$out"
# The flags torch's CUDAExtension passes, plus the ones setup.py adds.
flags=(-c -std=c++20 -O3 --fmad=false --expt-relaxed-constexpr -DGRADNORMLORP_WITH_CUDA
       -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -Xcompiler -fPIC
       -I"$include" -I"$include/torch/csrc/api/include" "${gencode[@]}")
echo "nvcc_compile_check: $("$nvcc" --version | tail -1); architectures ${archs[*]}"
export nvcc out
printf '%s\n' "$root"/csrc/gradnormlorp_kernels/cuda/*.cu | xargs -P "${JOBS:-2}" -I{} bash -c \
  'name=$(basename "$1" .cu); "$nvcc" "${@:2}" "$1" -o "$out/$name.o" 2> "$out/$name.log" \
     && echo "  compiled $name.cu" || { cat "$out/$name.log" >&2; echo "  FAILED $name.cu" >&2; exit 255; }' \
  _ {} "${flags[@]}"
