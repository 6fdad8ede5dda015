// CPU row norms: ||V||_row (full mode) and ||W0 + s B A||_row with W0 A^T (adapter mode), each in one
// read of the big matrix.
#include "common.h"
#include "cpu_loops.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace gradnormlorp::cpu {
namespace {

void check_weight(const at::Tensor& weight, const char* name) {
  TORCH_CHECK(weight.device().is_cpu(), name, " must be a CPU tensor for the cpu backend, got ", weight.device());
  check_dim(weight, name, 2);
  check_floating(weight, name);
}

template <typename scalar_t, typename acc_t>
void row_norms(const scalar_t* w, int64_t rows, int64_t cols, acc_t* out) {
#pragma omp parallel for num_threads(thread_count()) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    out[i] = std::max(std::sqrt(row_sum_of_squares<acc_t>(w + i * cols, cols)), static_cast<acc_t>(kNormFloor));
  }
}

template <typename scalar_t, typename acc_t>
void row_squares(const scalar_t* w, int64_t rows, int64_t cols, acc_t* out) {
#pragma omp parallel for num_threads(thread_count()) schedule(static)
  for (int64_t i = 0; i < rows; ++i) out[i] = row_sum_of_squares<acc_t>(w + i * cols, cols);
}

// Up to this rank W0 A^T is computed in the pass that reads W0 (adapter_rows); above it the SSE dot
// products lose to the BLAS GEMM (2 threads, 4096 x 4096, measured one row at a time: on par at rank 16,
// 1.8x slower at rank 64), so W0 is read by the GEMM and once more for its squares.
constexpr int64_t kFusedAdapterMaxRank = 32;

// Rows of W0 dotted with A together: each element of A loaded serves this many rows.
constexpr int64_t kAdapterRowGroup = 4;

// Squared row norms and W0 A^T, a group of rows of W0 at a time: the rows (widened to acc_t when W0 is
// narrower) stay in L1 while they are dotted with the rank rows of A, which stay in L2. W0 is read once
// and no widened copy of it is ever stored.
template <typename scalar_t, typename acc_t>
void adapter_rows(const scalar_t* w, int64_t rows, int64_t cols, const acc_t* a, int64_t rank, acc_t* squares,
                  acc_t* base_A) {
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  const int64_t groups = (rows + kAdapterRowGroup - 1) / kAdapterRowGroup;
#pragma omp parallel num_threads(thread_count())
  {
    std::vector<acc_t> widened(kWiden ? kAdapterRowGroup * cols : 0);
#pragma omp for schedule(static)
    for (int64_t group = 0; group < groups; ++group) {
      const int64_t first = group * kAdapterRowGroup;
      const int64_t count = std::min(kAdapterRowGroup, rows - first);
      const acc_t* x[kAdapterRowGroup];
      for (int64_t r = 0; r < kAdapterRowGroup; ++r) {
        // A short last group repeats its last row; those results are not stored.
        const int64_t i = first + std::min(r, count - 1);
        const scalar_t* row = w + i * cols;
        if constexpr (kWiden) {
          acc_t* dst = widened.data() + r * cols;
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < cols; ++j) {
            const acc_t v = load_as<acc_t>(row[j]);
            dst[j] = v;
            sum += v * v;
          }
          if (r < count) squares[i] = sum;
          x[r] = dst;
        } else {
          if (r < count) squares[i] = row_sum_of_squares<acc_t>(row, cols);
          x[r] = row;
        }
      }
      const acc_t *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
      for (int64_t k = 0; k < rank; ++k) {
        const acc_t* a_row = a + k * cols;
        acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int64_t j = 0; j < cols; ++j) {
          const acc_t v = a_row[j];
          d0 += x0[j] * v;
          d1 += x1[j] * v;
          d2 += x2[j] * v;
          d3 += x3[j] * v;
        }
        const acc_t dots[kAdapterRowGroup] = {d0, d1, d2, d3};
        for (int64_t r = 0; r < count; ++r) base_A[(first + r) * rank + k] = dots[r];
      }
    }
  }
}

}  // namespace

at::Tensor row_norm(const at::Tensor& weight_in) {
  check_weight(weight_in, "weight");
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor norms = at::empty({weight.size(0)}, weight.options().dtype(accumulation_type(weight.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "gradnormlorp_cpu_row_norm", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    row_norms(weight.const_data_ptr<scalar_t>(), weight.size(0), weight.size(1), norms.mutable_data_ptr<acc_t>());
  });
  return norms;
}

std::tuple<at::Tensor, at::Tensor> adapter_row_norm(const at::Tensor& base_weight_in, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double scaling) {
  check_weight(base_weight_in, "base_weight");
  check_adapter_factors(base_weight_in, lora_A, lora_B);
  const int64_t rows = base_weight_in.size(0), cols = base_weight_in.size(1), rank = lora_A.size(0);

  const at::Tensor base_weight = base_weight_in.contiguous();
  const auto acc = accumulation_type(base_weight.scalar_type());
  const at::Tensor a = lora_A.to(acc).contiguous();
  const at::Tensor b = lora_B.to(acc);
  at::Tensor base_sq = at::empty({rows}, base_weight.options().dtype(acc));
  at::Tensor base_A = at::empty({rows, rank}, base_weight.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, base_weight.scalar_type(), "gradnormlorp_cpu_adapter_row_norm", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        if (rank > kFusedAdapterMaxRank) {
          row_squares(base_weight.const_data_ptr<scalar_t>(), rows, cols, base_sq.mutable_data_ptr<acc_t>());
          at::mm_out(base_A, base_weight.to(acc), a.t());
          return;
        }
        adapter_rows(base_weight.const_data_ptr<scalar_t>(), rows, cols, a.const_data_ptr<acc_t>(), rank,
                     base_sq.mutable_data_ptr<acc_t>(), base_A.mutable_data_ptr<acc_t>());
      });

  // The rank-sized correction: n^2 = ||W0||^2 + 2 s rowsum(B * W0 A^T) + s^2 rowsum((B (A A^T)) * B).
  const at::Tensor squared = base_sq.add(b.mul(base_A).sum(1), 2.0 * scaling)
                                 .add(at::mm(b, at::mm(a, a.t())).mul(b).sum(1), scaling * scaling);
  return {squared.clamp_min(0.0).sqrt().clamp_min(kNormFloor), base_A};
}

}  // namespace gradnormlorp::cpu
