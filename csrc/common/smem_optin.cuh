// The opt-in shared-memory limit per CTA of the current device, looked up once per device: the decode kernels
// that use it (nf4_gemv, nf4_dequant's table kernel) run in ~10 µs, where per-call driver queries would show.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>

namespace swiftlora::cuda {

inline int max_optin_smem() {
  static std::mutex mu;
  static std::map<int, int> cache;
  const int dev = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it == cache.end()) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    it = cache.emplace(dev, v).first;
  }
  return it->second;
}

}  // namespace swiftlora::cuda
