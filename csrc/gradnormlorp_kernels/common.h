// Shared by the CPU and CUDA kernels: input checks and the constants the reference ops fix (block
// size of the 8-bit states, the norm floor).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

namespace gradnormlorp {

// bitsandbytes' block-wise layout: one float32 absmax per 256 consecutive elements.
constexpr int64_t kQuantBlock = 256;
// Entries in a dynamic quantisation map (one per uint8 code).
constexpr int64_t kCodeSize = 256;
// Row norms are clamped here, as in the reference (a zero row would make M / n a 0 / 0).
constexpr double kNormFloor = 1e-12;

inline int64_t num_quant_blocks(int64_t numel) { return (numel + kQuantBlock - 1) / kQuantBlock; }

// float64 stays float64 (the exactness tests); everything narrower accumulates in float32.
inline c10::ScalarType accumulation_type(c10::ScalarType dtype) {
  return dtype == c10::kDouble ? c10::kDouble : c10::kFloat;
}

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on the same device as ", like_name, " (", like.device(),
              "), got ", t.device());
}

// The dtype as Python spells it ("torch.float32"), for messages read by Python users.
inline std::string dtype_name(c10::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

inline void check_dtype(const at::Tensor& t, const char* name, c10::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype_name(dtype), ", got ", dtype_name(t.scalar_type()));
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == c10::kFloat || s == c10::kDouble || s == c10::kBFloat16 || s == c10::kHalf, name,
              " must be torch.float32, float64, bfloat16 or float16, got ", dtype_name(s));
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

// Tensors the kernels write in place cannot be made contiguous behind the caller's back.
inline void check_contiguous_inplace(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " is updated in place and must be contiguous (got strides ", t.strides(),
              ")");
}

// adapter_row_norm's factors beside base_weight (out, in): lora_A (rank, in), lora_B (out, rank).
inline void check_adapter_factors(const at::Tensor& base_weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  check_dim(lora_A, "lora_A", 2);
  check_dim(lora_B, "lora_B", 2);
  check_device(lora_A, "lora_A", base_weight, "base_weight");
  check_device(lora_B, "lora_B", base_weight, "base_weight");
  const int64_t rows = base_weight.size(0), cols = base_weight.size(1), rank = lora_A.size(0);
  TORCH_CHECK(lora_A.size(1) == cols, "lora_A must have shape (rank, ", cols, ") to match base_weight ",
              base_weight.sizes(), ", got ", lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == rows && lora_B.size(1) == rank, "lora_B must have shape (", rows, ", ", rank,
              "), got ", lora_B.sizes());
}

}  // namespace gradnormlorp
