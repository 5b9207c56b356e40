// Host side of the fused cross-entropy's kernel variants (cross_entropy_split.cuh, cross_entropy_bulk.cuh).
//
// SWIFTLORA_CE_VARIANT (private benchmarking knob, read on every call; unset = kCeDefaultVariant) picks a row of
// kCeVariants: 0 is the original kernel (cross_entropy_fused_kernel: one 1024-thread CTA per SM, two passes, the
// second from L2). Rows with ranks > 1 need sm_90 clusters and fall back to variant 0 elsewhere; unaligned rows
// always take variant 0; a hold variant whose row does not fit its registers, or with a soft-cap, takes the split
// kernel of the same shape; a bulk variant needs V a multiple of the vector width, else it takes the hold kernel.
// bench/ce_sweep.py times them all; bench/NOTES.md has the predictions.
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "cross_entropy_bulk.cuh"

namespace swiftlora::cuda {

enum class CeKernel { kBase, kSplit, kHold, kBulk };

struct CeVariant {
  CeKernel kernel;
  int threads;  // per CTA; 1024 / threads CTAs an SM
  int ranks;    // CTAs per row (the cluster size)
  int hold;     // kHold: 16-byte vectors a thread holds (hold and bulk kernels)
  int stages;   // bulk kernel: slices in shared memory (stages − 1 rows loading ahead)
};

inline constexpr CeVariant kCeVariants[] = {
    {CeKernel::kBase, 1024, 1, 0},   // 0: original
    {CeKernel::kSplit, 1024, 1, 0},  // 1: fast path + label fix-up only
    {CeKernel::kSplit, 512, 1, 0},   // 2: + two CTAs an SM
    {CeKernel::kSplit, 1024, 2, 0},  // 3: row over a 2-CTA cluster
    {CeKernel::kSplit, 512, 2, 0},   // 4: 2-CTA cluster, two CTAs an SM
    {CeKernel::kSplit, 1024, 4, 0},  // 5: 4-CTA cluster
    {CeKernel::kSplit, 512, 4, 0},   // 6: 4-CTA cluster, two CTAs an SM
    {CeKernel::kHold, 1024, 8, 2},   // 7: slice in registers, 8-CTA cluster (V ≤ 131072 for 16-bit logits)
    {CeKernel::kHold, 512, 8, 4},    // 8: slice in registers, 8-CTA cluster, two CTAs an SM
    {CeKernel::kHold, 1024, 4, 4},   // 9: slice in registers, 4-CTA cluster
    {CeKernel::kBulk, 1024, 8, 2, 4},  // 10: bulk copies 3 rows ahead into shared memory, 8-CTA cluster (128 KB)
    {CeKernel::kBulk, 1024, 4, 4, 3},  // 11: bulk copies 2 rows ahead, 4-CTA cluster (192 KB)
    {CeKernel::kBase, 1024, 1, 0},     // 12: the lean one-CTA kernel (cross_entropy_plain.cuh; launched by the caller)
};
inline constexpr int kCeVariantCount = static_cast<int>(sizeof(kCeVariants) / sizeof(kCeVariants[0]));
inline constexpr int kCeDefaultVariant = 0;  // until measured (bench/ce_sweep.py)
inline constexpr int kCePlainVariant = 12;

inline int ce_variant() {
  const char* s = std::getenv("SWIFTLORA_CE_VARIANT");
  if (s == nullptr || *s == '\0') return kCeDefaultVariant;
  char* end = nullptr;
  const long n = std::strtol(s, &end, 10);
  TORCH_CHECK(*end == '\0' && n >= 0 && n < kCeVariantCount, "SWIFTLORA_CE_VARIANT must be an integer in [0, ",
              kCeVariantCount, "), got '", s, "'");
  return static_cast<int>(n);
}

// Everything of cross_entropy_fused_ but the logits and labels.
struct FusedArgs {
  int64_t v;
  Transform f;
  float smoothing, z_loss;
  const float* grad_scale;
  int64_t scale_stride;
  float* loss;
  float* lse;
};

// Persistent groups (CTAs for ranks = 1, clusters otherwise) of `kernel` that fit the current GPU at once; 0 when
// clusters or bulk copies are unavailable (pre-sm_90 GPU, or a build without sm_90 code for the kernel). Cached per
// kernel, device and shared memory size.
template <typename Kernel>
int64_t resident_groups(Kernel kernel, int threads, int ranks, int smem, bool sm90) {
  if (!sm90) return int64_t{sm_count()} * (1024 / threads);
  // Set on every call: the attribute is per kernel, and another V may have changed it since the count was cached.
  auto allow_smem = [&] {
    if (smem > 0) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  };
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int>, int> cache;
  const int device = c10::cuda::current_device();
  const std::tuple<const void*, int, int> key{reinterpret_cast<const void*>(kernel), device, smem};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) {
      if (it->second > 0) allow_smem();
      return it->second;
    }
  }
  int major = 0, clusters = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (major >= 9 && attr.binaryVersion >= 90) {
    allow_smem();
    cudaLaunchConfig_t config{};
    config.dynamicSmemBytes = static_cast<size_t>(smem);
    config.gridDim = dim3(static_cast<unsigned>(ranks));
    config.blockDim = dim3(static_cast<unsigned>(threads));
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = static_cast<unsigned>(ranks);
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config));
  }
  const std::lock_guard<std::mutex> lock(mutex);
  cache[key] = clusters;
  return clusters;
}

// Launches kernel(args...) on a persistent grid of min(rows, resident groups) groups, `smem` bytes of dynamic shared
// memory each; false (nothing launched) when no group fits.
template <typename... KArgs, typename... Args>
bool launch_persistent(void (*kernel)(KArgs...), int threads, int ranks, int smem, int64_t rows, Args... args) {
  const int64_t groups = std::min(rows, resident_groups(kernel, threads, ranks, smem, ranks > 1 || smem > 0));
  if (groups <= 0) return false;
  cudaLaunchConfig_t config{};
  config.dynamicSmemBytes = static_cast<size_t>(smem);
  config.gridDim = dim3(static_cast<unsigned>(groups * ranks));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.stream = current_stream();
  cudaLaunchAttribute cluster{};
  if (ranks > 1) {
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = static_cast<unsigned>(ranks);
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
  return true;
}

// Whether a row of v fits the hold kernel: each rank's slice at most `hold` vectors a thread.
inline bool hold_fits(int64_t v, int vec, const CeVariant& cv) {
  return ceil_div(v / vec, cv.ranks) <= int64_t{cv.hold} * cv.threads;
}

template <int I, typename T, int VEC>
bool launch_ce_variant(T* x, int64_t stride, const RowLabels& labels, int64_t rows, const FusedArgs& a) {
  constexpr CeVariant cv = kCeVariants[I];
  if constexpr (cv.kernel == CeKernel::kBase) {
    return false;
  } else {
    const bool fast = a.f.cap <= 0.f;
    if constexpr (cv.kernel == CeKernel::kBulk) {
      if (fast && hold_fits(a.v, VEC, cv) && a.v % VEC == 0) {
        const int smem = static_cast<int>(ceil_div(a.v / VEC, cv.ranks) * 16 * cv.stages);
        if (launch_persistent(cross_entropy_bulk_kernel<T, VEC, cv.threads, cv.hold, cv.stages>, cv.threads, cv.ranks,
                              smem, rows, x, stride, labels, rows, a.v, a.f.scale, a.smoothing, a.z_loss,
                              a.grad_scale, a.scale_stride, a.loss, a.lse)) {
          return true;
        }
      }
    }
    if constexpr (cv.kernel == CeKernel::kHold || cv.kernel == CeKernel::kBulk) {
      if (fast && hold_fits(a.v, VEC, cv)) {
        return launch_persistent(cross_entropy_hold_kernel<T, VEC, cv.threads, cv.hold>, cv.threads, cv.ranks, 0, rows,
                                 x, stride, labels, rows, a.v, a.f.scale, a.smoothing, a.z_loss, a.grad_scale,
                                 a.scale_stride, a.loss, a.lse);
      }
    }
    auto split = [&](auto kernel) {
      return launch_persistent(kernel, cv.threads, cv.ranks, 0, rows, x, stride, labels, rows, a.v, a.f, a.smoothing,
                               a.z_loss, a.grad_scale, a.scale_stride, a.loss, a.lse);
    };
    return fast ? split(cross_entropy_split_kernel<T, VEC, cv.threads, true>)
                : split(cross_entropy_split_kernel<T, VEC, cv.threads, false>);
  }
}

template <typename T, int VEC, std::size_t... I>
bool launch_ce_variant_of(int variant, T* x, int64_t stride, const RowLabels& labels, int64_t rows,
                          const FusedArgs& a, std::index_sequence<I...>) {
  bool launched = false;
  ((variant == static_cast<int>(I) ? (launched = launch_ce_variant<I, T, VEC>(x, stride, labels, rows, a)) : false),
   ...);
  return launched;
}

// Runs `variant` of the fused cross-entropy on 16-byte aligned rows; false (nothing launched): the caller runs the
// original kernel (variant 0, or a variant this GPU or build cannot run).
template <typename T, int VEC>
bool launch_split_variant(int variant, T* x, int64_t stride, const RowLabels& labels, int64_t rows,
                          const FusedArgs& a) {
  if (rows > std::numeric_limits<int>::max() || a.v > std::numeric_limits<int>::max()) return false;  // 32-bit indices
  return launch_ce_variant_of<T, VEC>(variant, x, stride, labels, rows, a,
                                      std::make_index_sequence<kCeVariantCount>{});
}

}  // namespace swiftlora::cuda
