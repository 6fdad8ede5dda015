// CUDA row norms: one thread block per row, 16-byte loads where rows are aligned; one read of the
// matrix. Adapter mode adds W0 A^T from cuBLAS and the rank-sized correction in ATen.
#include "../common.h"
#include "cuda_utils.cuh"
#include "../kernels.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>

namespace gradnormlorp::cuda {
namespace {

constexpr int kRowThreads = 256;

// out[row] = sum of squares of the row, or its square root clamped at the norm floor.
template <typename scalar_t, typename acc_t>
__global__ void row_reduction_kernel(const scalar_t* __restrict__ w, int64_t cols, acc_t* __restrict__ out,
                                     bool take_root, bool vectorized) {
  using cuda_detail::Pack;
  const scalar_t* row = w + static_cast<int64_t>(blockIdx.x) * cols;
  acc_t sum = 0;
  int64_t tail = 0;
  if (vectorized) {
    constexpr int kVec = Pack<scalar_t>::kVec;
    const auto* packs = reinterpret_cast<const Pack<scalar_t>*>(row);
    const int64_t count = cols / kVec;
    for (int64_t p = threadIdx.x; p < count; p += blockDim.x) {
      const Pack<scalar_t> pack = packs[p];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t x = static_cast<acc_t>(pack.v[k]);
        sum += x * x;
      }
    }
    tail = count * kVec;
  }
  for (int64_t j = tail + threadIdx.x; j < cols; j += blockDim.x) {
    const acc_t x = static_cast<acc_t>(row[j]);
    sum += x * x;
  }
  sum = cuda_detail::block_sum(sum);
  if (threadIdx.x == 0) {
    out[blockIdx.x] = take_root ? fmax(sqrt(sum), static_cast<acc_t>(kNormFloor)) : sum;
  }
}

void launch_row_reduction(const at::Tensor& weight, at::Tensor& out, bool take_root) {
  const int64_t rows = weight.size(0), cols = weight.size(1);
  if (rows == 0) return;
  TORCH_CHECK(rows <= INT32_MAX, "weight has too many rows for the cuda backend: ", rows);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "gradnormlorp_cuda_row_norm", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    row_reduction_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
        w, cols, out.mutable_data_ptr<acc_t>(), take_root, cuda_detail::rows_vectorizable<scalar_t>(w, cols));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}


void check_weight(const at::Tensor& weight, const char* name) {
  TORCH_CHECK(weight.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got ", weight.device());
  check_dim(weight, name, 2);
  check_floating(weight, name);
}

}  // namespace

at::Tensor row_norm(const at::Tensor& weight_in) {
  check_weight(weight_in, "weight");
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor norms = at::empty({weight.size(0)}, weight.options().dtype(accumulation_type(weight.scalar_type())));
  launch_row_reduction(weight, norms, /*take_root=*/true);
  return norms;
}

std::tuple<at::Tensor, at::Tensor> adapter_row_norm(const at::Tensor& base_weight_in, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double scaling) {
  check_weight(base_weight_in, "base_weight");
  check_adapter_factors(base_weight_in, lora_A, lora_B);
  const int64_t rows = base_weight_in.size(0), cols = base_weight_in.size(1), rank = lora_A.size(0);
  const c10::cuda::CUDAGuard guard(base_weight_in.device());
  const at::Tensor base_weight = base_weight_in.contiguous();
  const auto acc = accumulation_type(base_weight.scalar_type());
  const at::Tensor a = lora_A.to(acc);
  const at::Tensor b = lora_B.to(acc);
  at::Tensor base_sq = at::empty({rows}, base_weight.options().dtype(acc));
  launch_row_reduction(base_weight, base_sq, /*take_root=*/false);
  // W0 A^T in the accumulation dtype, as the reference computes it (a bf16 GEMM would round it to bf16).
  const at::Tensor base_A = at::mm(base_weight.to(acc), a.t());
  const at::Tensor squared = base_sq.add(b.mul(base_A).sum(1), 2.0 * scaling)
                                 .add(at::mm(b, at::mm(a, a.t())).mul(b).sum(1), scaling * scaling);
  return {squared.clamp_min(0.0).sqrt().clamp_min(kNormFloor), base_A};
}

}  // namespace gradnormlorp::cuda
