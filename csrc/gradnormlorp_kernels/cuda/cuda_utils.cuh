// Device helpers shared by the CUDA kernels: block-wide reductions and 16-byte vector loads.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace gradnormlorp::cuda_detail {

constexpr int kWarp = 32;

template <typename T>
__device__ inline T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ inline T warp_max(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
template <typename T>
__device__ inline T block_sum(T v) {
  __shared__ T partial[kWarp];
  __shared__ T total;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : T(0);
    w = warp_sum(w);
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

// Maximum over the block of non-negative values; every thread gets it.
__device__ inline float block_max(float v) {
  __shared__ float partial[kWarp];
  __shared__ float total;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_max(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : 0.0f;
    w = warp_max(w);
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

// kVec consecutive elements loaded or stored as one 16-byte transaction.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kVec = 16 / sizeof(T);
  T v[kVec];
};

// Rows can use 16-byte accesses when every row starts 16-byte aligned.
template <typename T>
inline bool rows_vectorizable(const void* base, int64_t cols) {
  return reinterpret_cast<std::uintptr_t>(base) % 16 == 0 && (cols * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

}  // namespace gradnormlorp::cuda_detail
