// Loops shared by the CPU kernels. They are written so that gcc vectorises them at -O3 (unit-stride
// inner loops, `omp simd` reductions, bf16 conversions as integer bit operations rather than c10's
// branching ones) and are parallelised over rows with OpenMP, using as many threads as torch is set to
// use (torch.set_num_threads), so the extension follows the user's thread budget.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace gradnormlorp::cpu {

inline int thread_count() { return at::get_num_threads(); }

// Widen a stored element to the accumulation type.
template <typename acc_t, typename scalar_t>
inline acc_t load_as(scalar_t x) {
  return static_cast<acc_t>(x);
}

template <>
inline float load_as<float, c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Round an accumulated value to the stored type (bf16: round to nearest even, NaN kept a quiet NaN,
// exactly as c10::BFloat16 does).
template <typename scalar_t, typename acc_t>
inline scalar_t store_as(acc_t x) {
  return static_cast<scalar_t>(x);
}

template <>
inline c10::BFloat16 store_as<c10::BFloat16, float>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? UINT32_C(0x7FC0) : rounded), c10::BFloat16::from_bits());
}

// Sum of squares of one row, widened to acc_t.
template <typename acc_t, typename scalar_t>
inline acc_t row_sum_of_squares(const scalar_t* row, int64_t cols) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < cols; ++j) {
    const acc_t x = load_as<acc_t>(row[j]);
    sum += x * x;
  }
  return sum;
}

}  // namespace gradnormlorp::cpu
