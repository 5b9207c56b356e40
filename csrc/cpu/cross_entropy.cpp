// Softmax-over-vocab primitives on the CPU (softmax_stats, softmax_grad(_), cross_entropy_fused_, scale_rows_), and
// the argument checks both backends share. Rows of logits x [N, V]: z = softcap·tanh(scale·x/softcap) (softcap > 0)
// or scale·x; p = softmax(z); lse = log Σ exp z. One row per task (at::parallel_for over rows), float32 math; a
// row is read twice for its statistics (max, then Σ exp) and once more to write a gradient. Sums use 8 partial
// accumulators (vectorisable, and float32 error ~ sqrt(V/8) roundings instead of V).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string_view>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/scale_rows.h"
#include "cpu/softmax_transform.h"
#include "ops.h"

namespace swiftlora {

void check_softmax_args(const char* op, const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                        double softcap, double logit_scale) {
  check_float_dtype(logits, op, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D [tokens, vocab], got shape ", logits.sizes());
  check_not_empty(logits, op, "logits");
  TORCH_CHECK_VALUE(logits.stride(1) == 1 || logits.size(1) == 1, op,
                    ": logits must have unit stride on the vocab dim (any row stride), got strides ",
                    logits.strides());
  TORCH_CHECK_VALUE(softcap >= 0 && std::isfinite(softcap), op, ": softcap must be finite and >= 0 (0 = off), got ",
                    softcap);
  TORCH_CHECK_VALUE(std::isfinite(logit_scale) && logit_scale != 0, op,
                    ": logit_scale must be finite and nonzero, got ", logit_scale);
  if (std::string_view(op).back() == '_') {  // written in place: rows must not share elements
    TORCH_CHECK_VALUE(logits.size(0) == 1 || logits.stride(0) >= logits.size(1), op,
                      ": logits is written in place, so its rows must not overlap, got shape ", logits.sizes(),
                      " strides ", logits.strides());
  }
  if (!labels.has_value()) return;
  const at::Tensor& lab = *labels;
  check_same_device(logits, lab, op, "logits", "labels");
  TORCH_CHECK_TYPE(lab.scalar_type() == at::kLong || lab.scalar_type() == at::kInt, op,
                   ": labels must be int64 or int32, got ", lab.scalar_type());
  TORCH_CHECK_VALUE(lab.dim() == 1 && lab.size(0) == logits.size(0), op, ": labels must have shape [",
                    logits.size(0), "] (one per row of logits), got ", lab.sizes());
}

void check_softmax_grad_args(const char* op, const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                             const at::Tensor& lse, const at::Tensor& coef, double softcap, double logit_scale) {
  check_softmax_args(op, logits, labels, softcap, logit_scale);
  const int64_t n = logits.size(0);
  check_same_device(logits, lse, op, "logits", "lse");
  check_same_device(logits, coef, op, "logits", "coef");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32 (as softmax_stats returns it), got ",
                   lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == n, op, ": lse must have shape [", n, "], got ", lse.sizes());
  TORCH_CHECK_TYPE(coef.scalar_type() == at::kFloat, op, ": coef must be float32, got ", coef.scalar_type());
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == n && coef.size(1) == 4, op, ": coef must have shape [", n,
                    ", 4] (a, b, c, d per row), got ", coef.sizes());
}

void check_cross_entropy_fused_args(const at::Tensor& logits, const at::Tensor& labels, double label_smoothing,
                                    double z_loss, double softcap, double logit_scale, const at::Tensor& grad_scale) {
  constexpr const char* op = "cross_entropy_fused_";
  check_softmax_args(op, logits, labels, softcap, logit_scale);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1, op, ": label_smoothing must be in [0, 1], got ",
                    label_smoothing);
  TORCH_CHECK_VALUE(z_loss >= 0 && std::isfinite(z_loss), op, ": z_loss must be finite and >= 0, got ", z_loss);
  check_same_device(logits, grad_scale, op, "logits", "grad_scale");
  TORCH_CHECK_TYPE(grad_scale.scalar_type() == at::kFloat, op, ": grad_scale must be float32, got ",
                   grad_scale.scalar_type());
  TORCH_CHECK_VALUE(grad_scale.dim() == 0 || (grad_scale.dim() == 1 && grad_scale.size(0) == logits.size(0)), op,
                    ": grad_scale must have shape [] or [", logits.size(0), "], got ", grad_scale.sizes());
}

void check_scale_rows_args(const at::Tensor& t, const at::Tensor& scale) {
  constexpr const char* op = "scale_rows_";
  check_float_dtype(t, op, "t");
  TORCH_CHECK_VALUE(t.dim() >= 1, op, ": t must have at least one dim [rows, ...], got a scalar");
  check_same_device(t, scale, op, "t", "scale");
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.dim() == 0 || (scale.dim() == 1 && scale.size(0) == t.size(0)), op,
                    ": scale must have shape [] or [", t.size(0), "] (one per row of t), got ", scale.sizes());
}

namespace {

using cpu::Transform;

constexpr int kLanes = 8;  // partial sums per row


struct RowStats {
  float max, sum_exp;                  // lse = max + log(sum_exp); p_j = exp(z_j − max) / sum_exp
  float lse, z_label, z_sum, pz_sum;  // pz_sum = Σ p z (only when asked)
};

template <typename T>
RowStats row_stats(const T* x, int64_t v, int64_t label, const Transform& tf, bool with_entropy) {
  float mx[kLanes], zs[kLanes];
  for (int l = 0; l < kLanes; ++l) mx[l] = -std::numeric_limits<float>::infinity(), zs[l] = 0.f;
  const int64_t vb = v - v % kLanes;
  for (int64_t j = 0; j < vb; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float z = tf.z(static_cast<float>(x[j + l]));
      mx[l] = std::max(mx[l], z);
      zs[l] += z;
    }
  }
  for (int64_t j = vb; j < v; ++j) {
    const float z = tf.z(static_cast<float>(x[j]));
    mx[0] = std::max(mx[0], z);
    zs[0] += z;
  }
  float m = mx[0], z_sum = 0.f;
  for (int l = 0; l < kLanes; ++l) m = std::max(m, mx[l]), z_sum += zs[l];
  float es[kLanes] = {}, ezs[kLanes] = {};
  for (int64_t j = 0; j < vb; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float z = tf.z(static_cast<float>(x[j + l]));
      const float e = std::exp(z - m);
      es[l] += e;
      if (with_entropy) ezs[l] += e * z;
    }
  }
  for (int64_t j = vb; j < v; ++j) {
    const float z = tf.z(static_cast<float>(x[j]));
    const float e = std::exp(z - m);
    es[0] += e;
    if (with_entropy) ezs[0] += e * z;
  }
  float s = 0.f, ez = 0.f;
  for (int l = 0; l < kLanes; ++l) s += es[l], ez += ezs[l];
  RowStats r;
  r.max = m;
  r.sum_exp = s;
  r.lse = m + std::log(s);
  r.z_label = label >= 0 ? tf.z(static_cast<float>(x[label])) : 0.f;
  r.z_sum = z_sum;
  r.pz_sum = with_entropy ? ez / s : 0.f;
  return r;
}

// out[j] = (a·p_j + b·[j = label] + c + d·p_j·z_j)·dz_j/dx_j with p_j = exp(z_j − shift)·mul (shift = lse,
// mul = 1 from softmax_stats' output; shift = max, mul = 1/Σ exp inside one kernel: no rounding of a large lse).
// out may be x (each element is read before it is written).
template <typename T>
void row_grad(const T* x, T* out, int64_t v, int64_t label, float shift, float mul, const float* coef,
              const Transform& tf) {
  const float a = coef[0] * mul, b = coef[1], c = coef[2], d = coef[3] * mul;
  for (int64_t j = 0; j < v; ++j) {
    float z, dz;
    tf.z_dz(static_cast<float>(x[j]), z, dz);
    const float p = std::exp(z - shift);  // p_j / mul
    const float g = a * p + c + d * p * z + (j == label ? b : 0.f);
    out[j] = static_cast<T>(g * dz);
  }
}

// Row labels as int64 with "none" = -1; a label outside [0, V) that is not ignore_index raises IndexError.
std::vector<int64_t> row_labels(const char* op, const std::optional<at::Tensor>& labels, int64_t ignore_index,
                                int64_t n, int64_t v) {
  std::vector<int64_t> out(static_cast<size_t>(n), -1);
  if (!labels.has_value()) return out;
  const at::Tensor lab = labels->to(at::kLong).contiguous();
  const int64_t* lp = lab.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (lp[i] == ignore_index) continue;
    TORCH_CHECK_INDEX(lp[i] >= 0 && lp[i] < v, op, ": labels[", i, "] = ", lp[i], " is outside the vocab [0, ", v,
                      ") and is not ignore_index (", ignore_index, ")");
    out[static_cast<size_t>(i)] = lp[i];
  }
  return out;
}

int64_t grain_rows(int64_t v) { return std::max<int64_t>(1, 32768 / v); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_stats_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels, int64_t ignore_index, double softcap,
    double logit_scale, bool with_entropy) {
  constexpr const char* op = "softmax_stats";
  check_softmax_args(op, logits, labels, softcap, logit_scale);
  const int64_t n = logits.size(0), v = logits.size(1), xs = logits.stride(0);
  const std::vector<int64_t> lab = row_labels(op, labels, ignore_index, n, v);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({n}, f32), z_label = at::empty({n}, f32), z_sum = at::empty({n}, f32);
  at::Tensor pz_sum = at::empty({with_entropy ? n : 0}, f32);
  float *lp = lse.mutable_data_ptr<float>(), *zlp = z_label.mutable_data_ptr<float>();
  float *zsp = z_sum.mutable_data_ptr<float>(), *pzp = pz_sum.mutable_data_ptr<float>();
  const Transform tf(softcap, logit_scale);
  SWIFTLORA_DISPATCH_FLOAT(logits.scalar_type(), "softmax_stats_cpu", [&] {
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_rows(v), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const RowStats st = row_stats(xp + r * xs, v, lab[r], tf, with_entropy);
        lp[r] = st.lse, zlp[r] = st.z_label, zsp[r] = st.z_sum;
        if (with_entropy) pzp[r] = st.pz_sum;
      }
    });
  });
  return {lse, z_label, z_sum, pz_sum};
}

// Gradient rows from (logits, lse, coef) into out (which may be logits).
void softmax_grad_into(const char* op, const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                       int64_t ignore_index, const at::Tensor& lse_in, const at::Tensor& coef_in, double softcap,
                       double logit_scale, at::Tensor& out) {
  const int64_t n = logits.size(0), v = logits.size(1), xs = logits.stride(0), os = out.stride(0);
  const std::vector<int64_t> lab = row_labels(op, labels, ignore_index, n, v);
  const at::Tensor lse = lse_in.contiguous(), coef = coef_in.contiguous();
  const float *lp = lse.const_data_ptr<float>(), *cp = coef.const_data_ptr<float>();
  const Transform tf(softcap, logit_scale);
  SWIFTLORA_DISPATCH_FLOAT(logits.scalar_type(), "softmax_grad_cpu", [&] {
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_rows(v), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row_grad(xp + r * xs, op_ + r * os, v, lab[r], lp[r], 1.f, cp + 4 * r, tf);
    });
  });
}

at::Tensor softmax_grad_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& labels, int64_t ignore_index,
                            const at::Tensor& lse, const at::Tensor& coef, double softcap, double logit_scale) {
  check_softmax_grad_args("softmax_grad", logits, labels, lse, coef, softcap, logit_scale);
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  softmax_grad_into("softmax_grad", logits, labels, ignore_index, lse, coef, softcap, logit_scale, out);
  return out;
}

void softmax_grad_inplace_cpu(at::Tensor& logits, const std::optional<at::Tensor>& labels, int64_t ignore_index,
                              const at::Tensor& lse, const at::Tensor& coef, double softcap, double logit_scale) {
  check_softmax_grad_args("softmax_grad_", logits, labels, lse, coef, softcap, logit_scale);
  softmax_grad_into("softmax_grad_", logits, labels, ignore_index, lse, coef, softcap, logit_scale, logits);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fused_cpu(at::Tensor& logits, const at::Tensor& labels,
                                                           int64_t ignore_index, double label_smoothing,
                                                           double z_loss, double softcap, double logit_scale,
                                                           const at::Tensor& grad_scale_in) {
  constexpr const char* op = "cross_entropy_fused_";
  check_cross_entropy_fused_args(logits, labels, label_smoothing, z_loss, softcap, logit_scale, grad_scale_in);
  const int64_t n = logits.size(0), v = logits.size(1), xs = logits.stride(0);
  const std::vector<int64_t> lab = row_labels(op, labels, ignore_index, n, v);
  const at::Tensor grad_scale = grad_scale_in.contiguous();
  const float* gsp = grad_scale.const_data_ptr<float>();
  const int64_t gs_stride = grad_scale.dim() == 0 ? 0 : 1;
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, f32), lse = at::empty({n}, f32);
  float *lossp = loss.mutable_data_ptr<float>(), *lsep = lse.mutable_data_ptr<float>();
  const Transform tf(softcap, logit_scale);
  const float eps = static_cast<float>(label_smoothing), zl = static_cast<float>(z_loss);
  const float eps_v = eps / static_cast<float>(v);
  SWIFTLORA_DISPATCH_FLOAT(logits.scalar_type(), "cross_entropy_fused_cpu", [&] {
    scalar_t* xp = logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_rows(v), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* xr = xp + r * xs;
        const RowStats st = row_stats(xr, v, lab[r], tf, false);
        lsep[r] = st.lse;
        if (lab[r] < 0) {
          lossp[r] = 0.f;
          std::fill(xr, xr + v, static_cast<scalar_t>(0.f));
          continue;
        }
        // lse − (1−ε)·z_label − (ε/V)·Σz, with lse = max + log Σ exp: the large terms cancel before rounding.
        const float smooth = eps * (st.z_label - st.z_sum / static_cast<float>(v));
        lossp[r] = std::log(st.sum_exp) + (st.max - st.z_label) + smooth + zl * st.lse * st.lse;
        const float g = gsp[r * gs_stride];
        const float coef[4] = {g * (1.f + 2.f * zl * st.lse), -g * (1.f - eps), -g * eps_v, 0.f};
        row_grad(xr, xr, v, lab[r], st.max, 1.f / st.sum_exp, coef, tf);
      }
    });
  });
  return {loss, lse};
}

template <typename T>
void scale_rows_2d(at::Tensor& rows, const float* sp, int64_t s_stride) {
  const int64_t n = rows.size(0), m = rows.size(1), rs = rows.stride(0);
  T* tp = rows.mutable_data_ptr<T>();
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(m, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float s = sp[r * s_stride];
      if (s == 1.f) continue;
      T* tr = tp + r * rs;
      for (int64_t j = 0; j < m; ++j) tr[j] = static_cast<T>(static_cast<float>(tr[j]) * s);
    }
  });
}

}  // namespace

void scale_rows_inplace_cpu(at::Tensor& t, const at::Tensor& scale_in) {
  check_scale_rows_args(t, scale_in);
  at::assert_no_internal_overlap(t);
  if (t.numel() == 0) return;
  const at::Tensor scale = scale_in.contiguous();
  const float* sp = scale.const_data_ptr<float>();
  const int64_t s_stride = scale.dim() == 0 ? 0 : 1;
  if (s_stride == 0 && sp[0] == 1.f) return;
  // Rows [N, M] in place when each row's elements are contiguous (the usual case); otherwise row by row.
  const at::Tensor row0 = t.select(0, 0);
  if (row0.is_contiguous()) {
    at::Tensor rows = t.as_strided({t.size(0), row0.numel()}, {t.stride(0), 1});
    SWIFTLORA_DISPATCH_FLOAT(t.scalar_type(), "scale_rows_cpu", [&] { scale_rows_2d<scalar_t>(rows, sp, s_stride); });
    return;
  }
  for (int64_t r = 0; r < t.size(0); ++r) {
    const float s = sp[r * s_stride];
    if (s != 1.f) t.select(0, r).mul_(s);
  }
}

}  // namespace swiftlora

TORCH_LIBRARY_IMPL(swiftlora, CPU, m) {
  m.impl("softmax_stats", &swiftlora::softmax_stats_cpu);
  m.impl("softmax_grad", &swiftlora::softmax_grad_cpu);
  m.impl("softmax_grad_", &swiftlora::softmax_grad_inplace_cpu);
  m.impl("cross_entropy_fused_", &swiftlora::cross_entropy_fused_cpu);
  m.impl("scale_rows_", &swiftlora::scale_rows_inplace_cpu);
}
