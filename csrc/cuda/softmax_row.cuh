// Device pieces of the softmax-over-vocabulary kernels (cross_entropy.cu, cross_entropy_plain.cuh): the logit
// transform, online (max, Σexp) statistics and their block-wide merge, the walk over one row in 16-byte vectors,
// and the gradient of one element.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/cuda_utils.cuh"

namespace swiftlora::cuda {

constexpr int kUnroll = 4;  // vectors a thread loads before using them
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kLog2e = 1.4426950408889634f;

// 2^x by the hardware's approximation (ex2.approx.ftz: what __expf uses after its multiply by log2 e).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

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

__device__ __forceinline__ Online warp_merge(Online o) {
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

// Block-wide merge; every thread gets the result. `scratch`: 32 Online slots.
__device__ __forceinline__ Online block_merge(Online o, Online* scratch) {
  o = warp_merge(o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read from the previous row
  if (lane == 0) scratch[warp] = o;
  __syncthreads();
  return warp_merge(lane < warps ? scratch[lane] : empty_online());
}

// Visits x[0, n) as this thread's share of the block: fn(vector, first column) for VEC-element vectors (kUnroll of
// them loaded before the first is used, to keep loads in flight), then fn(1-element vector, column) for the tail
// that does not fill a vector. x must be 16-byte aligned when VEC > 1. kLastUse: evict-first loads.
template <typename T, int VEC, bool kLastUse = false, typename Fn>
__device__ __forceinline__ void walk_row(const T* x, int64_t n, Fn&& fn) {
  auto load = [](const T* p) { return kLastUse ? load_vec_stream<T, VEC>(p) : load_vec<T, VEC>(p); };
  const int64_t full = n / VEC * VEC;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  int64_t c = static_cast<int64_t>(threadIdx.x) * VEC;
  for (; c + (kUnroll - 1) * step + VEC <= full; c += kUnroll * step) {
    Vec<T, VEC> xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) xv[u] = load(x + c + u * step);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) fn(xv[u], c + u * step);
  }
  for (; c + VEC <= full; c += step) fn(load(x + c), c);
  for (int64_t t = full + threadIdx.x; t < n; t += blockDim.x) fn(load_vec<T, 1>(x + t), t);
}

// This thread's statistics of x[0, n) (merge them with block_merge).
template <typename T, int VEC, bool kEntropy>
__device__ __forceinline__ Online thread_stats(const T* x, int64_t n, const Transform& f) {
  Online o = empty_online();
  walk_row<T, VEC>(x, n, [&](const auto& xv, int64_t) {
    constexpr int kN = sizeof(xv.v) / sizeof(T);
    float z[kN];
#pragma unroll
    for (int j = 0; j < kN; ++j) z[j] = f.z(static_cast<float>(xv.v[j]));
    push<kN, kEntropy>(o, z);
  });
  return o;
}

// g_j = (a·p_j + b·[j = label] + c + d·p_j·z_j)·dz_j/dx_j.
struct GradCoef {
  float lse, a, b, c, d;
  int64_t label;  // column of the label term in the walked range; -1: none
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

// out[0, n) = gradient of x[0, n); out may be x. kStreaming: x is read for the last time and out is not read
// again soon (evict-first loads and stores).
template <typename T, int VEC, bool kStreaming = false>
__device__ __forceinline__ void row_grad(const T* x, T* out, int64_t n, const GradCoef& k, const Transform& f) {
  walk_row<T, VEC, kStreaming>(x, n, [&](const auto& xv, int64_t c) {
    constexpr int kN = sizeof(xv.v) / sizeof(T);
    Vec<T, kN> g;
#pragma unroll
    for (int j = 0; j < kN; ++j) g.v[j] = grad_at<T>(static_cast<float>(xv.v[j]), c + j, k, f);
    if constexpr (kStreaming) {
      store_vec_stream<T, kN>(out + c, g);
    } else {
      store_vec<T, kN>(out + c, g);
    }
  });
}

// The row's label: -1 for none (no labels, or ignore_index); -2 for one outside [0, V) (its row becomes NaN).
template <typename L>
__device__ __forceinline__ int64_t row_label(const L* labels, int64_t row, int64_t ignore_index, int64_t v) {
  if (labels == nullptr) return -1;
  const int64_t l = static_cast<int64_t>(labels[row]);
  if (l == ignore_index) return -1;
  return (l >= 0 && l < v) ? l : -2;
}

// The gradient coefficients of cross-entropy (+ label smoothing ε, z-loss) scaled by gs, and its loss:
// lse − (1−ε)·z_label − (ε/V)·Σz + z_loss·lse², written as log Σexp(z − m) + (m − z_label) + ... so |z| ~ 1e4
// does not cancel two large numbers (as the CPU kernel).
struct CrossEntropyRow {
  GradCoef k;
  float loss, lse;
};

__device__ __forceinline__ CrossEntropyRow cross_entropy_row(const Online& o, float label_z, int64_t label, int64_t v,
                                                             float gs, float smoothing, float z_loss) {
  const float l = o.m + __logf(o.s);
  CrossEntropyRow r{GradCoef{l, 0.f, 0.f, 0.f, 0.f, label}, 0.f, l};
  if (label >= 0) {
    r.k.a = gs * (1.f + 2.f * z_loss * l);
    r.k.b = -gs * (1.f - smoothing);
    r.k.c = -gs * smoothing / static_cast<float>(v);
    r.loss = __logf(o.s) + (1.f - smoothing) * (o.m - label_z) + smoothing * (o.m - o.sz / static_cast<float>(v)) +
             z_loss * l * l;
  } else if (label == -2) {
    r.k.a = kNaN;
    r.loss = kNaN;
    r.lse = kNaN;
  }
  return r;
}

}  // namespace swiftlora::cuda
