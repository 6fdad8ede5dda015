// CPU Adam update in place: 8-bit block-wise states (dequantise, update, requantise per block of 256,
// in cache) or float32 states, returning the normalised direction. A non-finite gradient changes no state.
#include "adam_common.h"
#include "adam_math.h"
#include "common.h"
#include "cpu_loops.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace gradnormlorp::cpu {
namespace {

template <typename scalar_t>
bool all_finite(const scalar_t* g, int64_t n) {
  int64_t bad = 0;
#pragma omp parallel for num_threads(thread_count()) reduction(+ : bad) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    // x - x is 0 for finite x and NaN for inf/NaN; the comparison vectorises, std::isfinite does not.
    const float x = load_as<float>(g[i]);
    bad += (x - x != 0.0f) ? 1 : 0;
  }
  return bad == 0;
}

// 256 midpoints between consecutive map entries, the last +inf (see nearest_code).
void map_midpoints(const float* code, float* midpoints) {
  for (int64_t i = 0; i + 1 < kCodeSize; ++i) midpoints[i] = (code[i + 1] + code[i]) * 0.5f;
  midpoints[kCodeSize - 1] = std::numeric_limits<float>::infinity();
}

// A float's bits mapped to an unsigned integer of the same order (negative floats reversed).
inline uint32_t ordered_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float from_ordered_bits(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// The nearest code by table instead of an 8-step binary search (which dominated the CPU update): the
// top 16 bits of a value's ordered bits pick a bucket 2^-7 wide relative to the value, the table holds
// the number of midpoints below the bucket's smallest value, and a walk over the few midpoints inside
// the bucket (at most two for bitsandbytes' maps) finishes. Gives exactly nearest_code's answer.
class CodeTable {
 public:
  static constexpr int kBuckets = 1 << 16;

  explicit CodeTable(const float* code) : start_(kBuckets) {
    map_midpoints(code, midpoints_);
    int count = 0;
    for (uint32_t bucket = 0; bucket < static_cast<uint32_t>(kBuckets); ++bucket) {
      const float lowest = from_ordered_bits(bucket << 16);
      if (lowest == lowest) {  // the buckets below -inf hold NaN bit patterns: nothing is below them
        while (midpoints_[count] < lowest) ++count;
      }
      start_[bucket] = static_cast<uint8_t>(count);
    }
  }

  uint8_t nearest(float x) const {
    int code = start_[ordered_bits(x) >> 16];
    while (midpoints_[code] < x) ++code;  // midpoints_[255] is +inf: the walk stops there at the latest
    return static_cast<uint8_t>(code);
  }

 private:
  float midpoints_[kCodeSize];
  std::vector<uint8_t> start_;
};

template <typename scalar_t>
void update_quantized(const scalar_t* grad, uint8_t* m_codes, uint8_t* v_codes, float* m_absmax, float* v_absmax,
                      const float* code_signed, const float* code_unsigned, float* direction, int64_t n,
                      const AdamScalars& s) {
  const CodeTable signed_table(code_signed), unsigned_table(code_unsigned);
  const int64_t blocks = num_quant_blocks(n);
#pragma omp parallel for num_threads(thread_count()) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kQuantBlock;
    const int64_t len = std::min(kQuantBlock, n - start);
    float m[kQuantBlock], v[kQuantBlock];
    const float m_scale = m_absmax[b], v_scale = v_absmax[b];
    float m_max = 0.0f, v_max = 0.0f;
    for (int64_t i = 0; i < len; ++i) {
      const float g = load_as<float>(grad[start + i]);
      m[i] = first_moment(code_signed[m_codes[start + i]] * m_scale, g, s);
      v[i] = second_moment(code_unsigned[v_codes[start + i]] * v_scale, g, s);
      direction[start + i] = adam_direction(m[i], v[i], s);
      m_max = std::max(m_max, std::abs(m[i]));
      v_max = std::max(v_max, std::abs(v[i]));
    }
    const float m_inverse = m_max > 0.0f ? 1.0f / m_max : 0.0f;
    const float v_inverse = v_max > 0.0f ? 1.0f / v_max : 0.0f;
    for (int64_t i = 0; i < len; ++i) {
      m_codes[start + i] = signed_table.nearest(scale_to_unit(m[i], m_inverse));
      v_codes[start + i] = unsigned_table.nearest(scale_to_unit(v[i], v_inverse));
    }
    m_absmax[b] = m_max;
    v_absmax[b] = v_max;
  }
}

template <typename scalar_t>
void update_float(const scalar_t* grad, float* m, float* v, float* direction, int64_t n, const AdamScalars& s) {
#pragma omp parallel for simd num_threads(thread_count()) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = load_as<float>(grad[i]);
    const float m_new = first_moment(m[i], g, s);
    const float v_new = second_moment(v[i], g, s);
    m[i] = m_new;
    v[i] = v_new;
    direction[i] = adam_direction(m_new, v_new, s);
  }
}

}  // namespace

at::Tensor adam_update(const at::Tensor& grad_in, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                       const std::optional<at::Tensor>& absmax_avg, const std::optional<at::Tensor>& absmax_avg_sq,
                       const std::optional<at::Tensor>& code_signed, const std::optional<at::Tensor>& code_unsigned,
                       const at::Tensor& step, const at::Tensor& skipped, double beta1, double beta2, double eps) {
  TORCH_CHECK(grad_in.device().is_cpu(), "grad must be a CPU tensor for the cpu backend, got ", grad_in.device());
  const bool quantized = check_adam_arguments(grad_in, exp_avg, exp_avg_sq, absmax_avg, absmax_avg_sq, code_signed,
                                              code_unsigned, step, skipped);
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = grad.numel();
  at::Tensor direction = at::empty(grad.sizes(), grad.options().dtype(at::kFloat));
  float* step_value = step.mutable_data_ptr<float>();
  float* skipped_value = skipped.mutable_data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "gradnormlorp_cpu_adam_update", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    if (!all_finite(g, n)) {
      direction.zero_();
      *skipped_value += 1.0f;
      return;
    }
    const float new_step = *step_value + 1.0f;
    const AdamScalars s = make_adam_scalars(beta1, beta2, eps, new_step);
    float* dir = direction.mutable_data_ptr<float>();
    if (quantized) {
      const at::Tensor signed_map = code_signed->contiguous();
      const at::Tensor unsigned_map = code_unsigned->contiguous();
      update_quantized(g, exp_avg.mutable_data_ptr<uint8_t>(), exp_avg_sq.mutable_data_ptr<uint8_t>(),
                       absmax_avg->mutable_data_ptr<float>(), absmax_avg_sq->mutable_data_ptr<float>(),
                       signed_map.const_data_ptr<float>(), unsigned_map.const_data_ptr<float>(), dir, n, s);
    } else {
      update_float(g, exp_avg.mutable_data_ptr<float>(), exp_avg_sq.mutable_data_ptr<float>(), dir, n, s);
    }
    *step_value = new_step;
  });
  return direction;
}

}  // namespace gradnormlorp::cpu
