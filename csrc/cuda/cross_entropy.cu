// Softmax over the vocabulary on the GPU: row statistics, gradients, the fused cross-entropy (loss and gradient
// written over the logits), and the row scaling its backward uses. One 1024-thread block per row (a row of 128k
// bf16 logits is 256 KB); threads stride the row with 16-byte vectors, four in flight each, keeping an online
// (max, Σexp) per thread that the block then merges (softmax_row.cuh). Arguments are checked in
// csrc/cpu/cross_entropy.cpp (shared with the CPU kernels).
//
// Floors (N rows, V vocab, E bytes per logit): stats read N·V·E; grad reads and writes N·V·E; the fused
// cross-entropy reads and writes N·V·E when a persistent grid of one block per SM re-reads each row for its
// gradient from L1/L2 (one 256 KB row per SM between the passes). The common case (no soft-cap, smoothing or
// z-loss) takes a lean kernel with ~11 instructions a logit (cross_entropy_plain.cuh): the general one is
// issue-bound at ~40. Splitting rows over thread-block clusters, holding slices in registers or copying them into
// shared memory ahead (TMA) all measured slower on the H100 (bench/NOTES.md; the code is in the history).
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "ops.h"
#include "cross_entropy_plain.cuh"
#include "softmax_row.cuh"

namespace swiftlora::cuda {
namespace {

constexpr int kThreads = 1024;
// The fused kernel's gradient pass with evict-first loads and stores: 1.99 ms against 2.13 at [8192, 128256] bf16
// on the H100 (the stores no longer push rows still to be re-read out of L2).
constexpr bool kFusedStreaming = true;

// ---------------------------------------------------------------------------------------------------- kernels
template <typename T, typename L, int VEC, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    softmax_stats_kernel(const T* __restrict__ x, int64_t x_stride, const L* __restrict__ labels,
                         int64_t ignore_index, int64_t rows, int64_t v, Transform f, float* __restrict__ lse,
                         float* __restrict__ z_label, float* __restrict__ z_sum, float* __restrict__ pz_sum) {
  __shared__ Online scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    const Online o = block_merge(thread_stats<T, VEC, kEntropy>(xr, v, f), scratch);
    if (threadIdx.x != 0) continue;
    const int64_t label = row_label(labels, row, ignore_index, v);
    const float l = o.m + __logf(o.s);
    lse[row] = label == -2 ? kNaN : l;
    z_label[row] = label >= 0 ? f.z(static_cast<float>(xr[label])) : (label == -2 ? kNaN : 0.f);
    z_sum[row] = o.sz;
    if constexpr (kEntropy) pz_sum[row] = o.spz / o.s;
  }
}

template <typename T, typename L, int VEC>
__global__ void __launch_bounds__(kThreads)
    softmax_grad_kernel(const T* x, int64_t x_stride, T* out, int64_t out_stride, const L* __restrict__ labels,
                        int64_t ignore_index, int64_t rows, int64_t v, Transform f, const float* __restrict__ lse,
                        const float* __restrict__ coef) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t label = row_label(labels, row, ignore_index, v);
    const float* cr = coef + row * 4;
    GradCoef k{lse[row], cr[0], cr[1], cr[2], cr[3], label};
    if (label == -2) k.a = kNaN;
    row_grad<T, VEC>(x + row * x_stride, out + row * out_stride, v, k, f);
  }
}

// Cross-entropy of each row and the gradient of grad_scale[row]·loss written over the row (two passes over it).
template <typename T, typename L, int VEC>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_fused_kernel(T* x, int64_t x_stride, const L* __restrict__ labels, int64_t ignore_index,
                               int64_t rows, int64_t v, Transform f, float smoothing, float z_loss,
                               const float* __restrict__ grad_scale, int64_t scale_stride,
                               float* __restrict__ loss, float* __restrict__ lse_out) {
  __shared__ Online scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    T* xr = x + row * x_stride;
    const int64_t label = row_label(labels, row, ignore_index, v);
    // Thread 0 reads the label's logit now: block_merge's barriers come before any thread overwrites the row.
    const float label_z = threadIdx.x == 0 && label >= 0 ? f.z(static_cast<float>(xr[label])) : 0.f;
    const Online o = block_merge(thread_stats<T, VEC, false>(xr, v, f), scratch);
    const CrossEntropyRow r =
        cross_entropy_row(o, label_z, label, v, grad_scale[row * scale_stride], smoothing, z_loss);
    if (threadIdx.x == 0) {
      lse_out[row] = r.lse;
      loss[row] = r.loss;
    }
    row_grad<T, VEC, kFusedStreaming>(xr, xr, v, r.k, f);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    scale_rows_kernel(T* t, int64_t t_stride, int64_t rows, int64_t cols, const float* __restrict__ scale,
                      int64_t scale_stride) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float s = scale[row * scale_stride];
    if (s == 1.f) continue;  // block-uniform: the common grad_output = 1 costs no pass over t
    T* tr = t + row * t_stride;
    const int64_t full = cols / VEC * VEC;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c + VEC <= full; c += blockDim.x * VEC) {
      Vec<T, VEC> tv = load_vec<T, VEC>(tr + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) tv.v[j] = static_cast<T>(static_cast<float>(tv.v[j]) * s);
      store_vec<T, VEC>(tr + c, tv);
    }
    for (int64_t c = full + threadIdx.x; c < cols; c += blockDim.x) tr[c] = static_cast<T>(static_cast<float>(tr[c]) * s);
  }
}

// ------------------------------------------------------------------------------------------------------ host
Transform make_transform(double softcap, double logit_scale) {
  const float cap = static_cast<float>(softcap);
  return Transform{static_cast<float>(logit_scale), cap, cap > 0.f ? 1.f / cap : 0.f};
}

// SWIFTLORA_CE_VARIANT, a benchmarking knob read on every call (bench/ce_sweep.py): which kernel runs
// cross_entropy_fused_ where the lean one can. Unset: kCeDefault. (A backward gradient pass and an L2 prefetch of
// the next row were measured too: no gain, and 1-5% slower; bench/NOTES.md.)
constexpr int kCeGeneral = 0, kCeLean = 1, kCeVariants = 2, kCeDefault = kCeLean;

int ce_variant() {
  const char* s = std::getenv("SWIFTLORA_CE_VARIANT");
  if (s == nullptr || *s == '\0') return kCeDefault;
  char* end = nullptr;
  const long n = std::strtol(s, &end, 10);
  TORCH_CHECK(*end == '\0' && n >= 0 && n < kCeVariants, "SWIFTLORA_CE_VARIANT must be 0 (general kernel) or 1 (lean ",
              "kernel), got '", s, "'");
  return static_cast<int>(n);
}

// Rows of `t` that start 16-byte aligned take vectors.
bool vector_rows(const at::Tensor& t2) {
  return aligned_to(t2.const_data_ptr(), 16) && (t2.stride(0) * t2.element_size()) % 16 == 0;
}

unsigned row_grid(int64_t rows, int per_sm) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, int64_t{sm_count()} * per_sm)));
}

// Calls fn(T tag, L tag, vec constant) for the logits dtype, labels dtype (int64 when absent) and vector width.
template <typename Fn>
void dispatch_rows(const at::Tensor& x2, const std::optional<at::Tensor>& labels, bool vec_ok, Fn&& fn) {
  SWIFTLORA_DISPATCH_FLOAT(x2.scalar_type(), "softmax_rows_cuda", [&] {
    using T = scalar_t;
    auto with_vec = [&](auto label_tag) {
      if (vec_ok) {
        fn(T{}, label_tag, std::integral_constant<int, 16 / sizeof(T)>{});
      } else {
        fn(T{}, label_tag, std::integral_constant<int, 1>{});
      }
    };
    if (labels.has_value() && labels->scalar_type() == at::kInt) {
      with_vec(int32_t{});
    } else {
      with_vec(int64_t{});
    }
  });
}

template <typename L>
const L* label_ptr(const std::optional<at::Tensor>& labels) {
  return labels.has_value() ? labels->const_data_ptr<L>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_stats_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels_in, int64_t ignore_index, double softcap,
    double logit_scale, bool with_entropy) {
  check_softmax_args("softmax_stats", logits, labels_in, softcap, logit_scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x2 = as_rows(logits);
  const std::optional<at::Tensor> labels =
      labels_in.has_value() ? std::optional<at::Tensor>(labels_in->contiguous()) : std::nullopt;
  const int64_t rows = x2.size(0), v = x2.size(1);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({rows}, opts), z_label = at::empty({rows}, opts), z_sum = at::empty({rows}, opts);
  at::Tensor pz_sum = with_entropy ? at::empty({rows}, opts) : at::empty({0}, opts);
  const Transform f = make_transform(softcap, logit_scale);
  dispatch_rows(x2, labels, vector_rows(x2), [&](auto t_tag, auto l_tag, auto vec) {
    using T = decltype(t_tag);
    using L = decltype(l_tag);
    auto launch = [&](auto kernel) {
      kernel<<<row_grid(rows, 2), kThreads, 0, current_stream()>>>(
          x2.const_data_ptr<T>(), x2.stride(0), label_ptr<L>(labels), ignore_index, rows, v, f,
          lse.mutable_data_ptr<float>(), z_label.mutable_data_ptr<float>(), z_sum.mutable_data_ptr<float>(),
          with_entropy ? pz_sum.mutable_data_ptr<float>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (with_entropy) {
      launch(softmax_stats_kernel<T, L, decltype(vec)::value, true>);
    } else {
      launch(softmax_stats_kernel<T, L, decltype(vec)::value, false>);
    }
  });
  return {lse, z_label, z_sum, pz_sum};
}

void softmax_grad_into(const at::Tensor& x2, at::Tensor& out2, const std::optional<at::Tensor>& labels_in,
                       int64_t ignore_index, const at::Tensor& lse, const at::Tensor& coef, double softcap,
                       double logit_scale) {
  const std::optional<at::Tensor> labels =
      labels_in.has_value() ? std::optional<at::Tensor>(labels_in->contiguous()) : std::nullopt;
  const at::Tensor lse_c = lse.contiguous(), coef_c = coef.contiguous();
  const int64_t rows = x2.size(0), v = x2.size(1);
  const Transform f = make_transform(softcap, logit_scale);
  dispatch_rows(x2, labels, vector_rows(x2) && vector_rows(out2), [&](auto t_tag, auto l_tag, auto vec) {
    using T = decltype(t_tag);
    using L = decltype(l_tag);
    softmax_grad_kernel<T, L, decltype(vec)::value><<<row_grid(rows, 2), kThreads, 0, current_stream()>>>(
        x2.const_data_ptr<T>(), x2.stride(0), out2.mutable_data_ptr<T>(), out2.stride(0), label_ptr<L>(labels),
        ignore_index, rows, v, f, lse_c.const_data_ptr<float>(), coef_c.const_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor softmax_grad_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& labels, int64_t ignore_index,
                             const at::Tensor& lse, const at::Tensor& coef, double softcap, double logit_scale) {
  check_softmax_grad_args("softmax_grad", logits, labels, lse, coef, softcap, logit_scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x2 = as_rows(logits);
  at::Tensor out = at::empty({x2.size(0), x2.size(1)}, logits.options());
  softmax_grad_into(x2, out, labels, ignore_index, lse, coef, softcap, logit_scale);
  return out.view(logits.sizes());
}

void softmax_grad_inplace_cuda(at::Tensor& logits, const std::optional<at::Tensor>& labels, int64_t ignore_index,
                               const at::Tensor& lse, const at::Tensor& coef, double softcap, double logit_scale) {
  check_softmax_grad_args("softmax_grad_", logits, labels, lse, coef, softcap, logit_scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor x2 = writable_rows(logits, "softmax_grad_", "logits");
  softmax_grad_into(x2, x2, labels, ignore_index, lse, coef, softcap, logit_scale);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fused_cuda(at::Tensor& logits, const at::Tensor& labels_in,
                                                            int64_t ignore_index, double label_smoothing,
                                                            double z_loss, double softcap, double logit_scale,
                                                            const at::Tensor& grad_scale_in) {
  check_cross_entropy_fused_args(logits, labels_in, label_smoothing, z_loss, softcap, logit_scale, grad_scale_in);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor x2 = writable_rows(logits, "cross_entropy_fused_", "logits");
  const std::optional<at::Tensor> labels(labels_in.contiguous());
  const at::Tensor grad_scale = grad_scale_in.contiguous();
  const int64_t rows = x2.size(0), v = x2.size(1);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, opts), lse = at::empty({rows}, opts);
  const Transform f = make_transform(softcap, logit_scale);
  // The lean kernel's case: no soft-cap, smoothing or z-loss, a positive logit scale.
  const bool plain = softcap == 0.0 && label_smoothing == 0.0 && z_loss == 0.0 && logit_scale > 0.0;
  dispatch_rows(x2, labels, vector_rows(x2), [&](auto t_tag, auto l_tag, auto vec) {
    using T = decltype(t_tag);
    using L = decltype(l_tag);
    constexpr int VEC = decltype(vec)::value;
    const int64_t scale_stride = grad_scale.dim() == 0 ? 0 : 1;
    const int variant = ce_variant();
    if constexpr (sizeof(T) == 2 && VEC * sizeof(T) == 16) {
      if (variant != kCeGeneral && plain) {  // the lean kernel (cross_entropy_plain.cuh)
        cross_entropy_plain_kernel<T, L, VEC><<<row_grid(rows, 1), kThreads, 0, current_stream()>>>(
            x2.mutable_data_ptr<T>(), x2.stride(0), label_ptr<L>(labels), ignore_index, rows, v,
            static_cast<float>(logit_scale), grad_scale.const_data_ptr<float>(), scale_stride,
            loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    // Everything else: one block per SM, the rows in flight stay in L1/L2 for the gradient pass.
    cross_entropy_fused_kernel<T, L, VEC><<<row_grid(rows, 1), kThreads, 0, current_stream()>>>(
        x2.mutable_data_ptr<T>(), x2.stride(0), label_ptr<L>(labels), ignore_index, rows, v, f,
        static_cast<float>(label_smoothing), static_cast<float>(z_loss), grad_scale.const_data_ptr<float>(),
        scale_stride, loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

void scale_rows_inplace_cuda(at::Tensor& t, const at::Tensor& scale_in) {
  check_scale_rows_args(t, scale_in);
  at::assert_no_internal_overlap(t);
  if (t.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const at::Tensor scale = scale_in.contiguous();
  const int64_t scale_stride = scale.dim() == 0 ? 0 : 1;
  // Rows [N, M] in place when each row's elements are contiguous (the usual case), as on the CPU; otherwise
  // ATen's broadcast multiply (same float32 math, one rounding).
  const at::Tensor row0 = t.select(0, 0);
  if (!row0.is_contiguous()) {
    std::vector<int64_t> shape(t.dim(), 1);
    shape[0] = scale_stride ? t.size(0) : 1;
    t.mul_(scale.reshape(shape));
    return;
  }
  at::Tensor t2 = t.as_strided({t.size(0), row0.numel()}, {t.stride(0), 1});
  const int64_t rows = t2.size(0), cols = t2.size(1);
  SWIFTLORA_DISPATCH_FLOAT(t.scalar_type(), "scale_rows_cuda", [&] {
    using T = scalar_t;
    // A grid-stride loop over rows on a few blocks per SM: rows whose scale is 1 (most, in the online softmax's
    // rescales) then cost a load, not a block launch each (2048 launches of 1024 threads took 14 µs).
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(rows, int64_t{sm_count()} * 8)));
    const auto threads = static_cast<unsigned>(std::min<int64_t>(256, std::max<int64_t>(32, ceil_div(cols, 32) * 32)));
    if (vector_rows(t2)) {
      scale_rows_kernel<T, 16 / sizeof(T)><<<grid, threads, 0, current_stream()>>>(
          t2.mutable_data_ptr<T>(), t2.stride(0), rows, cols, scale.const_data_ptr<float>(), scale_stride);
    } else {
      scale_rows_kernel<T, 1><<<grid, threads, 0, current_stream()>>>(
          t2.mutable_data_ptr<T>(), t2.stride(0), rows, cols, scale.const_data_ptr<float>(), scale_stride);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace swiftlora::cuda

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) {
  m.impl("softmax_stats", &swiftlora::cuda::softmax_stats_cuda);
  m.impl("softmax_grad", &swiftlora::cuda::softmax_grad_cuda);
  m.impl("softmax_grad_", &swiftlora::cuda::softmax_grad_inplace_cuda);
  m.impl("cross_entropy_fused_", &swiftlora::cuda::cross_entropy_fused_cuda);
  m.impl("scale_rows_", &swiftlora::cuda::scale_rows_inplace_cuda);
}
