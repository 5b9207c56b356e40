// The whole op surface of swiftlora: one schema per op (implementations register in csrc/cpu and csrc/cuda).
// Ops ending in `_` write into the arguments marked (a!): see each op's Python module for what goes where.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(swiftlora, m) {
  // y = w·x/rms(x) (offset: (1+w)·x/rms(x), Gemma); returns (y, rstd float32 [...]).
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool offset) -> (Tensor, Tensor)");
  // (grad_x, grad_weight); grad_weight is an empty tensor unless weight_grad.
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, bool offset, bool weight_grad)"
        " -> (Tensor, Tensor)");
  // Same, grad_x written into grad_y's buffer; returns grad_weight.
  m.def("rms_norm_backward_(Tensor(a!) grad_y, Tensor x, Tensor weight, Tensor rstd, bool offset, "
        "bool weight_grad) -> Tensor");
  // Rotates the first R = 2·cos.size(-1) dims of every head of q and k (rotate-half convention); inverse
  // rotates backwards (the backward pass). Returns new (q, k) with the inputs' strides.
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, bool inverse) -> (Tensor, Tensor)");
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? position_ids, bool inverse) -> ()");
  // silu(gate)·up, and its backward (grad_gate, grad_up).
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // In place: grad <- silu(gate)·up (the forward output, recomputed), gate <- grad_gate, up <- grad_up.
  m.def("swiglu_backward_(Tensor(a!) grad, Tensor(b!) gate, Tensor(c!) up) -> ()");
  // gelu(gate)·up with exact erf gelu, or the tanh approximation when approximate.
  m.def("geglu(Tensor gate, Tensor up, bool approximate) -> Tensor");
  m.def("geglu_backward(Tensor grad, Tensor gate, Tensor up, bool approximate) -> (Tensor, Tensor)");
  m.def("geglu_backward_(Tensor(a!) grad, Tensor(b!) gate, Tensor(c!) up, bool approximate) -> ()");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "swiftlora's compiled core; the ops live in torch.ops.swiftlora";
#ifdef SWIFTLORA_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
#ifdef SWIFTLORA_WITH_SM90A
  m.attr("sm90a_built") = true;
#else
  m.attr("sm90a_built") = false;
#endif
  m.attr("cuda_archs") = SWIFTLORA_CUDA_ARCHS_STR;      // ','-separated, as built
  m.attr("nvcc_version") = SWIFTLORA_CUDA_VERSION_STR;  // empty in a CPU-only build
}
