// The TMA-streamed nf4_gemv kernel (nf4_gemv_stream.cu), called by nf4_gemv.cu's dispatcher for decode shapes
// it takes (sm_90+, M <= 4, K % 128 == 0, blocksize 64, aligned data, everything fitting in shared memory).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/nf4_cuda.cuh"

namespace swiftlora::cuda {

// Ring shapes selectable through SWIFTLORA_NF4_GEMV_VARIANT (bench/nf4_gemv_sweep.py): kW16D4 "stream", the default
// (16 compute warps, stages of 16 rows x 1 KB, 4 stages: the fastest on the H100), kW8D6 "stream-w8" (8 compute
// warps, stages of 16 rows x 512 B, 6 stages), kW8D4 "stream-d4", kW8D8 "stream-d8".
enum class Nf4StreamVariant { kW8D6, kW8D4, kW8D8, kW16D4 };

// Launches y [m, n] = x [m, k] @ dequant(W)ᵀ on `stream` and returns true, or returns false (nothing launched)
// when the device, shape, alignment or shared-memory size is outside what the kernel takes.
// T: c10::BFloat16 or c10::Half.
template <typename T>
bool launch_nf4_gemv_stream(const T* x, int m, int64_t k, int64_t n, const nf4::Nf4Args& a, T* y, int max_smem,
                            cudaStream_t stream, Nf4StreamVariant variant);

}  // namespace swiftlora::cuda
