// Softmax over the vocabulary on the GPU: row statistics, gradients, the one-pass fused cross-entropy, and the
// row scaling its backward uses. One 1024-thread block per row (a row of 128k bf16 logits is 256 KB); threads
// stride the row with 16-byte vectors, four in flight each, keeping an online (max, Σexp) per thread that the
// block then merges. Arguments are checked in csrc/cpu/cross_entropy.cpp (shared with the CPU kernels).
//
// Floors (N rows, V vocab, E bytes per logit): stats read N·V·E; grad reads and writes N·V·E; the fused kernel
// reads a row, then re-reads it from L2 while writing the gradient (a persistent grid of one block per SM keeps
// 132 rows · 256 KB = 33 MB in flight, inside the 50 MB L2), so HBM sees one read and one write.
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "ops.h"

namespace swiftlora::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kUnroll = 4;  // vectors a thread loads before using them
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// z = cap·tanh(scale·x/cap) (cap > 0) or scale·x, and dz/dx.
struct Transform {
  float scale, cap, inv_cap;
  __device__ __forceinline__ float z(float x) const { return cap > 0.f ? cap * tanhf(x * scale * inv_cap) : x * scale; }
  __device__ __forceinline__ float z_and_dz(float x, float& dz) const {
    if (cap > 0.f) {
      const float u = x * scale * inv_cap;
      // 1 − tanh²(u) = 4e/(1 + e)², e = exp(−2|u|): no cancellation near saturation (as the CPU kernel).
      const float e = expf(-2.f * fabsf(u));
      dz = scale * 4.f * e / ((1.f + e) * (1.f + e));
      return cap * tanhf(u);
    }
    dz = scale;
    return x * scale;
  }
};

// Running softmax statistics of a set of z: max m, Σexp(z − m), Σz, Σexp(z − m)·z.
struct Online {  // trivial, so it can live in __shared__; start from empty_online()
  float m, s, sz, spz;
};

__device__ __forceinline__ Online empty_online() { return Online{kNegInf, 0.f, 0.f, 0.f}; }

__device__ __forceinline__ Online merge(const Online& a, const Online& b) {
  Online o = empty_online();
  o.m = fmaxf(a.m, b.m);
  o.sz = a.sz + b.sz;
  if (o.m == kNegInf) return o;  // both empty (or all -inf)
  const float ra = a.m == kNegInf ? 0.f : __expf(a.m - o.m), rb = b.m == kNegInf ? 0.f : __expf(b.m - o.m);
  o.s = a.s * ra + b.s * rb;
  o.spz = a.spz * ra + b.spz * rb;
  return o;
}

// Adds n values at once: one rescale per group rather than per element.
template <int N, bool kEntropy>
__device__ __forceinline__ void push(Online& o, const float (&z)[N]) {
  float mv = z[0];
#pragma unroll
  for (int i = 1; i < N; ++i) mv = fmaxf(mv, z[i]);
#pragma unroll
  for (int i = 0; i < N; ++i) o.sz += z[i];
  if (mv == kNegInf) return;
  if (mv > o.m) {
    const float r = o.m == kNegInf ? 0.f : __expf(o.m - mv);
    o.s *= r;
    if constexpr (kEntropy) o.spz *= r;
    o.m = mv;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float e = __expf(z[i] - o.m);
    o.s += e;
    if constexpr (kEntropy) o.spz += e * z[i];
  }
}

// Block-wide merge; every thread gets the result. `scratch`: 32 Online slots.
__device__ Online block_merge(Online o, Online* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Online other;
    other.m = __shfl_xor_sync(0xffffffffu, o.m, off);
    other.s = __shfl_xor_sync(0xffffffffu, o.s, off);
    other.sz = __shfl_xor_sync(0xffffffffu, o.sz, off);
    other.spz = __shfl_xor_sync(0xffffffffu, o.spz, off);
    o = merge(o, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read from the previous row
  if (lane == 0) scratch[warp] = o;
  __syncthreads();
  o = lane < warps ? scratch[lane] : empty_online();
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Online other;
    other.m = __shfl_xor_sync(0xffffffffu, o.m, off);
    other.s = __shfl_xor_sync(0xffffffffu, o.s, off);
    other.sz = __shfl_xor_sync(0xffffffffu, o.sz, off);
    other.spz = __shfl_xor_sync(0xffffffffu, o.spz, off);
    o = merge(o, other);
  }
  return o;
}

// The statistics of one row x[0, V) (VEC elements per 16-byte vector when the row allows it, else 1).
template <typename T, int VEC, bool kEntropy>
__device__ Online row_stats(const T* __restrict__ x, int64_t v, const Transform& f, Online* scratch) {
  Online o = empty_online();
  const int64_t full = v / VEC * VEC;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  int64_t c = static_cast<int64_t>(threadIdx.x) * VEC;
  for (; c + (kUnroll - 1) * step + VEC <= full; c += kUnroll * step) {
    Vec<T, VEC> xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) xv[u] = load_vec<T, VEC>(x + c + u * step);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float z[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[j] = f.z(static_cast<float>(xv[u].v[j]));
      push<VEC, kEntropy>(o, z);
    }
  }
  for (; c + VEC <= full; c += step) {
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + c);
    float z[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) z[j] = f.z(static_cast<float>(xv.v[j]));
    push<VEC, kEntropy>(o, z);
  }
  for (int64_t t = full + threadIdx.x; t < v; t += blockDim.x) {
    const float z[1] = {f.z(static_cast<float>(x[t]))};
    push<1, kEntropy>(o, z);
  }
  return block_merge(o, scratch);
}

// g_j = (a·p_j + b·[j = label] + c + d·p_j·z_j)·dz_j/dx_j, read from x and written to out (which may be x).
struct GradCoef {
  float lse, a, b, c, d;
  int64_t label;  // -1: none
};

template <typename T>
__device__ __forceinline__ T grad_at(float xv, int64_t col, const GradCoef& k, const Transform& f) {
  float dz;
  const float z = f.z_and_dz(xv, dz);
  const float p = __expf(z - k.lse);
  float g = k.a * p + k.c + k.d * p * z;
  if (col == k.label) g += k.b;
  return static_cast<T>(g * dz);
}

template <typename T, int VEC>
__device__ void row_grad(const T* x, T* out, int64_t v, const GradCoef& k, const Transform& f) {
  const int64_t full = v / VEC * VEC;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  int64_t c = static_cast<int64_t>(threadIdx.x) * VEC;
  for (; c + (kUnroll - 1) * step + VEC <= full; c += kUnroll * step) {
    Vec<T, VEC> xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) xv[u] = load_vec<T, VEC>(x + c + u * step);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      Vec<T, VEC> g;
#pragma unroll
      for (int j = 0; j < VEC; ++j) g.v[j] = grad_at<T>(static_cast<float>(xv[u].v[j]), c + u * step + j, k, f);
      store_vec<T, VEC>(out + c + u * step, g);
    }
  }
  for (; c + VEC <= full; c += step) {
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + c);
    Vec<T, VEC> g;
#pragma unroll
    for (int j = 0; j < VEC; ++j) g.v[j] = grad_at<T>(static_cast<float>(xv.v[j]), c + j, k, f);
    store_vec<T, VEC>(out + c, g);
  }
  for (int64_t t = full + threadIdx.x; t < v; t += blockDim.x) out[t] = grad_at<T>(static_cast<float>(x[t]), t, k, f);
}

// The row's label: -1 for none (no labels, or ignore_index); -2 for one outside [0, V) (its row becomes NaN).
template <typename L>
__device__ __forceinline__ int64_t row_label(const L* labels, int64_t row, int64_t ignore_index, int64_t v) {
  if (labels == nullptr) return -1;
  const int64_t l = static_cast<int64_t>(labels[row]);
  if (l == ignore_index) return -1;
  return (l >= 0 && l < v) ? l : -2;
}

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---------------------------------------------------------------------------------------------------- kernels
template <typename T, typename L, int VEC, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    softmax_stats_kernel(const T* __restrict__ x, int64_t x_stride, const L* __restrict__ labels,
                         int64_t ignore_index, int64_t rows, int64_t v, Transform f, float* __restrict__ lse,
                         float* __restrict__ z_label, float* __restrict__ z_sum, float* __restrict__ pz_sum) {
  __shared__ Online scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    const Online o = row_stats<T, VEC, kEntropy>(xr, v, f, scratch);
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

// Loss = lse − (1−ε)·z_label − (ε/V)·Σz + z_loss·lse² (0 without a label); grad of scale_row·loss into x.
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
    // Thread 0 reads the label's logit now: row_stats' barriers come before any thread overwrites the row.
    const float label_z = threadIdx.x == 0 && label >= 0 ? f.z(static_cast<float>(xr[label])) : 0.f;
    const Online o = row_stats<T, VEC, false>(xr, v, f, scratch);
    const float l = o.m + __logf(o.s);
    const float gs = grad_scale[row * scale_stride];
    GradCoef k{l, 0.f, 0.f, 0.f, 0.f, label};
    if (label >= 0) {
      k.a = gs * (1.f + 2.f * z_loss * l);
      k.b = -gs * (1.f - smoothing);
      k.c = -gs * smoothing / static_cast<float>(v);
    } else if (label == -2) {
      k.a = kNaN;
    }
    if (threadIdx.x == 0) {
      lse_out[row] = label == -2 ? kNaN : l;
      // log Σexp(z − m) + (m − z_label): no cancellation between two large numbers when |z| ~ 1e4 (as the CPU).
      loss[row] = label >= 0 ? __logf(o.s) + (1.f - smoothing) * (o.m - label_z) +
                                   smoothing * (o.m - o.sz / static_cast<float>(v)) + z_loss * l * l
                             : (label == -2 ? kNaN : 0.f);
    }
    row_grad<T, VEC>(xr, xr, v, k, f);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    scale_rows_kernel(T* t, int64_t t_stride, int64_t rows, int64_t cols, const float* __restrict__ scale,
                      int64_t scale_stride) {
  for (int64_t row = blockIdx.y * static_cast<int64_t>(gridDim.x) + blockIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * gridDim.y) {
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
  dispatch_rows(x2, labels, vector_rows(x2), [&](auto t_tag, auto l_tag, auto vec) {
    using T = decltype(t_tag);
    using L = decltype(l_tag);
    // One block per SM: the rows in flight stay in L2 for the gradient pass.
    cross_entropy_fused_kernel<T, L, decltype(vec)::value><<<row_grid(rows, 1), kThreads, 0, current_stream()>>>(
        x2.mutable_data_ptr<T>(), x2.stride(0), label_ptr<L>(labels), ignore_index, rows, v, f,
        static_cast<float>(label_smoothing), static_cast<float>(z_loss), grad_scale.const_data_ptr<float>(),
        grad_scale.dim() == 0 ? 0 : 1, loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
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
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(rows, 65535)),
                    static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, 65535), 65535)));
    const auto threads =
        static_cast<unsigned>(std::min<int64_t>(kThreads, std::max<int64_t>(32, ceil_div(cols, 32) * 32)));
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
