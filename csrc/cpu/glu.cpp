// SwiGLU / GeGLU on the CPU: h = act(gate)·up and its backward, float32 math (csrc/common/glu_math.h), the
// [rows, n] element range split over threads. Also the argument checks both backends share.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/glu_host.h"
#include "ops.h"

namespace swiftlora {

void check_glu_args(const char* op, const at::Tensor& gate, const at::Tensor& up) {
  check_float_dtype(gate, op, "gate");
  check_same_dtype(gate, up, op, "gate", "up");
  check_same_device(gate, up, op, "gate", "up");
  TORCH_CHECK_VALUE(gate.dim() >= 1, op, ": gate must have at least one dim [..., N], got a scalar");
  check_same_shape(gate, up, op, "gate", "up");
  check_not_empty(gate, op, "gate");
}

void check_glu_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
  check_glu_args(op, gate, up);
  check_same_dtype(gate, grad, op, "gate", "grad");
  check_same_device(gate, grad, op, "gate", "grad");
  check_same_shape(gate, grad, op, "gate", "grad");
}

namespace {

// Threads take contiguous ranges of the rows·n elements (so one very wide row is split too), row by row.
constexpr int64_t kGrain = 1 << 15;

struct RunCpu {
  template <typename F, typename T, int kIn, int kOut>
  void operator()(F f, const glu::GluOperands<T, kIn, kOut>& o) const {
    const int64_t n = o.n;
    at::parallel_for(0, o.rows * n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin / n; r * n < end; ++r) {
        const int64_t c_end = std::min(end - r * n, n);
        for (int64_t c = std::max<int64_t>(begin - r * n, 0); c < c_end; ++c) {
          float x[kIn], y[kOut];
          for (int k = 0; k < kIn; ++k) x[k] = static_cast<float>(o.in[k][r * o.in_stride[k] + c]);
          f(x, y);
          for (int k = 0; k < kOut; ++k) o.out[k][r * o.out_stride[k] + c] = static_cast<T>(y[k]);
        }
      }
    });
  }
};

}  // namespace
}  // namespace swiftlora

TORCH_LIBRARY_IMPL(swiftlora, CPU, m) {
  swiftlora::glu::register_ops<swiftlora::RunCpu>(m);  // swiglu, swiglu_backward(_), geglu, geglu_backward(_)
}
