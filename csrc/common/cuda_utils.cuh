// Device helpers shared by the CUDA kernels: 16-byte vector load/store, warp and row reductions, launch helpers.
#pragma once
// Light c10 headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a build machine's
// toolkit may lack (build-notes).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace swiftlora::cuda {

// N elements of T moved as one aligned access (16 bytes for 8 bf16/fp16 or 4 fp32).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Streamed once: evict-first, so L1/L2 keep what is reused (weights, tables). Measured per kernel, not a rule:
// on the H100 it helps rms_norm's forward but costs swiglu's backward 3% (bench/NOTES.md).
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec_stream(const T* p) {
  Vec<T, N> out;
  static_assert(sizeof(Vec<T, N>) == 16 || sizeof(Vec<T, N>) <= 8, "16-byte or small vectors only");
  if constexpr (sizeof(Vec<T, N>) == 16) {
    const int4 raw = __ldcs(reinterpret_cast<const int4*>(p));
    out = *reinterpret_cast<const Vec<T, N>*>(&raw);
  } else {
    out = load_vec<T, N>(p);
  }
  return out;
}

// Written once and not read again soon: evict-first, so the store does not push out lines still to be re-read.
template <typename T, int N>
__device__ __forceinline__ void store_vec_stream(T* p, const Vec<T, N>& v) {
  if constexpr (sizeof(Vec<T, N>) == 16) {
    __stcs(reinterpret_cast<int4*>(p), *reinterpret_cast<const int4*>(&v));
  } else {
    store_vec<T, N>(p, v);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the threadIdx.x dimension of a block shaped [rows = blockDim.y][threads = blockDim.x], every thread of
// the row getting the result. `scratch` holds blockDim.y * 32 floats. Contains __syncthreads: all threads call it.
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (blockDim.x <= 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  float* row = scratch + threadIdx.y * 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) row[warp] = v;
  __syncthreads();
  v = lane < nwarps ? row[lane] : 0.f;
  return warp_sum(v);
}

inline bool aligned_to(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

inline int sm_count() {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return n;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace swiftlora::cuda
