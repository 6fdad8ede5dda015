// CUDA project-back: the low-rank product comes from cuBLAS (one (out, in) float32 temporary), then one
// kernel applies W <- W (1 - gate decay) - gate step_size U in place and writes the new row norms, one
// thread block per row. The gate is read on the device, so a skipped step needs no host round trip.
#include "../common.h"
#include "cuda_utils.cuh"
#include "../kernels.h"
#include "../project_back_common.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace gradnormlorp::cuda {
namespace {

constexpr int kRowThreads = 256;

template <typename scalar_t, typename acc_t>
__device__ inline scalar_t updated(scalar_t w, acc_t u, acc_t keep, acc_t step, acc_t& sum) {
  const acc_t kept = static_cast<acc_t>(w) * keep;
  const acc_t moved = step * u;
  const scalar_t stored = static_cast<scalar_t>(kept - moved);
  const acc_t x = static_cast<acc_t>(stored);
  sum += x * x;
  return stored;
}

template <typename scalar_t, typename acc_t>
__global__ void project_back_kernel(scalar_t* __restrict__ w, const acc_t* __restrict__ update, int64_t cols,
                                    const acc_t* __restrict__ gate, acc_t decay, acc_t step_size,
                                    acc_t* __restrict__ norms, bool vectorized) {
  using cuda_detail::Pack;
  // As the reference: (1 - gate * decay) and (gate * step_size) in the accumulation dtype.
  const acc_t g = *gate;
  const acc_t keep = static_cast<acc_t>(1) - g * decay;
  const acc_t step = g * step_size;
  const int64_t row_offset = static_cast<int64_t>(blockIdx.x) * cols;
  scalar_t* row = w + row_offset;
  const acc_t* u = update + row_offset;
  acc_t sum = 0;
  int64_t tail = 0;
  if (vectorized) {
    constexpr int kVec = Pack<scalar_t>::kVec;
    auto* packs = reinterpret_cast<Pack<scalar_t>*>(row);
    const int64_t count = cols / kVec;
    for (int64_t p = threadIdx.x; p < count; p += blockDim.x) {
      Pack<scalar_t> pack = packs[p];
#pragma unroll
      for (int k = 0; k < kVec; ++k) pack.v[k] = updated(pack.v[k], u[p * kVec + k], keep, step, sum);
      packs[p] = pack;
    }
    tail = count * kVec;
  }
  for (int64_t j = tail + threadIdx.x; j < cols; j += blockDim.x) row[j] = updated(row[j], u[j], keep, step, sum);
  sum = cuda_detail::block_sum(sum);
  if (threadIdx.x == 0) norms[blockIdx.x] = fmax(sqrt(sum), static_cast<acc_t>(kNormFloor));
}

}  // namespace

at::Tensor project_back_update(const at::Tensor& weight, const at::Tensor& direction,
                               const std::optional<at::Tensor>& left, const std::optional<at::Tensor>& right,
                               double step_size, double decay, const at::Tensor& gate) {
  TORCH_CHECK(weight.is_cuda(), "weight must be a CUDA tensor for the cuda backend, got ", weight.device());
  const c10::cuda::CUDAGuard guard(weight.device());
  const UpdateFactors factors = check_project_back_arguments(weight, direction, left, right, gate);
  const auto acc = accumulation_type(weight.scalar_type());
  const int64_t rows = weight.size(0), cols = weight.size(1);
  at::Tensor norms = at::empty({rows}, weight.options().dtype(acc));
  if (rows == 0) return norms;
  TORCH_CHECK(rows <= INT32_MAX, "weight has too many rows for the cuda backend: ", rows);
  const at::Tensor update =
      factors.full.defined() ? factors.full : at::mm(factors.row_factor, factors.col_factor);
  const at::Tensor gate_acc = gate.to(acc);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, weight.scalar_type(), "gradnormlorp_cuda_project_back_update", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        scalar_t* w = weight.mutable_data_ptr<scalar_t>();
        const bool vectorized = cuda_detail::rows_vectorizable<scalar_t>(w, cols);
        project_back_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
            w, update.const_data_ptr<acc_t>(), cols, gate_acc.const_data_ptr<acc_t>(), static_cast<acc_t>(decay),
            static_cast<acc_t>(step_size), norms.mutable_data_ptr<acc_t>(), vectorized);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return norms;
}

}  // namespace gradnormlorp::cuda
