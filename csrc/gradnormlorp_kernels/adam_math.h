// The per-element Adam arithmetic and the 8-bit code search, shared by the CPU and CUDA kernels.
// Each step mirrors the float32 operations of the reference op in the same order, so that the moments
// (and hence the 8-bit codes) agree with it bit for bit wherever the rounding allows.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace gradnormlorp {

struct AdamScalars {
  float lerp_coeff;     // torch.lerp's coefficient: w below 0.5, else w - 1
  bool lerp_from_start; // torch.lerp's base: start below 0.5, else end
  float beta2;
  float one_minus_beta2;
  float inverse_bias1;       // 1 / (1 - beta1^step)
  float inverse_root_bias2;  // 1 / sqrt(1 - beta2^step)
  float eps;
};

// torch.lerp(m, g, w) as ATen evaluates it: one fused multiply-add, computed here in double (the product
// of two floats is exact there) so the result does not depend on the target having an FMA unit.
C10_HOST_DEVICE inline float first_moment(float m, float g, const AdamScalars& s) {
  const double base = s.lerp_from_start ? m : g;
  return static_cast<float>(base + static_cast<double>(s.lerp_coeff) * static_cast<double>(g - m));
}

// v * beta2 + ((1 - beta2) * g) * g, rounded after each operation as the reference does.
C10_HOST_DEVICE inline float second_moment(float v, float g, const AdamScalars& s) {
  const float decayed = v * s.beta2;
  const float scaled = s.one_minus_beta2 * g;
  const float fresh = scaled * g;
  return decayed + fresh;
}

// (m (1 / bias1)) / (sqrt(v) (1 / sqrt(bias2)) + eps): one division and one root an element
C10_HOST_DEVICE inline float adam_direction(float m, float v, const AdamScalars& s) {
  return (m * s.inverse_bias1) / (::sqrtf(v) * s.inverse_root_bias2 + s.eps);
}

// Index of the nearest map entry: the number of midpoints below x (torch.bucketize, right=False).
// `midpoints` holds 256 floats, the last +inf, so an 8-step branch-free search finds it.
C10_HOST_DEVICE inline uint8_t nearest_code(const float* midpoints, float x) {
  int pos = 0;
  for (int step = 128; step > 0; step >>= 1) {
    pos += (midpoints[pos + step - 1] < x) ? step : 0;
  }
  return static_cast<uint8_t>(pos);
}

// Scale into [-1, 1] by the block's absmax (0 for an all-zero block), as quantize_blockwise does.
C10_HOST_DEVICE inline float scale_to_unit(float x, float inverse_absmax) {
  const float scaled = x * inverse_absmax;
  return scaled < -1.0f ? -1.0f : (scaled > 1.0f ? 1.0f : scaled);
}

}  // namespace gradnormlorp

namespace gradnormlorp {

// Scalars of one step; `step` is the step count after this update. Host and device: the CUDA kernel
// reads the step count on the device (no synchronisation) and builds these there.
C10_HOST_DEVICE inline AdamScalars make_adam_scalars(double beta1, double beta2, double eps, float step) {
  AdamScalars s;
  const float weight = static_cast<float>(1.0 - beta1);
  s.lerp_from_start = weight < 0.5f;
  s.lerp_coeff = s.lerp_from_start ? weight : weight - 1.0f;
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.inverse_bias1 = 1.0f / (1.0f - ::powf(static_cast<float>(beta1), step));
  s.inverse_root_bias2 = 1.0f / ::sqrtf(1.0f - ::powf(static_cast<float>(beta2), step));
  s.eps = static_cast<float>(eps);
  return s;
}

}  // namespace gradnormlorp
