// Argument checks shared by the CPU and CUDA Adam kernels, so that both backends accept and reject
// exactly the same arguments.
#pragma once

#include "common.h"

#include <optional>

namespace gradnormlorp {

// Checks the arguments of adam_update against each other; returns whether the states are 8-bit.
inline bool check_adam_arguments(const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                 const std::optional<at::Tensor>& absmax_avg,
                                 const std::optional<at::Tensor>& absmax_avg_sq,
                                 const std::optional<at::Tensor>& code_signed,
                                 const std::optional<at::Tensor>& code_unsigned, const at::Tensor& step,
                                 const at::Tensor& skipped) {
  check_floating(grad, "grad");
  const bool quantized = absmax_avg.has_value();
  TORCH_CHECK(absmax_avg_sq.has_value() == quantized && code_signed.has_value() == quantized &&
                  code_unsigned.has_value() == quantized,
              "absmax_avg, absmax_avg_sq, code_signed and code_unsigned must be given together (8-bit states) "
              "or all be None (float32 states)");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{exp_avg, "exp_avg"},
                                {exp_avg_sq, "exp_avg_sq"}}) {
    check_device(t, name, grad, "grad");
    check_contiguous_inplace(t, name);
    check_dtype(t, name, quantized ? c10::kByte : c10::kFloat);
    TORCH_CHECK(t.sizes() == grad.sizes(), name, " must have the shape of grad ", grad.sizes(), ", got ", t.sizes());
  }
  if (quantized) {
    const int64_t blocks = num_quant_blocks(grad.numel());
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*absmax_avg, "absmax_avg"},
                                  {*absmax_avg_sq, "absmax_avg_sq"}}) {
      check_device(t, name, grad, "grad");
      check_contiguous_inplace(t, name);
      check_dtype(t, name, c10::kFloat);
      TORCH_CHECK(t.dim() == 1 && t.size(0) == blocks, name, " must have shape (", blocks,
                  ",) (one absmax per block of ", kQuantBlock, "), got ", t.sizes());
    }
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*code_signed, "code_signed"},
                                  {*code_unsigned, "code_unsigned"}}) {
      check_device(t, name, grad, "grad");
      check_dtype(t, name, c10::kFloat);
      TORCH_CHECK(t.dim() == 1 && t.size(0) == kCodeSize, name, " must have shape (", kCodeSize, ",), got ",
                  t.sizes());
    }
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{step, "step"}, {skipped, "skipped"}}) {
    check_device(t, name, grad, "grad");
    check_dtype(t, name, c10::kFloat);
    TORCH_CHECK(t.dim() == 0, name, " must be a 0-d tensor, got shape ", t.sizes());
  }
  return quantized;
}

}  // namespace gradnormlorp
