// Python bindings of gradnormlorp_kernels._C. Each kernel is exposed as `<backend>_<op>` with the
// argument names of the reference op, so it can be registered with the op registry unchanged.
#include "kernels.h"

#include <torch/extension.h>
#include <torch/version.h>

namespace py = pybind11;

namespace {

template <typename Module>
void bind_backend(Module& m, const std::string& prefix, decltype(&gradnormlorp::cpu::row_norm) row_norm,
                  decltype(&gradnormlorp::cpu::adapter_row_norm) adapter_row_norm,
                  decltype(&gradnormlorp::cpu::adam_update) adam_update,
                  decltype(&gradnormlorp::cpu::project_back_update) project_back_update) {
  m.def((prefix + "row_norm").c_str(), row_norm, "||weight||_row in float32 (float64 for float64 input)",
        py::arg("weight"));
  m.def((prefix + "adapter_row_norm").c_str(), adapter_row_norm, "(||W0 + s B A||_row, W0 A^T)",
        py::arg("base_weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"));
  m.def((prefix + "adam_update").c_str(), adam_update,
        "Adam moments updated in place (8-bit block-wise or float32); returns the direction",
        py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("absmax_avg"), py::arg("absmax_avg_sq"),
        py::arg("code_signed"), py::arg("code_unsigned"), py::arg("step"), py::arg("skipped"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"));
  m.def((prefix + "project_back_update").c_str(), project_back_update,
        "W <- W (1 - gate decay) - gate step_size P N Q^T in place; returns the new row norms", py::arg("weight"),
        py::arg("direction"), py::arg("left"), py::arg("right"), py::arg("step_size"), py::arg("decay"),
        py::arg("gate"));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled CPU (and, when built with CUDA, GPU) kernels of gradnormlorp_kernels";
  // The torch this was compiled against: the C++ ABI is only stable within one torch release.
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  m.def("has_cuda", [] {
#ifdef GRADNORMLORP_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled in");
  bind_backend(m, "cpu_", &gradnormlorp::cpu::row_norm, &gradnormlorp::cpu::adapter_row_norm,
               &gradnormlorp::cpu::adam_update, &gradnormlorp::cpu::project_back_update);
#ifdef GRADNORMLORP_WITH_CUDA
  bind_backend(m, "cuda_", &gradnormlorp::cuda::row_norm, &gradnormlorp::cuda::adapter_row_norm,
               &gradnormlorp::cuda::adam_update, &gradnormlorp::cuda::project_back_update);
#endif
}
