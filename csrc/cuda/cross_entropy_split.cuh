// Variants of the fused cross-entropy kernel (cross_entropy.cu, chosen by SWIFTLORA_CE_VARIANT) that split each row
// of logits over a thread-block cluster of C CTAs (C = 1: no cluster) on a persistent grid. Each CTA walks its
// slice of the row (whole 16-byte vectors; the ragged tail goes to the last rank), merges its threads' (max, Σexp,
// Σz), and the C partials are merged through distributed shared memory (one slot per row parity, so one cluster
// barrier per row). Then the CTA writes the gradient of its slice over the logits.
//
// - cross_entropy_split_kernel: the slice is read twice, statistics from HBM, gradient re-read from L2 (evict-first
//   loads and stores). Live L2 footprint: 256 KB·(CTAs in flight)/C.
// - cross_entropy_hold_kernel: the slice stays in registers (kHold vectors a thread; with kHold·VEC ≤ 16 the
//   exponentials of the statistics pass are kept and reused by the gradient), and the next row's slice is loaded
//   while this one is reduced and written: HBM sees each logit read once and written once, L2 holds nothing.
//
// Both take the common case (no soft-cap) as kFast: z = scale·x, p = exp(fma(x, scale, −lse)), g = a'·p + c'; the
// label's +b term is not tested per element but written by the one thread that owns the label's column (after its
// own store of that element: program order). Clusters need sm_90: on older GPUs (or builds) only C = 1 runs.
#pragma once
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#endif

#include "softmax_row.cuh"

namespace swiftlora::cuda {

// Labels as int32 or int64 (one kernel for both), with row_label's meaning: -1 none, -2 outside [0, V).
struct RowLabels {
  const void* p;
  bool is_i32;
  int64_t ignore_index;
  __device__ __forceinline__ int64_t raw(int64_t row) const {
    return is_i32 ? static_cast<int64_t>(static_cast<const int32_t*>(p)[row]) : static_cast<const int64_t*>(p)[row];
  }
  __device__ __forceinline__ int64_t checked(int64_t l, int64_t v) const {
    if (l == ignore_index) return -1;
    return (l >= 0 && l < v) ? l : -2;
  }
};

// z = scale·x: the no-soft-cap transform, for thread_stats.
struct LinearZ {
  float scale;
  __device__ __forceinline__ float z(float x) const { return x * scale; }
};

// The gradient without soft-cap, dz = scale folded in: g = a·p + c (+ b at the label), p = exp(scale·x − lse).
struct FastGrad {
  float scale, lse, a, c, cb;
  __device__ __forceinline__ FastGrad(const GradCoef& k, float s)
      : scale(s), lse(k.lse), a(k.a * s), c(k.c * s), cb((k.c + k.b) * s) {}
  __device__ __forceinline__ float p(float x) const { return exp2_approx(fmaf(x, scale, -lse) * kLog2e); }
  __device__ __forceinline__ float at(float x, bool is_label) const { return fmaf(a, p(x), is_label ? cb : c); }
};

// ----------------------------------------------------------------------------------------------- cluster pieces
__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}

__device__ __forceinline__ unsigned cluster_ranks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().num_blocks();
#else
  return 1;
#endif
}

// A barrier over every thread of the cluster (release/acquire: shared-memory writes before it are visible to peers).
__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

__device__ __forceinline__ const Online* peer_slot(const Online* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  return p;
#endif
}

// Columns [begin, begin + n) of a row of v that cluster rank `rank` of `ranks` walks: whole vectors, the ragged tail
// (v not a multiple of VEC) to the last rank, so every slice starts 16-byte aligned.
struct Slice {
  int64_t begin, n;
};

__device__ __forceinline__ Slice row_slice(int64_t v, int vec, unsigned rank, unsigned ranks) {
  const int64_t nv = v / vec, chunk = (nv + ranks - 1) / ranks;
  const int64_t b = min(nv, static_cast<int64_t>(rank) * chunk) * vec;
  const int64_t e = rank + 1 == ranks ? v : min(nv, static_cast<int64_t>(rank + 1) * chunk) * vec;
  return Slice{b, e - b};
}

// The row's statistics from every thread's own: warps, then the CTA (warp 0), then the cluster's CTAs through
// DSMEM. `slots[2]` in shared memory, indexed by row parity: a peer reads slot p of row i before it arrives at row
// i+1's barrier, and slot p is rewritten only after that barrier (row i+2). Every thread of every rank gets the
// same bits (butterfly merges of a commutative merge). Contains barriers: all threads call it.
__device__ __forceinline__ Online cluster_merge(Online o, Online* scratch, Online* slots, int parity, unsigned ranks) {
  o = warp_merge(o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = o;  // scratch's readers (warp 0, last row) passed the last row's barrier
  __syncthreads();
  if (warp == 0) {
    o = warp_merge(lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : empty_online());
    if (lane == 0) slots[parity] = o;
  }
  if (ranks == 1) {
    __syncthreads();
    return slots[parity];
  }
  cluster_barrier();
  return warp_merge(static_cast<unsigned>(lane) < ranks ? *peer_slot(slots + parity, lane) : empty_online());
}

// Whether this thread is the one walk_row hands column `col` of a walk over n columns.
template <int VEC>
__device__ __forceinline__ bool walks_column(int64_t col, int64_t n) {
  const int64_t full = n / VEC * VEC;
  return (col < full ? col / VEC : col - full) % blockDim.x == threadIdx.x;
}

// ------------------------------------------------------------------------------------------ two passes, L2 between
template <typename T, int VEC, int kThreads, bool kFast>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    cross_entropy_split_kernel(T* x, int64_t x_stride, RowLabels labels, int64_t rows, int64_t v, Transform f,
                               float smoothing, float z_loss, const float* __restrict__ grad_scale,
                               int64_t scale_stride, float* __restrict__ loss, float* __restrict__ lse_out) {
  __shared__ Online scratch[32];
  __shared__ Online slots[2];
  const unsigned ranks = cluster_ranks(), rank = cluster_rank();
  const Slice s = row_slice(v, VEC, rank, ranks);
  const bool reporter = rank == 0 && threadIdx.x == 0;
  int parity = 0;
  for (int64_t row = blockIdx.x / ranks; row < rows; row += gridDim.x / ranks, parity ^= 1) {
    T* xr = x + row * x_stride;
    T* xs = xr + s.begin;
    const int64_t label = labels.checked(labels.raw(row), v);
    const int64_t local = label - s.begin;
    const bool owner = label >= 0 && local >= 0 && local < s.n && walks_column<VEC>(local, s.n);
    // Read before this row's cluster barrier, so before any thread (of any rank) overwrites the row.
    const float label_x = owner ? static_cast<float>(xs[local]) : 0.f;
    const float label_z = reporter && label >= 0 ? f.z(static_cast<float>(xr[label])) : 0.f;
    Online o;
    if constexpr (kFast) {
      o = thread_stats<T, VEC, false>(xs, s.n, LinearZ{f.scale});
    } else {
      o = thread_stats<T, VEC, false>(xs, s.n, f);
    }
    o = cluster_merge(o, scratch, slots, parity, ranks);
    const CrossEntropyRow r =
        cross_entropy_row(o, label_z, label, v, grad_scale[row * scale_stride], smoothing, z_loss);
    if (reporter) {
      lse_out[row] = r.lse;
      loss[row] = r.loss;
    }
    GradCoef k = r.k;
    if constexpr (kFast) {
      const FastGrad g(k, f.scale);
      walk_row<T, VEC, true>(xs, s.n, [&](const auto& xv, int64_t c) {
        constexpr int kN = sizeof(xv.v) / sizeof(T);
        Vec<T, kN> out;
#pragma unroll
        for (int j = 0; j < kN; ++j) out.v[j] = static_cast<T>(g.at(static_cast<float>(xv.v[j]), false));
        store_vec_stream<T, kN>(xs + c, out);
      });
      if (owner) xs[local] = static_cast<T>(g.at(label_x, true));
    } else {
      k.label = -1;  // the label term: below, by its owner
      row_grad<T, VEC, true>(xs, xs, s.n, k, f);
      k.label = 0;
      if (owner) xs[local] = grad_at<T>(label_x, 0, k, f);
    }
  }
  if (ranks > 1) cluster_barrier();  // no CTA leaves while a peer may still read its slots
}

// ------------------------------------------------------------------------------- one pass, the slice in registers
// This thread's share of one row's slice: vector u is the slice's vector threadIdx.x + u·kThreads; `tail` the
// element nv·VEC + threadIdx.x of the ragged end; label (checked) and, for rank 0's thread 0, the label's logit.
template <typename T, int VEC, int kHold>
struct HeldSlice {
  Vec<T, VEC> xv[kHold];
  T tail;
  int label;  // checked: -1 none, -2 out of range
  float label_x;
};

template <typename T, int VEC, int kThreads, int kHold>
__device__ __forceinline__ void load_slice(HeldSlice<T, VEC, kHold>& h, const T* xr, const Slice& s, int nv, int tail,
                                           int label, bool reporter) {
  const T* xs = xr + s.begin;
#pragma unroll
  for (int u = 0; u < kHold; ++u) {
    const int i = static_cast<int>(threadIdx.x) + u * kThreads;
    if (i < nv) h.xv[u] = load_vec_stream<T, VEC>(xs + static_cast<int64_t>(i) * VEC);
  }
  if (static_cast<int>(threadIdx.x) < tail) h.tail = xs[static_cast<int64_t>(nv) * VEC + threadIdx.x];
  h.label = label;
  h.label_x = reporter && label >= 0 ? static_cast<float>(xr[label]) : 0.f;
}

// Exponentials of a thread's held vectors (vector u valid when threadIdx.x + u·kThreads < nv, plus one optional tail
// element). stats(): the max first, then Σexp(z − max) and Σz in one sweep; with kKeepE the exponentials stay here
// and grad() is one FMA per element: p = e·exp(max − lse), folded into a_e.
template <typename T, int VEC, int kThreads, int kHold, bool kKeepE>
struct HeldExp {
  float e[kKeepE ? kHold : 1][VEC];
  float e_tail = 0.f;
  float mm = 0.f;  // the max used (0 when all −inf: every exponential 0, none NaN)

  __device__ __forceinline__ Online stats(const Vec<T, VEC> (&xv)[kHold], int nv, float scale, bool has_tail,
                                          float tail_x) {
    const int tid = static_cast<int>(threadIdx.x);
    float m = has_tail ? tail_x * scale : kNegInf;
#pragma unroll
    for (int u = 0; u < kHold; ++u) {
      if (tid + u * kThreads < nv) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) m = fmaxf(m, static_cast<float>(xv[u].v[j]) * scale);
      }
    }
    mm = m == kNegInf ? 0.f : m;
    Online o{m, 0.f, 0.f, 0.f};
#pragma unroll
    for (int u = 0; u < kHold; ++u) {
      if (tid + u * kThreads < nv) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float z = static_cast<float>(xv[u].v[j]) * scale;
          const float ez = exp2_approx((z - mm) * kLog2e);
          o.sz += z;
          o.s += ez;
          if constexpr (kKeepE) e[u][j] = ez;
        }
      }
    }
    if (has_tail) {
      const float z = tail_x * scale;
      e_tail = exp2_approx((z - mm) * kLog2e);
      o.sz += z;
      o.s += e_tail;
    }
    return o;
  }

  // a_e: g.a·exp(mm − lse), the factor of a kept exponential.
  __device__ __forceinline__ float a_e(const FastGrad& g) const { return g.a * exp2_approx((mm - g.lse) * kLog2e); }

  // The gradient of held vector u (its raw values xu), with the label's +b at element jl when u == ul.
  __device__ __forceinline__ Vec<T, VEC> grad(const Vec<T, VEC>& xu, int u, float ae, const FastGrad& g, int ul,
                                              int jl) const {
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xj = static_cast<float>(xu.v[j]);
      out.v[j] = static_cast<T>(kKeepE ? fmaf(ae, e[kKeepE ? u : 0][j], g.c) : g.at(xj, false));
    }
    if (ul == u) {  // rare: one thread of the cluster, one vector
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (j == jl) {
          const float xj = static_cast<float>(xu.v[j]);
          out.v[j] = static_cast<T>(kKeepE ? fmaf(ae, e[kKeepE ? u : 0][j], g.cb) : g.at(xj, true));
        }
      }
    }
    return out;
  }
};

template <typename T, int VEC, int kThreads, int kHold>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    cross_entropy_hold_kernel(T* x, int64_t x_stride, RowLabels labels, int rows, int v, float scale,
                              float smoothing, float z_loss, const float* __restrict__ grad_scale,
                              int64_t scale_stride, float* __restrict__ loss, float* __restrict__ lse_out) {
  constexpr bool kKeepE = kHold * VEC <= 16;  // registers for the exponentials beside the next row's slice
  __shared__ Online scratch[32];
  __shared__ Online slots[2];
  const unsigned ranks = cluster_ranks(), rank = cluster_rank();
  const Slice s = row_slice(v, VEC, rank, ranks);
  const int nv = static_cast<int>(s.n / VEC), tail = static_cast<int>(s.n - static_cast<int64_t>(nv) * VEC);
  const int tid = static_cast<int>(threadIdx.x);
  const bool reporter = rank == 0 && tid == 0;
  const int step = static_cast<int>(gridDim.x / ranks);
  int row = static_cast<int>(blockIdx.x / ranks);
  auto label_of = [&](int r) { return static_cast<int>(labels.checked(labels.raw(r), v)); };
  HeldSlice<T, VEC, kHold> cur;
  // Labels run one row ahead of the slices, so the label logit's address is known when the slice load is issued.
  int label_ahead = row + step < rows ? label_of(row + step) : -1;
  if (row < rows) load_slice<T, VEC, kThreads>(cur, x + row * x_stride, s, nv, tail, label_of(row), reporter);
  int parity = 0;
  for (; row < rows; row += step, parity ^= 1) {
    HeldSlice<T, VEC, kHold> next;
    if (row + step < rows) {
      load_slice<T, VEC, kThreads>(next, x + int64_t{row + step} * x_stride, s, nv, tail, label_ahead, reporter);
      label_ahead = row + 2 * step < rows ? label_of(row + 2 * step) : -1;
    }
    HeldExp<T, VEC, kThreads, kHold, kKeepE> held;
    Online o = held.stats(cur.xv, nv, scale, tid < tail, static_cast<float>(cur.tail));
    o = cluster_merge(o, scratch, slots, parity, ranks);
    const int label = cur.label;
    const CrossEntropyRow r =
        cross_entropy_row(o, cur.label_x * scale, label, v, grad_scale[row * scale_stride], smoothing, z_loss);
    if (reporter) {
      lse_out[row] = r.lse;
      loss[row] = r.loss;
    }
    // Gradient. The label's column, if in this slice: held vector ul of thread owner, element jl (ul = kHold: tail).
    const FastGrad g(r.k, scale);
    const int64_t local = label - s.begin;
    int ul = -1, jl = 0;
    if (label >= 0 && local >= 0 && local < s.n) {
      const int64_t full = static_cast<int64_t>(nv) * VEC;
      if (local < full) {
        const int vi = static_cast<int>(local / VEC);
        if (vi % kThreads == tid) ul = vi / kThreads, jl = static_cast<int>(local % VEC);
      } else if (local - full == tid) {
        ul = kHold;
      }
    }
    const float ae = held.a_e(g);
    T* xs = x + int64_t{row} * x_stride + s.begin;
#pragma unroll
    for (int u = 0; u < kHold; ++u) {
      const int i = tid + u * kThreads;
      if (i < nv) {
        const Vec<T, VEC> out = held.grad(cur.xv[u], u, ae, g, ul, jl);
        store_vec_stream<T, VEC>(xs + static_cast<int64_t>(i) * VEC, out);
      }
    }
    if (tid < tail) {
      xs[static_cast<int64_t>(nv) * VEC + tid] = static_cast<T>(fmaf(ae, held.e_tail, ul == kHold ? g.cb : g.c));
    }
    cur = next;
  }
  if (ranks > 1) cluster_barrier();  // no CTA leaves while a peer may still read its slots
}

}  // namespace swiftlora::cuda
