// C++ unit tests of the CPU kernels against dense float64 formulas (no Python involved). Run by ctest.
// Each check prints what failed; the exit status is the number of failed checks (0: all passed).
#include "kernels.h"

#include <ATen/ATen.h>

#include <cmath>
#include <functional>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

namespace {

namespace k = gradnormlorp::cpu;

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::cerr << "FAILED: " << what << "\n";
  }
}

// max |actual - expected| <= tol * max(1, max |expected|)
void expect_close(const at::Tensor& actual, const at::Tensor& expected, double tol, const std::string& what) {
  const at::Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  if (a.sizes() != e.sizes()) {
    expect(false, what + ": shape mismatch");
    return;
  }
  const double scale = std::max(1.0, e.numel() ? e.abs().max().item<double>() : 0.0);
  const double error = a.numel() ? (a - e).abs().max().item<double>() : 0.0;
  expect(error <= tol * scale, what + ": error " + std::to_string(error) + " > " + std::to_string(tol * scale));
}

// The call throws a c10::Error whose message names `argument`.
void expect_rejects(const std::function<void()>& call, const std::string& argument, const std::string& what) {
  try {
    call();
    expect(false, what + ": no error raised");
  } catch (const c10::Error& e) {
    expect(std::string(e.what_without_backtrace()).find(argument) != std::string::npos,
           what + ": message does not name " + argument + ": " + e.what_without_backtrace());
  }
}

at::Tensor dense_row_norm(const at::Tensor& w) {
  return w.to(at::kDouble).square().sum(1).sqrt().clamp_min(1e-12);
}

const std::vector<std::pair<int64_t, int64_t>> kShapes = {{1, 1}, {3, 17}, {129, 257}, {64, 4096}};

void test_row_norm() {
  for (const auto& [rows, cols] : kShapes) {
    const at::Tensor w = at::randn({rows, cols}, at::kDouble);
    expect_close(k::row_norm(w), dense_row_norm(w), 1e-14, "row_norm float64 " + std::to_string(rows));
    expect_close(k::row_norm(w.to(at::kFloat)), dense_row_norm(w.to(at::kFloat)), 1e-6, "row_norm float32");
    const at::Tensor bf = w.to(at::kBFloat16);
    const at::Tensor norms = k::row_norm(bf);
    expect(norms.scalar_type() == at::kFloat, "row_norm of bfloat16 is float32");
    expect_close(norms, dense_row_norm(bf), 1e-6, "row_norm bfloat16");
  }
  const at::Tensor zero = at::zeros({2, 5});
  expect_close(k::row_norm(zero), at::full({2}, 1e-12), 0.0, "row_norm floor on a zero row");
  const at::Tensor base = at::randn({8, 6});
  expect_close(k::row_norm(base.t()), dense_row_norm(base.t()), 1e-6, "row_norm of a transposed view");
  expect_rejects([] { k::row_norm(at::randn({3})); }, "weight", "row_norm of a 1-D tensor");
  expect_rejects([] { k::row_norm(at::ones({2, 2}, at::kInt)); }, "weight", "row_norm of an int tensor");
}

void test_adapter_row_norm() {
  for (const auto& [rows, cols] : kShapes) {
    for (const int64_t rank : {1, 5}) {
      const at::Tensor w0 = at::randn({rows, cols}, at::kDouble);
      const at::Tensor a = at::randn({rank, cols}, at::kDouble);
      const at::Tensor b = at::randn({rows, rank}, at::kDouble);
      const double s = 0.75;
      const auto [norms, base_A] = k::adapter_row_norm(w0, a, b, s);
      expect_close(norms, dense_row_norm(w0 + s * b.mm(a)), 1e-12, "adapter_row_norm float64");
      expect_close(base_A, w0.mm(a.t()), 1e-12, "adapter W0 A^T float64");
      const at::Tensor w0_bf = w0.to(at::kBFloat16);
      const auto [norms_bf, base_A_bf] = k::adapter_row_norm(w0_bf, a.to(at::kFloat), b.to(at::kFloat), s);
      expect_close(norms_bf, dense_row_norm(w0_bf.to(at::kDouble) + s * b.mm(a)), 1e-5, "adapter_row_norm bf16");
      expect_close(base_A_bf, w0_bf.to(at::kDouble).mm(a.t()), 1e-5, "adapter W0 A^T bf16");
    }
  }
  expect_rejects([] { k::adapter_row_norm(at::randn({4, 6}), at::randn({2, 5}), at::randn({4, 2}), 1.0); }, "lora_A",
                 "adapter_row_norm with mismatched lora_A");
  expect_rejects([] { k::adapter_row_norm(at::randn({4, 6}), at::randn({2, 6}), at::randn({4, 3}), 1.0); }, "lora_B",
                 "adapter_row_norm with mismatched lora_B");
}

struct FloatAdam {
  at::Tensor m, v;
  double step = 0;
};

// One float64 Adam step; returns the direction.
at::Tensor hand_adam(FloatAdam& st, const at::Tensor& g64, double b1, double b2, double eps) {
  st.step += 1;
  st.m = b1 * st.m + (1 - b1) * g64;
  st.v = b2 * st.v + (1 - b2) * g64 * g64;
  return (st.m / (1 - std::pow(b1, st.step))) / ((st.v / (1 - std::pow(b2, st.step))).sqrt() + eps);
}

void test_adam_float_states() {
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  for (const auto& [rows, cols] : kShapes) {
    at::Tensor m = at::zeros({rows, cols}), v = at::zeros({rows, cols});
    at::Tensor step = at::zeros({}), skipped = at::zeros({});
    FloatAdam hand{at::zeros({rows, cols}, at::kDouble), at::zeros({rows, cols}, at::kDouble)};
    for (int t = 1; t <= 3; ++t) {
      const at::Tensor g = at::randn({rows, cols});
      const at::Tensor dir = k::adam_update(g, m, v, std::nullopt, std::nullopt, std::nullopt, std::nullopt, step,
                                            skipped, b1, b2, eps);
      expect_close(dir, hand_adam(hand, g.to(at::kDouble), b1, b2, eps), 1e-4, "adam direction, float32 states");
      expect_close(m, hand.m, 1e-6, "adam exp_avg, float32 states");
      expect_close(v, hand.v, 1e-6, "adam exp_avg_sq, float32 states");
    }
    expect(step.item<float>() == 3.0f && skipped.item<float>() == 0.0f, "adam counts three finite steps");

    at::Tensor bad = at::randn({rows, cols});
    bad.view(-1)[bad.numel() - 1] = std::numeric_limits<float>::quiet_NaN();
    const at::Tensor m_before = m.clone(), v_before = v.clone();
    const at::Tensor dir = k::adam_update(bad, m, v, std::nullopt, std::nullopt, std::nullopt, std::nullopt, step,
                                          skipped, b1, b2, eps);
    expect(dir.eq(0).all().item<bool>(), "adam direction is zero for a non-finite gradient");
    expect(m.equal(m_before) && v.equal(v_before), "adam states untouched by a non-finite gradient");
    expect(step.item<float>() == 3.0f && skipped.item<float>() == 1.0f, "adam skips and counts a non-finite step");
  }
}

// A dynamic-map-like sorted code: signed in [-1, 1] or unsigned in [0, 1], 256 entries, 0 included.
at::Tensor test_code(bool is_signed) {
  const at::Tensor lin = at::linspace(0, 1, is_signed ? 129 : 256, at::kDouble).pow(3);
  if (!is_signed) return lin.to(at::kFloat);
  return at::cat({-lin.slice(0, 1).flip(0), lin.slice(0, 0, 128)}).to(at::kFloat);
}

void test_adam_quantized_states() {
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  const at::Tensor code_s = test_code(true), code_u = test_code(false);
  for (const auto& [rows, cols] : kShapes) {
    const int64_t n = rows * cols, blocks = (n + 255) / 256;
    const uint8_t zero_s = static_cast<uint8_t>(code_s.abs().argmin().item<int64_t>());
    at::Tensor m = at::full({rows, cols}, zero_s, at::kByte), v = at::zeros({rows, cols}, at::kByte);
    at::Tensor am = at::zeros({blocks}), av = at::zeros({blocks});
    at::Tensor step = at::zeros({}), skipped = at::zeros({});
    const at::Tensor g = at::randn({rows, cols});
    const at::Tensor dir = k::adam_update(g, m, v, am, av, code_s, code_u, step, skipped, b1, b2, eps);
    // First step from zero moments: m = (1 - b1) g, v = (1 - b2) g^2, direction ~ sign(g).
    FloatAdam hand{at::zeros({rows, cols}, at::kDouble), at::zeros({rows, cols}, at::kDouble)};
    expect_close(dir, hand_adam(hand, g.to(at::kDouble), b1, b2, eps), 1e-5, "8-bit adam first direction");
    const at::Tensor m_flat = at::constant_pad_nd(hand.m.view(-1), {0, blocks * 256 - n}).view({blocks, 256});
    expect_close(am, m_flat.abs().amax(1), 1e-6, "8-bit adam absmax is the block max");
    // Each code is the nearest map entry to m / absmax (checked against a brute-force search).
    const at::Tensor scaled = (hand.m.view(-1) / am.to(at::kDouble).repeat_interleave(256).slice(0, 0, n));
    const at::Tensor distance = (scaled.unsqueeze(1) - code_s.to(at::kDouble).unsqueeze(0)).abs();
    const at::Tensor chosen = distance.gather(1, m.view({-1, 1}).to(at::kLong)).squeeze(1);
    expect(((chosen - std::get<0>(distance.min(1))).max().item<double>() <= 1e-6), "8-bit adam codes are nearest");
    expect(step.item<float>() == 1.0f, "8-bit adam counts the step");
  }
  at::Tensor m = at::zeros({4, 4}, at::kByte), v = at::zeros({4, 4}, at::kByte);
  expect_rejects([&] { k::adam_update(at::randn({4, 4}), m, v, at::zeros({2}), at::zeros({1}), code_s, code_u,
                                      at::zeros({}), at::zeros({}), 0.9, 0.999, 1e-8); },
                 "absmax_avg", "adam with a wrong absmax size");
  expect_rejects([&] { k::adam_update(at::randn({4, 4}), m.to(at::kFloat), v, at::zeros({1}), at::zeros({1}),
                                      code_s, code_u, at::zeros({}), at::zeros({}), 0.9, 0.999, 1e-8); },
                 "exp_avg", "adam with float moments and absmax");
  expect_rejects([&] { k::adam_update(at::randn({4, 4}), m, v, at::zeros({1}), std::nullopt, code_s, code_u,
                                      at::zeros({}), at::zeros({}), 0.9, 0.999, 1e-8); },
                 "absmax_avg_sq", "adam with half the 8-bit arguments");
}

void test_project_back() {
  const int64_t rank = 4;
  for (const auto& [rows, cols] : kShapes) {
    for (const bool use_left : {false, true}) {
      for (const bool use_right : {false, true}) {
        const at::Tensor left = at::randn({rows, rank}, at::kDouble), right = at::randn({cols, rank}, at::kDouble);
        const at::Tensor dir = at::randn({use_left ? rank : rows, use_right ? rank : cols}, at::kDouble);
        at::Tensor update = dir;
        if (use_left) update = left.mm(update);
        if (use_right) update = update.mm(right.t());
        const std::optional<at::Tensor> l = use_left ? std::optional<at::Tensor>(left) : std::nullopt;
        const std::optional<at::Tensor> r = use_right ? std::optional<at::Tensor>(right) : std::nullopt;
        const std::string name =
            "project_back left=" + std::to_string(use_left) + " right=" + std::to_string(use_right);
        for (const double gate : {1.0, 0.0}) {
          at::Tensor w = at::randn({rows, cols}, at::kDouble);
          const at::Tensor expected = w * (1 - gate * 0.1) - (gate * 0.01) * update;
          const at::Tensor norms = k::project_back_update(w, dir, l, r, 0.01, 0.1, at::full({}, gate));
          expect_close(w, expected, 1e-13, name + " float64 weight");
          expect_close(norms, dense_row_norm(expected), 1e-13, name + " float64 norms");
        }
        at::Tensor w_bf = at::randn({rows, cols}).to(at::kBFloat16);
        const at::Tensor start = w_bf.to(at::kDouble);
        const at::Tensor norms_bf = k::project_back_update(
            w_bf, dir.to(at::kFloat), use_left ? std::optional<at::Tensor>(left.to(at::kFloat)) : std::nullopt,
            use_right ? std::optional<at::Tensor>(right.to(at::kFloat)) : std::nullopt, 0.01, 0.1, at::ones({}));
        expect_close(w_bf, start * 0.9 - 0.01 * update, 1e-2, name + " bfloat16 weight");
        expect_close(norms_bf, dense_row_norm(w_bf), 1e-5, name + " bfloat16 norms are those of the stored weight");
      }
    }
  }
  at::Tensor w = at::randn({4, 6});
  expect_rejects([&] { k::project_back_update(w, at::randn({2, 6}), at::randn({5, 2}), std::nullopt, 1, 0,
                                              at::ones({})); },
                 "left", "project_back with a mismatched left projector");
  expect_rejects([&] { k::project_back_update(w, at::randn({3, 6}), at::randn({4, 2}), std::nullopt, 1, 0,
                                              at::ones({})); },
                 "direction", "project_back with a mismatched direction");
  expect_rejects([&] { k::project_back_update(w.t(), at::randn({6, 4}), std::nullopt, std::nullopt, 1, 0,
                                              at::ones({})); },
                 "contiguous", "project_back on a non-contiguous weight");
  expect_rejects([&] { k::project_back_update(w, at::randn({4, 6}), std::nullopt, std::nullopt, 1, 0,
                                              at::ones({1})); },
                 "gate", "project_back with a 1-D gate");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_row_norm();
  test_adapter_row_norm();
  test_adam_float_states();
  test_adam_quantized_states();
  test_project_back();
  std::cout << (failures == 0 ? "all CPU kernel tests passed" : "CPU kernel tests failed") << " (" << failures
            << " failures)\n";
  return failures == 0 ? 0 : 1;
}
