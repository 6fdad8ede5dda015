// CUDA Adam update in place. Three launches on the stream, none waiting on the host:
//   1. a finite check of the gradient into a device flag;
//   2. the update: for 8-bit states one thread block per quantisation block of 256 (dequantise, update,
//      block absmax, requantise by a search over the map's midpoints held in shared memory), for float32
//      states one thread per element; with the flag set it only writes a zero direction;
//   3. one thread advancing `step` (finite) or `skipped` (not).
#include "../adam_common.h"
#include "../adam_math.h"
#include "../common.h"
#include "cuda_utils.cuh"
#include "../kernels.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace gradnormlorp::cuda {
namespace {

constexpr int kElementThreads = 256;
constexpr int kMaxElementBlocks = 65535;
static_assert(kQuantBlock == 256, "the 8-bit kernel maps one thread to one element of a block of 256");

template <typename scalar_t>
__global__ void non_finite_kernel(const scalar_t* __restrict__ grad, int64_t n, int* __restrict__ flag) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (!isfinite(static_cast<float>(grad[i]))) *flag = 1;
  }
}

struct AdamHyper {
  double beta1, beta2, eps;
};

template <typename scalar_t>
__global__ void quantized_adam_kernel(const scalar_t* __restrict__ grad, uint8_t* __restrict__ m_codes,
                                      uint8_t* __restrict__ v_codes, float* __restrict__ m_absmax,
                                      float* __restrict__ v_absmax, const float* __restrict__ code_signed,
                                      const float* __restrict__ code_unsigned, float* __restrict__ direction,
                                      int64_t n, const float* __restrict__ step, const int* __restrict__ flag,
                                      AdamHyper hyper) {
  __shared__ float signed_map[kCodeSize], unsigned_map[kCodeSize];
  __shared__ float signed_mid[kCodeSize], unsigned_mid[kCodeSize];
  const int t = threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kQuantBlock + t;
  const bool valid = i < n;
  if (*flag != 0) {
    if (valid) direction[i] = 0.0f;
    return;
  }
  signed_map[t] = code_signed[t];
  unsigned_map[t] = code_unsigned[t];
  __syncthreads();
  signed_mid[t] = t + 1 < kCodeSize ? (signed_map[t + 1] + signed_map[t]) * 0.5f : INFINITY;
  unsigned_mid[t] = t + 1 < kCodeSize ? (unsigned_map[t + 1] + unsigned_map[t]) * 0.5f : INFINITY;

  const AdamScalars s = make_adam_scalars(hyper.beta1, hyper.beta2, hyper.eps, *step + 1.0f);
  float m = 0.0f, v = 0.0f;
  if (valid) {
    const float g = static_cast<float>(grad[i]);
    m = first_moment(signed_map[m_codes[i]] * m_absmax[blockIdx.x], g, s);
    v = second_moment(unsigned_map[v_codes[i]] * v_absmax[blockIdx.x], g, s);
    direction[i] = adam_direction(m, v, s);
  }
  // block_max synchronises, which also publishes the midpoints.
  const float m_max = cuda_detail::block_max(fabsf(m));
  const float v_max = cuda_detail::block_max(fabsf(v));
  if (valid) {
    m_codes[i] = nearest_code(signed_mid, scale_to_unit(m, m_max > 0.0f ? 1.0f / m_max : 0.0f));
    v_codes[i] = nearest_code(unsigned_mid, scale_to_unit(v, v_max > 0.0f ? 1.0f / v_max : 0.0f));
  }
  if (t == 0) {
    m_absmax[blockIdx.x] = m_max;
    v_absmax[blockIdx.x] = v_max;
  }
}

template <typename scalar_t>
__global__ void float_adam_kernel(const scalar_t* __restrict__ grad, float* __restrict__ m, float* __restrict__ v,
                                  float* __restrict__ direction, int64_t n, const float* __restrict__ step,
                                  const int* __restrict__ flag, AdamHyper hyper) {
  const bool skip = *flag != 0;
  const AdamScalars s = make_adam_scalars(hyper.beta1, hyper.beta2, hyper.eps, *step + 1.0f);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (skip) {
      direction[i] = 0.0f;
      continue;
    }
    const float g = static_cast<float>(grad[i]);
    const float m_new = first_moment(m[i], g, s);
    const float v_new = second_moment(v[i], g, s);
    m[i] = m_new;
    v[i] = v_new;
    direction[i] = adam_direction(m_new, v_new, s);
  }
}

__global__ void count_step_kernel(float* __restrict__ step, float* __restrict__ skipped,
                                  const int* __restrict__ flag) {
  if (*flag != 0) {
    *skipped += 1.0f;
  } else {
    *step += 1.0f;
  }
}

unsigned element_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kElementThreads - 1) / kElementThreads,
                                                                      kMaxElementBlocks)));
}

}  // namespace

at::Tensor adam_update(const at::Tensor& grad_in, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                       const std::optional<at::Tensor>& absmax_avg, const std::optional<at::Tensor>& absmax_avg_sq,
                       const std::optional<at::Tensor>& code_signed, const std::optional<at::Tensor>& code_unsigned,
                       const at::Tensor& step, const at::Tensor& skipped, double beta1, double beta2, double eps) {
  TORCH_CHECK(grad_in.is_cuda(), "grad must be a CUDA tensor for the cuda backend, got ", grad_in.device());
  const bool quantized = check_adam_arguments(grad_in, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, code_signed,
                                              code_unsigned, step, skipped);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = grad.numel();
  at::Tensor direction = at::empty(grad.sizes(), grad.options().dtype(at::kFloat));
  at::Tensor flag = at::zeros({1}, grad.options().dtype(at::kInt));
  const AdamHyper hyper{beta1, beta2, eps};
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "gradnormlorp_cuda_adam_update", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    int* flag_ptr = flag.mutable_data_ptr<int>();
    if (n > 0) {
      non_finite_kernel<scalar_t><<<element_blocks(n), kElementThreads, 0, stream>>>(g, n, flag_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (quantized && n > 0) {
      const at::Tensor signed_map = code_signed->contiguous();
      const at::Tensor unsigned_map = code_unsigned->contiguous();
      quantized_adam_kernel<scalar_t><<<static_cast<unsigned>(num_quant_blocks(n)), kQuantBlock, 0, stream>>>(
          g, exp_avg.mutable_data_ptr<uint8_t>(), exp_avg_sq.mutable_data_ptr<uint8_t>(),
          absmax_avg->mutable_data_ptr<float>(), absmax_avg_sq->mutable_data_ptr<float>(),
          signed_map.const_data_ptr<float>(), unsigned_map.const_data_ptr<float>(),
          direction.mutable_data_ptr<float>(), n, step.const_data_ptr<float>(), flag_ptr, hyper);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (n > 0) {
      float_adam_kernel<scalar_t><<<element_blocks(n), kElementThreads, 0, stream>>>(
          g, exp_avg.mutable_data_ptr<float>(), exp_avg_sq.mutable_data_ptr<float>(),
          direction.mutable_data_ptr<float>(), n, step.const_data_ptr<float>(), flag_ptr, hyper);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    count_step_kernel<<<1, 1, 0, stream>>>(step.mutable_data_ptr<float>(), skipped.mutable_data_ptr<float>(),
                                           flag_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return direction;
}

}  // namespace gradnormlorp::cuda
