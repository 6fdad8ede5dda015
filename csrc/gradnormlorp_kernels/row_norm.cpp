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

namespace gradnormlorp::cpu {
namespace {

// Rows of W0 handled per GEMM in adapter_row_norm: a block (converted to the accumulation type when W0
// is narrower) stays in cache between its sum of squares and its product with A^T.
constexpr int64_t kAdapterRowBlock = 64;

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

// Squared row norms of `count` rows; where `widened` is given, the rows are also stored there in acc_t
// for the GEMM that follows (a bf16 W0 is read once, not once more for a float32 copy).
template <typename scalar_t, typename acc_t>
void row_squares(const scalar_t* w, int64_t count, int64_t cols, acc_t* squares, acc_t* widened) {
#pragma omp parallel for num_threads(thread_count()) schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* row = w + i * cols;
    if (widened == nullptr) {
      squares[i] = row_sum_of_squares<acc_t>(row, cols);
      continue;
    }
    acc_t* dst = widened + i * cols;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) {
      const acc_t x = static_cast<acc_t>(row[j]);
      dst[j] = x;
      sum += x * x;
    }
    squares[i] = sum;
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
  check_dim(lora_A, "lora_A", 2);
  check_dim(lora_B, "lora_B", 2);
  check_device(lora_A, "lora_A", base_weight_in, "base_weight");
  check_device(lora_B, "lora_B", base_weight_in, "base_weight");
  const int64_t rows = base_weight_in.size(0), cols = base_weight_in.size(1), rank = lora_A.size(0);
  TORCH_CHECK(lora_A.size(1) == cols, "lora_A must have shape (rank, ", cols, ") to match base_weight ",
              base_weight_in.sizes(), ", got ", lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == rows && lora_B.size(1) == rank, "lora_B must have shape (", rows, ", ", rank,
              "), got ", lora_B.sizes());

  const at::Tensor base_weight = base_weight_in.contiguous();
  const auto acc = accumulation_type(base_weight.scalar_type());
  const at::Tensor a = lora_A.to(acc);
  const at::Tensor b = lora_B.to(acc);
  const at::Tensor a_t = a.t();
  at::Tensor base_sq = at::empty({rows}, base_weight.options().dtype(acc));
  at::Tensor base_A = at::empty({rows, rank}, base_weight.options().dtype(acc));
  const bool widen = base_weight.scalar_type() != acc;
  at::Tensor widened = widen ? at::empty({std::min(rows, kAdapterRowBlock), cols}, base_weight.options().dtype(acc))
                             : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, base_weight.scalar_type(), "gradnormlorp_cpu_adapter_row_norm", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        for (int64_t start = 0; start < rows; start += kAdapterRowBlock) {
          const int64_t count = std::min(kAdapterRowBlock, rows - start);
          row_squares(base_weight.const_data_ptr<scalar_t>() + start * cols, count, cols,
                      base_sq.mutable_data_ptr<acc_t>() + start, widen ? widened.mutable_data_ptr<acc_t>() : nullptr);
          const at::Tensor block = widen ? widened.narrow(0, 0, count) : base_weight.narrow(0, start, count);
          at::Tensor out_rows = base_A.narrow(0, start, count);
          at::mm_out(out_rows, block, a_t);
        }
      });

  // The rank-sized correction: n^2 = ||W0||^2 + 2 s rowsum(B * W0 A^T) + s^2 rowsum((B (A A^T)) * B).
  const at::Tensor squared = base_sq.add(b.mul(base_A).sum(1), 2.0 * scaling)
                                 .add(at::mm(b, at::mm(a, a_t)).mul(b).sum(1), scaling * scaling);
  return {squared.clamp_min(0.0).sqrt().clamp_min(kNormFloor), base_A};
}

}  // namespace gradnormlorp::cpu
