// The fused cross-entropy with each CTA's slice of a row brought into shared memory by one bulk (TMA) copy, kStages
// slices deep (sm_90; variants in cross_entropy_variants.cuh). As cross_entropy_hold_kernel (rows split over a
// cluster, statistics merged through DSMEM, gradient written from registers or shared memory, never re-read from
// L2), but the next kStages − 1 rows' slices are in flight without holding registers: one thread issues a
// cp.async.bulk per row and every thread waits on that stage's mbarrier. Rows whose V is not a multiple of the
// vector width take another kernel (a bulk copy moves whole 16-byte units).
#pragma once
#include "cross_entropy_split.cuh"

namespace swiftlora::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

// Thread 0: this stage's barrier expects `bytes`, copied from global `src` into shared `dst`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
  if (bytes == 0) return;
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n\t.reg .pred done;\n\tWAIT:\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
      "@!done bra WAIT;\n\t}" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
#endif

template <typename T, int VEC, int kThreads, int kHold, int kStages>
__global__ void __launch_bounds__(kThreads, 1)
    cross_entropy_bulk_kernel(T* x, int64_t x_stride, RowLabels labels, int rows, int v, float scale,
                              float smoothing, float z_loss, const float* __restrict__ grad_scale,
                              int64_t scale_stride, float* __restrict__ loss, float* __restrict__ lse_out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kKeepE = kHold * VEC <= 16;
  extern __shared__ __align__(128) unsigned char ring[];  // kStages slices of `chunk` vectors
  __shared__ uint64_t bars[kStages];
  __shared__ Online scratch[32];
  __shared__ Online slots[2];
  const unsigned ranks = cluster_ranks(), rank = cluster_rank();
  const Slice s = row_slice(v, VEC, rank, ranks);  // v % VEC == 0: whole vectors only
  const int nv = static_cast<int>(s.n / VEC), chunk = (v / VEC + static_cast<int>(ranks) - 1) / static_cast<int>(ranks);
  const int tid = static_cast<int>(threadIdx.x);
  const int step = static_cast<int>(gridDim.x / ranks), first = static_cast<int>(blockIdx.x / ranks);
  auto stage_data = [&](int stage) { return reinterpret_cast<Vec<T, VEC>*>(ring) + stage * chunk; };
  auto issue = [&](int i) {  // thread 0: the slice of this CTA's i-th row into stage i % kStages
    const int row = first + i * step;
    if (row < rows) {
      bulk_load(stage_data(i % kStages), x + int64_t{row} * x_stride + s.begin,
                static_cast<uint32_t>(nv) * 16u, &bars[i % kStages]);
    }
  };
  if (tid == 0) {
#pragma unroll
    for (int k = 0; k < kStages; ++k) mbar_init(&bars[k]);
    asm volatile("fence.mbarrier_init.release.cluster;\n\tfence.proxy.async.shared::cta;" ::: "memory");
    for (int k = 0; k < kStages - 1; ++k) issue(k);
  }
  __syncthreads();
  // A row's label and grad scale are loaded one row ahead: no memory round trip between the copy's arrival and use.
  auto label_of = [&](int r) { return r < rows ? static_cast<int>(labels.checked(labels.raw(r), v)) : -1; };
  auto scale_of = [&](int r) { return r < rows ? grad_scale[r * scale_stride] : 0.f; };
  int label_next = label_of(first);
  float gs_next = scale_of(first);
  int i = 0;
  for (int row = first; row < rows; row += step, ++i) {
    const int stage = i % kStages;
    const Vec<T, VEC>* data = stage_data(stage);
    const int label = label_next;
    const float gs = gs_next;
    label_next = label_of(row + step);
    gs_next = scale_of(row + step);
    mbar_wait(&bars[stage], static_cast<uint32_t>(i / kStages) & 1u);
    Vec<T, VEC> xv[kHold];
#pragma unroll
    for (int u = 0; u < kHold; ++u) {
      if (tid + u * kThreads < nv) xv[u] = data[tid + u * kThreads];
    }
    HeldExp<T, VEC, kThreads, kHold, kKeepE> held;
    Online o = held.stats(xv, nv, scale, false, 0.f);
    // The label's column, if in this slice: vector vl (held as ul by thread vl % kThreads), element jl.
    const int64_t local = static_cast<int64_t>(label) - s.begin;
    const bool here = label >= 0 && local >= 0 && local < s.n;
    const int vl = here ? static_cast<int>(local / VEC) : -1, jl = here ? static_cast<int>(local % VEC) : 0;
    const bool owner = here && vl % kThreads == tid;
    const int ul = owner ? vl / kThreads : -1;
    // The loss needs z[label]: its owner writes it (shared memory still holds the raw slice); label-less rows: rank 0.
    const float label_x = owner ? static_cast<float>(data[vl].v[jl]) : 0.f;
    const bool writer = owner || (label < 0 && rank == 0 && tid == 0);
    o = cluster_merge(o, scratch, slots, i & 1, ranks);
    // Every thread has finished reading stage (i − 1) % kStages (its pass 2 came before cluster_merge's barrier).
    if (tid == 0) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      issue(i + kStages - 1);
    }
    const CrossEntropyRow r =
        cross_entropy_row(o, label_x * scale, label, v, gs, smoothing, z_loss);
    if (writer) {
      lse_out[row] = r.lse;
      loss[row] = r.loss;
    }
    const FastGrad g(r.k, scale);
    const float ae = held.a_e(g);
    T* xs = x + int64_t{row} * x_stride + s.begin;
#pragma unroll
    for (int u = 0; u < kHold; ++u) {
      const int idx = tid + u * kThreads;
      // kKeepE: from the kept exponentials; else re-read from shared memory (registers are short)
      if (idx < nv) {
        const Vec<T, VEC> out = held.grad(kKeepE ? xv[u] : data[idx], u, ae, g, ul, jl);
        store_vec_stream<T, VEC>(xs + static_cast<int64_t>(idx) * VEC, out);
      }
    }
  }
  if (ranks > 1) cluster_barrier();  // no CTA leaves while a peer may still read its slots
#endif
}

}  // namespace swiftlora::cuda
