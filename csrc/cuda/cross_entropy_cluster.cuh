// One-pass cross-entropy for Hopper (sm_90+): a row of logits is split across a thread-block cluster of C CTAs
// whose threads hold their share of the row in registers (kVecsPerThread 16-byte vectors each, all loads issued
// before any is used); each CTA merges its slice's (max, Σexp), the CTAs exchange those through distributed shared
// memory, then every thread writes the gradient of the values it holds over the logits. HBM sees each logit read
// once and written once (the floor: 2·N·V·E bytes), where the generic kernel re-reads the row for its gradient.
//
// Launch shape: grid.x = rows·C, cluster (C, 1, 1), 1024 threads (one CTA per SM: 64 registers a thread, 24 of
// them the row), C = ⌈V / (1024·kVecsPerThread·VEC)⌉ ≤ 8: V up to 393,216 for 16-bit logits, 196,608 for fp32.
// Longer rows, unaligned rows and older GPUs take the generic kernel.
#pragma once
#include <cooperative_groups.h>

#include "softmax_row.cuh"

namespace swiftlora::cuda {

constexpr int kClusterThreads = 1024;
constexpr int kVecsPerThread = 6;  // 24 registers of row: no spills at 64 a thread
constexpr int kMaxCluster = 8;  // the portable cluster size

struct SliceStats {
  Online o;
  float label_z;  // the label's z if the label falls in this slice, else 0
};

template <typename T, typename L, int VEC>
__global__ void __launch_bounds__(kClusterThreads, 1)
    cross_entropy_cluster_kernel(T* x, int64_t x_stride, const L* __restrict__ labels, int64_t ignore_index,
                                 int64_t v, int64_t slice_len, Transform f, float smoothing, float z_loss,
                                 const float* __restrict__ grad_scale, int64_t scale_stride,
                                 float* __restrict__ loss, float* __restrict__ lse_out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  __shared__ Online scratch[32];
  __shared__ SliceStats mine;
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), ranks = cluster.num_blocks();
  const int64_t row = blockIdx.x / ranks;
  const int64_t begin = rank * slice_len, end = begin + slice_len < v ? begin + slice_len : v;
  const int64_t n = end > begin ? end - begin : 0;
  T* xr = x + row * x_stride + begin;
  const int64_t label = row_label(labels, row, ignore_index, v);
  // Columns inside the slice in 32 bits (a slice is at most 1024·kVecsPerThread vectors); -1: not here.
  const int n32 = static_cast<int>(n);
  const int local_label = label >= begin && label < end ? static_cast<int>(label - begin) : -1;
  constexpr int kStep = kClusterThreads * VEC;
  const int c0 = static_cast<int>(threadIdx.x) * VEC;

  // Load: whole vectors at once; the row's ragged end (V not a multiple of VEC) element by element.
  Vec<T, VEC> xv[kVecsPerThread];
#pragma unroll
  for (int u = 0; u < kVecsPerThread; ++u) {
    const int c = c0 + u * kStep;
    if (c + VEC <= n32) {
      xv[u] = load_vec<T, VEC>(xr + c);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) xv[u].v[j] = c + j < n32 ? xr[c + j] : T(0);
    }
  }
  // The label's owner reads its logit once more (from cache) before anyone overwrites the row.
  const bool owns_label = local_label >= 0 && local_label / VEC % kClusterThreads == static_cast<int>(threadIdx.x);
  const float my_label_z = owns_label ? f.z(static_cast<float>(xr[local_label])) : 0.f;
  Online o = empty_online();
#pragma unroll
  for (int u = 0; u < kVecsPerThread; ++u) {
    const int c = c0 + u * kStep;
    float z[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) z[j] = f.z(static_cast<float>(xv[u].v[j]));
    if (c + VEC <= n32) {
      push<VEC, false>(o, z);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float zj[1] = {z[j]};
        if (c + j < n32) push<1, false>(o, zj);
      }
    }
  }
  o = block_merge(o, scratch);
  if (threadIdx.x == 0) mine = SliceStats{o, 0.f};
  __syncthreads();
  if (owns_label) mine.label_z = my_label_z;
  cluster.sync();

  // Every CTA merges the slices in rank order, so all get bit-identical row statistics.
  Online all = empty_online();
  float label_z = 0.f;
  for (unsigned r = 0; r < ranks; ++r) {
    const SliceStats* peer = cluster.map_shared_rank(&mine, r);
    all = merge(all, peer->o);
    label_z += peer->label_z;
  }
  // Peers read `mine` until they arrive here; wait for them only before exiting, so the gradient pass overlaps.
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");

  const CrossEntropyRow r = cross_entropy_row(all, label_z, label, v, grad_scale[row * scale_stride], smoothing, z_loss);
  if (rank == 0 && threadIdx.x == 0) {
    lse_out[row] = r.lse;
    loss[row] = r.loss;
  }
  GradCoef k = r.k;
  k.label = local_label;  // columns below are slice-relative
#pragma unroll
  for (int u = 0; u < kVecsPerThread; ++u) {
    const int c = c0 + u * kStep;
    Vec<T, VEC> g;
#pragma unroll
    for (int j = 0; j < VEC; ++j) g.v[j] = grad_at<T>(static_cast<float>(xv[u].v[j]), c + j, k, f);
    if (c + VEC <= n32) {
      store_vec<T, VEC>(xr + c, g);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (c + j < n32) xr[c + j] = g.v[j];
      }
    }
  }
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// Runs cross_entropy_cluster_kernel when this GPU and build have it and the row fits an 8-CTA cluster; returns
// false (having done nothing) otherwise, and the caller takes the generic kernel.
template <typename T, typename L, int VEC>
bool launch_cross_entropy_cluster(T* x, int64_t x_stride, const L* labels, int64_t ignore_index, int64_t rows,
                                  int64_t v, const Transform& f, float smoothing, float z_loss,
                                  const float* grad_scale, int64_t scale_stride, float* loss, float* lse) {
  if constexpr (VEC == 1) {
    return false;  // unaligned rows: the generic kernel
  } else {
    const int device = c10::cuda::current_device();
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    const auto kernel = cross_entropy_cluster_kernel<T, L, VEC>;
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    if (major < 9 || attr.binaryVersion < 90) return false;  // no clusters, or this build's code for it is empty

    const int64_t vecs = ceil_div(v, VEC);
    const int64_t ranks = ceil_div(vecs, int64_t{kClusterThreads} * kVecsPerThread);
    if (ranks > kMaxCluster || rows * ranks > std::numeric_limits<int>::max()) return false;
    const int64_t slice_len = ceil_div(vecs, ranks) * VEC;  // whole vectors, so every slice but the last is aligned

    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(rows * ranks));
    config.blockDim = dim3(kClusterThreads);
    config.dynamicSmemBytes = 0;
    config.stream = current_stream();
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = static_cast<unsigned>(ranks);
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, x, x_stride, labels, ignore_index, v, slice_len, f, smoothing,
                                      z_loss, grad_scale, scale_stride, loss, lse));
    return true;
  }
}

}  // namespace swiftlora::cuda
