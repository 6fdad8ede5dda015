// CPU project-back: W <- W (1 - gate decay) - gate step_size (P N Q^T), and the new row norms, with
// one read and one write of W. The low-rank product is formed a block of rows at a time into a buffer
// that stays in cache, and consumed there by the fused update, so no (out, in) update is ever stored.
#include "common.h"
#include "cpu_loops.h"
#include "kernels.h"
#include "project_back_common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>

namespace gradnormlorp::cpu {
namespace {

// Bytes of the float32 update formed per GEMM call: small enough to stay in the last-level cache for
// the fused pass that consumes it, large enough that the GEMM runs at full speed (with 2 threads, MKL
// ran 64-row blocks of a rank-128 product several times slower than 1024-row ones).
constexpr int64_t kUpdateBlockBytes = int64_t(16) << 20;

// new = w * keep - step * u for `count` rows (each rounded to the weight's dtype, as the reference's
// copy_ does) and the row norms of the stored values.
template <typename scalar_t, typename acc_t>
void update_rows(scalar_t* w, const acc_t* update, acc_t* norms, int64_t count, int64_t cols, acc_t keep,
                 acc_t step) {
#pragma omp parallel for num_threads(thread_count()) schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    scalar_t* row = w + i * cols;
    const acc_t* u = update + i * cols;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) {
      const acc_t kept = load_as<acc_t>(row[j]) * keep;
      const acc_t moved = step * u[j];
      const scalar_t stored = store_as<scalar_t>(kept - moved);
      row[j] = stored;
      const acc_t x = load_as<acc_t>(stored);
      sum += x * x;
    }
    norms[i] = std::max(std::sqrt(sum), static_cast<acc_t>(kNormFloor));
  }
}

}  // namespace

at::Tensor project_back_update(const at::Tensor& weight, const at::Tensor& direction,
                               const std::optional<at::Tensor>& left, const std::optional<at::Tensor>& right,
                               double step_size, double decay, const at::Tensor& gate) {
  TORCH_CHECK(weight.device().is_cpu(), "weight must be a CPU tensor for the cpu backend, got ", weight.device());
  const UpdateFactors factors = check_project_back_arguments(weight, direction, left, right, gate);
  const auto acc = accumulation_type(weight.scalar_type());
  const int64_t rows = weight.size(0), cols = weight.size(1);
  at::Tensor norms = at::empty({rows}, weight.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, weight.scalar_type(), "gradnormlorp_cpu_project_back_update", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        // As the reference: (1 - gate * decay) and (gate * step_size) in the accumulation dtype.
        const acc_t g = gate.to(acc).item<acc_t>();
        const acc_t keep = static_cast<acc_t>(1.0) - g * static_cast<acc_t>(decay);
        const acc_t step = g * static_cast<acc_t>(step_size);
        scalar_t* w = weight.mutable_data_ptr<scalar_t>();
        acc_t* out = norms.mutable_data_ptr<acc_t>();
        if (factors.full.defined()) {
          update_rows(w, factors.full.const_data_ptr<acc_t>(), out, rows, cols, keep, step);
          return;
        }
        const int64_t block_rows =
            std::min(rows, std::max<int64_t>(1, kUpdateBlockBytes / std::max<int64_t>(1, cols * sizeof(acc_t))));
        at::Tensor buffer = at::empty({block_rows, cols}, weight.options().dtype(acc));
        for (int64_t start = 0; start < rows; start += block_rows) {
          const int64_t count = std::min(block_rows, rows - start);
          at::Tensor block = buffer.narrow(0, 0, count);
          at::mm_out(block, factors.row_factor.narrow(0, start, count), factors.col_factor);
          update_rows(w + start * cols, block.const_data_ptr<acc_t>(), out + start, count, cols, keep, step);
        }
      });
  return norms;
}

}  // namespace gradnormlorp::cpu
