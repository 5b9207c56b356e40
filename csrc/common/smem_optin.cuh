// Facts of the current device looked up once per device: the decode kernels that use them (nf4_gemv) run in
// ~10-25 µs, where per-call driver queries would show.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

namespace swiftlora::cuda {

inline int cached_attribute(cudaDeviceAttr attr) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, int> cache;
  const int dev = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(dev, static_cast<int>(attr));
  auto it = cache.find(key);
  if (it == cache.end()) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, dev));
    it = cache.emplace(key, v).first;
  }
  return it->second;
}

// The opt-in shared-memory limit per CTA.
inline int max_optin_smem() { return cached_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin); }

// The compute capability's major version.
inline int device_major() { return cached_attribute(cudaDevAttrComputeCapabilityMajor); }

}  // namespace swiftlora::cuda
