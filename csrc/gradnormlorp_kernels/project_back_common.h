// Argument checks and the factorisation of the update shared by the CPU and CUDA project-back kernels.
#pragma once

#include "common.h"

#include <ATen/ops/mm.h>

#include <optional>

namespace gradnormlorp {

// The update P N Q^T written as row_factor @ col_factor (k small), so that it can be formed a block of
// rows at a time. With no projector at all the update is the direction itself (row_factor undefined).
struct UpdateFactors {
  at::Tensor row_factor;  // (out, k), accumulation dtype
  at::Tensor col_factor;  // (k, in), accumulation dtype
  at::Tensor full;        // (out, in), accumulation dtype, only when neither side is projected
};

inline UpdateFactors check_project_back_arguments(const at::Tensor& weight, const at::Tensor& direction,
                                                  const std::optional<at::Tensor>& left,
                                                  const std::optional<at::Tensor>& right, const at::Tensor& gate) {
  check_dim(weight, "weight", 2);
  check_floating(weight, "weight");
  check_contiguous_inplace(weight, "weight");
  check_dim(direction, "direction", 2);
  check_floating(direction, "direction");
  check_device(direction, "direction", weight, "weight");
  check_device(gate, "gate", weight, "weight");
  TORCH_CHECK(gate.dim() == 0 && at::isFloatingType(gate.scalar_type()), "gate must be a 0-d floating tensor, got ",
              dtype_name(gate.scalar_type()), " of shape ", gate.sizes());
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t rows = left ? left->size(1) : out;
  const int64_t cols = right ? right->size(1) : in;
  if (left) {
    check_dim(*left, "left", 2);
    check_device(*left, "left", weight, "weight");
    TORCH_CHECK(left->size(0) == out, "left must have shape (", out, ", rank) to match weight ", weight.sizes(),
                ", got ", left->sizes());
  }
  if (right) {
    check_dim(*right, "right", 2);
    check_device(*right, "right", weight, "weight");
    TORCH_CHECK(right->size(0) == in, "right must have shape (", in, ", rank) to match weight ", weight.sizes(),
                ", got ", right->sizes());
  }
  TORCH_CHECK(direction.size(0) == rows && direction.size(1) == cols, "direction must have shape (", rows, ", ",
              cols, ") for weight ", weight.sizes(), (left ? " with left" : ""), (right ? " with right" : ""),
              " projector, got ", direction.sizes());

  const auto acc = accumulation_type(weight.scalar_type());
  UpdateFactors f;
  const at::Tensor n = direction.to(acc);
  if (left && right) {
    f.row_factor = left->to(acc);
    f.col_factor = at::mm(n, right->to(acc).t());
  } else if (left) {
    f.row_factor = left->to(acc);
    f.col_factor = n;
  } else if (right) {
    f.row_factor = n;
    f.col_factor = right->to(acc).t();
  } else {
    f.full = n.contiguous();
  }
  return f;
}

}  // namespace gradnormlorp
