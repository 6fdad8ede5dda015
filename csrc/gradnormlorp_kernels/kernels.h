// The kernels behind the `cpu` and `cuda` backends. Each function takes exactly the arguments of the
// reference op of the same name (gradnormlorp_kernels/ops/*.py) and returns what it returns.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace gradnormlorp {

#define GRADNORMLORP_DECLARE_KERNELS                                                                          \
  at::Tensor row_norm(const at::Tensor& weight);                                                              \
  std::tuple<at::Tensor, at::Tensor> adapter_row_norm(const at::Tensor& base_weight, const at::Tensor& lora_A, \
                                                      const at::Tensor& lora_B, double scaling);              \
  at::Tensor adam_update(const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,     \
                         const std::optional<at::Tensor>& absmax_avg,                                         \
                         const std::optional<at::Tensor>& absmax_avg_sq,                                      \
                         const std::optional<at::Tensor>& code_signed,                                        \
                         const std::optional<at::Tensor>& code_unsigned, const at::Tensor& step,              \
                         const at::Tensor& skipped, double beta1, double beta2, double eps);                  \
  at::Tensor project_back_update(const at::Tensor& weight, const at::Tensor& direction,                      \
                                 const std::optional<at::Tensor>& left, const std::optional<at::Tensor>& right, \
                                 double step_size, double decay, const at::Tensor& gate);

namespace cpu {
GRADNORMLORP_DECLARE_KERNELS
}  // namespace cpu

#ifdef GRADNORMLORP_WITH_CUDA
namespace cuda {
GRADNORMLORP_DECLARE_KERNELS
}  // namespace cuda
#endif

#undef GRADNORMLORP_DECLARE_KERNELS

}  // namespace gradnormlorp
