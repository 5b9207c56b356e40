// One-pass cross-entropy for Hopper (sm_90+): a row of logits is split across a thread-block cluster of C CTAs,
// each copying its slice into shared memory while it accumulates the slice's (max, Σexp); the CTAs exchange their
// statistics through distributed shared memory, then each writes its slice's gradient from shared memory over the
// logits. HBM sees each logit read once and written once (the floor: 2·N·V·E bytes), where the generic kernel
// re-reads the row for its gradient pass (from L2 when it is still there).
//
// Launch shape: grid.x = rows·C, cluster (C, 1, 1), kClusterThreads threads, slice = ⌈V/C⌉ rounded up to a vector,
// C chosen so a slice fits kSliceBytes and two CTAs share an SM (one loading while the other writes). Rows too long
// for an 8-CTA cluster, unaligned rows, or older GPUs take the generic kernel.
#pragma once
#include <cooperative_groups.h>

#include "softmax_row.cuh"

namespace swiftlora::cuda {

constexpr int kClusterThreads = 512;
constexpr int64_t kSliceBytes = 100 * 1024;  // two CTAs per SM within the 228 KB of shared memory
constexpr int kMaxCluster = 8;               // the portable cluster size

struct SliceStats {
  Online o;
  float label_z;  // the label's z if the label falls in this slice, else 0
};

template <typename T, typename L, int VEC>
__global__ void __launch_bounds__(kClusterThreads, 2)
    cross_entropy_cluster_kernel(T* x, int64_t x_stride, const L* __restrict__ labels, int64_t ignore_index,
                                 int64_t v, int64_t slice_len, Transform f, float smoothing, float z_loss,
                                 const float* __restrict__ grad_scale, int64_t scale_stride,
                                 float* __restrict__ loss, float* __restrict__ lse_out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  extern __shared__ __align__(16) unsigned char slice_smem[];
  __shared__ Online scratch[32];
  __shared__ SliceStats mine;
  T* buf = reinterpret_cast<T*>(slice_smem);
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), ranks = cluster.num_blocks();
  const int64_t row = blockIdx.x / ranks;
  const int64_t begin = rank * slice_len, end = begin + slice_len < v ? begin + slice_len : v;
  const int64_t n = end > begin ? end - begin : 0;
  T* xr = x + row * x_stride + begin;

  // Pass 1: global -> registers -> shared memory, with the slice's statistics on the way.
  Online o = empty_online();
  walk_row<T, VEC>(xr, n, [&](const auto& xv, int64_t c) {
    constexpr int kN = sizeof(xv.v) / sizeof(T);
    store_vec<T, kN>(buf + c, xv);
    float z[kN];
#pragma unroll
    for (int j = 0; j < kN; ++j) z[j] = f.z(static_cast<float>(xv.v[j]));
    push<kN, false>(o, z);
  });
  o = block_merge(o, scratch);  // its barriers also make buf visible to the whole CTA
  const int64_t label = row_label(labels, row, ignore_index, v);
  if (threadIdx.x == 0) {
    mine.o = o;
    mine.label_z = label >= begin && label < end ? f.z(static_cast<float>(buf[label - begin])) : 0.f;
  }
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
  k.label = label >= begin && label < end ? label - begin : -1;  // columns below are slice-relative
  row_grad<T, VEC>(buf, xr, n, k, f);
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
    const int64_t ranks = ceil_div(vecs * VEC * static_cast<int64_t>(sizeof(T)), kSliceBytes);
    if (ranks > kMaxCluster || rows * ranks > std::numeric_limits<int>::max()) return false;
    const int64_t slice_len = ceil_div(vecs, ranks) * VEC;
    const size_t smem = static_cast<size_t>(slice_len) * sizeof(T);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));

    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(rows * ranks));
    config.blockDim = dim3(kClusterThreads);
    config.dynamicSmemBytes = smem;
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
