// The host side of swiglu/geglu that the CPU and CUDA backends share: checks, row views of the operands, output
// allocation, dtype and activation dispatch, and the six op entry points. A backend supplies a `Run` type whose
// `run(functor, operands)` applies the per-element functor (csrc/common/glu_math.h) to every element of the
// [rows, n] operands, and registers the ops with register_ops<Run>(m).
#pragma once
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/glu_math.h"
#include "ops.h"

namespace swiftlora::glu {

enum class Activation { kSilu, kGeluExact, kGeluTanh };

inline Activation gelu_activation(bool approximate) {
  return approximate ? Activation::kGeluTanh : Activation::kGeluExact;
}

// T: the storage dtype. 16-bit outputs take the erf form of exact gelu (as PyTorch computes it): its cancellation
// for very negative gate is far below their rounding, and erff is much cheaper than erfcf (the kernel stays
// memory-bound); float32 keeps the erfc form.
template <typename T, typename Fn>
void dispatch_activation(Activation act, Fn&& fn) {
  switch (act) {
    case Activation::kSilu: fn(Silu{}); break;
    case Activation::kGeluExact:
      if constexpr (std::is_same_v<T, float>) {
        fn(GeluExact{});
      } else {
        fn(GeluExactErf{});
      }
      break;
    case Activation::kGeluTanh: fn(GeluTanh{}); break;
  }
}

// Row views ([rows, n], unit column stride) -> the raw operands a kernel reads and writes.
template <typename T, std::size_t kIn, std::size_t kOut>
GluOperands<T, static_cast<int>(kIn), static_cast<int>(kOut)> make_operands(const std::array<at::Tensor, kIn>& in,
                                                                            const std::array<at::Tensor, kOut>& out) {
  GluOperands<T, static_cast<int>(kIn), static_cast<int>(kOut)> o{};
  for (std::size_t k = 0; k < kIn; ++k) {
    o.in[k] = in[k].template const_data_ptr<T>();
    o.in_stride[k] = in[k].stride(0);
  }
  for (std::size_t k = 0; k < kOut; ++k) {
    o.out[k] = out[k].template mutable_data_ptr<T>();
    o.out_stride[k] = out[k].stride(0);
  }
  o.rows = in[0].size(0);
  o.n = in[0].size(1);
  return o;
}

// h = act(gate)·up, contiguous with gate's shape.
template <typename Run>
at::Tensor forward(const char* op, Activation act, const at::Tensor& gate, const at::Tensor& up, const Run& run) {
  check_glu_args(op, gate, up);
  const c10::DeviceGuard guard(gate.device());
  at::Tensor h = at::empty(gate.sizes(), gate.options());
  const std::array<at::Tensor, 2> in{as_rows(gate), as_rows(up)};
  const std::array<at::Tensor, 1> out{h.view({-1, gate.size(-1)})};
  SWIFTLORA_DISPATCH_FLOAT(gate.scalar_type(), "glu_forward", [&] {
    dispatch_activation<scalar_t>(act, [&](auto a) { run(GluForward<decltype(a)>{}, make_operands<scalar_t>(in, out)); });
  });
  return h;
}

// (d gate, d up), contiguous with gate's shape.
template <typename Run>
std::tuple<at::Tensor, at::Tensor> backward(const char* op, Activation act, const at::Tensor& grad,
                                            const at::Tensor& gate, const at::Tensor& up, const Run& run) {
  check_glu_backward_args(op, grad, gate, up);
  const c10::DeviceGuard guard(gate.device());
  at::Tensor d_gate = at::empty(gate.sizes(), gate.options());
  at::Tensor d_up = at::empty(gate.sizes(), gate.options());
  const std::array<at::Tensor, 3> in{as_rows(grad), as_rows(gate), as_rows(up)};
  const std::array<at::Tensor, 2> out{d_gate.view({-1, gate.size(-1)}), d_up.view({-1, gate.size(-1)})};
  SWIFTLORA_DISPATCH_FLOAT(gate.scalar_type(), "glu_backward", [&] {
    dispatch_activation<scalar_t>(act, [&](auto a) {
      run(GluBackward<decltype(a), false>{}, make_operands<scalar_t>(in, out));
    });
  });
  return {d_gate, d_up};
}

// In place: grad <- act(gate)·up, gate <- d gate, up <- d up. Each must be writable as rows without a copy (their
// row strides may differ, e.g. gate and up as the two halves of a fused gate/up projection) and none may share
// elements with another.
template <typename Run>
void backward_inplace(const char* op, Activation act, at::Tensor& grad, at::Tensor& gate, at::Tensor& up,
                      const Run& run) {
  check_glu_backward_args(op, grad, gate, up);
  check_no_overlap(grad, gate, op, "grad", "gate");
  check_no_overlap(grad, up, op, "grad", "up");
  check_no_overlap(gate, up, op, "gate", "up");
  const c10::DeviceGuard guard(gate.device());
  const std::array<at::Tensor, 3> in{writable_rows(grad, op, "grad"), writable_rows(gate, op, "gate"),
                                     writable_rows(up, op, "up")};
  const std::array<at::Tensor, 3> out{in[1], in[2], in[0]};
  SWIFTLORA_DISPATCH_FLOAT(gate.scalar_type(), "glu_backward_", [&] {
    dispatch_activation<scalar_t>(act, [&](auto a) {
      run(GluBackward<decltype(a), true>{}, make_operands<scalar_t>(in, out));
    });
  });
}

// The six ops of one backend.
template <typename Run>
struct Ops {
  static at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
    return forward("swiglu", Activation::kSilu, gate, up, Run{});
  }
  static std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                            const at::Tensor& up) {
    return backward("swiglu_backward", Activation::kSilu, grad, gate, up, Run{});
  }
  static void swiglu_backward_(at::Tensor& grad, at::Tensor& gate, at::Tensor& up) {
    backward_inplace("swiglu_backward_", Activation::kSilu, grad, gate, up, Run{});
  }
  static at::Tensor geglu(const at::Tensor& gate, const at::Tensor& up, bool approximate) {
    return forward("geglu", gelu_activation(approximate), gate, up, Run{});
  }
  static std::tuple<at::Tensor, at::Tensor> geglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                           const at::Tensor& up, bool approximate) {
    return backward("geglu_backward", gelu_activation(approximate), grad, gate, up, Run{});
  }
  static void geglu_backward_(at::Tensor& grad, at::Tensor& gate, at::Tensor& up, bool approximate) {
    backward_inplace("geglu_backward_", gelu_activation(approximate), grad, gate, up, Run{});
  }
};

// Called from a backend's TORCH_LIBRARY_IMPL block.
template <typename Run>
void register_ops(torch::Library& m) {
  m.impl("swiglu", &Ops<Run>::swiglu);
  m.impl("swiglu_backward", &Ops<Run>::swiglu_backward);
  m.impl("swiglu_backward_", &Ops<Run>::swiglu_backward_);
  m.impl("geglu", &Ops<Run>::geglu);
  m.impl("geglu_backward", &Ops<Run>::geglu_backward);
  m.impl("geglu_backward_", &Ops<Run>::geglu_backward_);
}

}  // namespace swiftlora::glu
