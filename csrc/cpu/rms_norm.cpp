// RMSNorm on the CPU: y = x·rstd·(w + offset), rstd = 1/sqrt(mean(x²) + eps), fp32 accumulation, rows in parallel.
// Also the argument checks both backends share.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"
#include "common/dispatch.h"
#include "ops.h"

namespace swiftlora {

void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* op = "rms_norm";
  check_float_dtype(x, op, "x");
  check_same_dtype(x, weight, op, "x", "weight");
  check_same_device(x, weight, op, "x", "weight");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dim [..., hidden], got a scalar");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape [",
                    x.size(-1), "] (x's last dim), got ", weight.sizes());
  check_not_empty(x, op, "x");
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
}

void check_rms_norm_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& rstd) {
  constexpr const char* op = "rms_norm_backward";
  check_rms_norm_args(x, weight, 0.0);
  check_same_shape(x, grad_y, op, "x", "grad_y");
  check_same_dtype(x, grad_y, op, "x", "grad_y");
  check_same_device(x, grad_y, op, "x", "grad_y");
  check_same_device(x, rstd, op, "x", "rstd");
  TORCH_CHECK_TYPE(rstd.scalar_type() == at::kFloat, op, ": rstd must be float32 (as rms_norm returns it), got ",
                   rstd.scalar_type());
  TORCH_CHECK_VALUE(rstd.numel() * x.size(-1) == x.numel(), op, ": rstd must hold one value per row of x (",
                    x.numel() / x.size(-1), "), got shape ", rstd.sizes());
}

namespace {

template <typename T>
void forward_rows(const at::Tensor& x2, const at::Tensor& w, at::Tensor& y2, at::Tensor& rstd, float eps,
                  float offset) {
  const int64_t rows = x2.size(0), h = x2.size(1), xs = x2.stride(0);
  const T* xp = x2.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* yp = y2.mutable_data_ptr<T>();
  float* rp = rstd.mutable_data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * xs;
      float ss = 0.f;
      for (int64_t i = 0; i < h; ++i) ss += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
      const float rs = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
      rp[r] = rs;
      T* yr = yp + r * h;
      for (int64_t i = 0; i < h; ++i) {
        yr[i] = static_cast<T>(static_cast<float>(xr[i]) * rs * (static_cast<float>(wp[i]) + offset));
      }
    }
  });
}

// grad_x may alias grad_y (in-place backward): each element is read before it is written, within one row.
template <typename T>
void backward_rows(const at::Tensor& g2, const at::Tensor& x2, const at::Tensor& w, const at::Tensor& rstd,
                   at::Tensor& dx2, at::Tensor* dw_partial, float offset) {
  const int64_t rows = x2.size(0), h = x2.size(1);
  const int64_t xs = x2.stride(0), gs = g2.stride(0), dxs = dx2.stride(0);
  const T* gp = g2.const_data_ptr<T>();
  const T* xp = x2.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const float* rp = rstd.const_data_ptr<float>();
  T* dxp = dx2.mutable_data_ptr<T>();
  const int64_t chunks = dw_partial ? dw_partial->size(0) : std::min<int64_t>(rows, at::get_num_threads());
  float* dwp = dw_partial ? dw_partial->mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      float* dw = dwp ? dwp + c * h : nullptr;
      for (int64_t r = c * rows / chunks; r < (c + 1) * rows / chunks; ++r) {
        const T* gr = gp + r * gs;
        const T* xr = xp + r * xs;
        T* dxr = dxp + r * dxs;
        const float rs = rp[r];
        float dot = 0.f;  // sum(g·wn·xhat)
        for (int64_t i = 0; i < h; ++i) {
          const float xhat = static_cast<float>(xr[i]) * rs;
          dot += static_cast<float>(gr[i]) * (static_cast<float>(wp[i]) + offset) * xhat;
        }
        const float mean = dot / static_cast<float>(h);
        for (int64_t i = 0; i < h; ++i) {
          const float g = static_cast<float>(gr[i]);
          const float xhat = static_cast<float>(xr[i]) * rs;
          if (dw) dw[i] += g * xhat;
          dxr[i] = static_cast<T>(rs * (g * (static_cast<float>(wp[i]) + offset) - xhat * mean));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                bool offset) {
  check_rms_norm_args(x, weight, eps);
  const at::Tensor x2 = as_rows(x);
  const at::Tensor w = weight.contiguous();
  auto y = at::empty(x.sizes(), x.options());
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  auto y2 = y.view({-1, x.size(-1)});
  SWIFTLORA_DISPATCH_FLOAT(x.scalar_type(), "rms_norm_cpu", [&] {
    forward_rows<scalar_t>(x2, w, y2, rstd, static_cast<float>(eps), offset ? 1.f : 0.f);
  });
  return {y, rstd};
}

at::Tensor backward_into(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& rstd, bool offset, bool weight_grad, at::Tensor& dx2) {
  const at::Tensor g2 = as_rows(grad_y), x2 = as_rows(x), w = weight.contiguous(), r = rstd.contiguous();
  at::Tensor partial;
  if (weight_grad) {
    partial = at::zeros({std::min<int64_t>(x2.size(0), at::get_num_threads()), x2.size(1)},
                        x.options().dtype(at::kFloat));
  }
  SWIFTLORA_DISPATCH_FLOAT(x.scalar_type(), "rms_norm_backward_cpu", [&] {
    backward_rows<scalar_t>(g2, x2, w, r, dx2, weight_grad ? &partial : nullptr, offset ? 1.f : 0.f);
  });
  return weight_grad ? partial.sum(0).to(weight.scalar_type()) : at::empty({0}, weight.options());
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& rstd,
                                                         bool offset, bool weight_grad) {
  check_rms_norm_backward_args(grad_y, x, weight, rstd);
  auto dx = at::empty(x.sizes(), x.options());
  auto dx2 = dx.view({-1, x.size(-1)});
  auto dw = backward_into(grad_y, x, weight, rstd, offset, weight_grad, dx2);
  return {dx, dw};
}

at::Tensor rms_norm_backward_inplace_cpu(at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& rstd, bool offset, bool weight_grad) {
  check_rms_norm_backward_args(grad_y, x, weight, rstd);
  at::Tensor g2 = as_rows(grad_y);
  TORCH_CHECK_VALUE(g2.is_alias_of(grad_y), "rms_norm_backward_: grad_y must be viewable as rows [N, H] "
                    "(unit stride on the last dim) to be written in place");
  return backward_into(grad_y, x, weight, rstd, offset, weight_grad, g2);
}

}  // namespace
}  // namespace swiftlora

TORCH_LIBRARY_IMPL(swiftlora, CPU, m) {
  m.impl("rms_norm", &swiftlora::rms_norm_cpu);
  m.impl("rms_norm_backward", &swiftlora::rms_norm_backward_cpu);
  m.impl("rms_norm_backward_", &swiftlora::rms_norm_backward_inplace_cpu);
}
