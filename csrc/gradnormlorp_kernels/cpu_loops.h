// Loops shared by the CPU kernels. They are written so that gcc vectorises them at -O3 (unit-stride
// inner loops, `omp simd` reductions) and are parallelised over rows with OpenMP, using as many threads
// as torch is set to use (torch.set_num_threads), so the extension follows the user's thread budget.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace gradnormlorp::cpu {

inline int thread_count() { return at::get_num_threads(); }

// Sum of squares of one row, widened to acc_t.
template <typename acc_t, typename scalar_t>
inline acc_t row_sum_of_squares(const scalar_t* row, int64_t cols) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < cols; ++j) {
    const acc_t x = static_cast<acc_t>(row[j]);
    sum += x * x;
  }
  return sum;
}

}  // namespace gradnormlorp::cpu
