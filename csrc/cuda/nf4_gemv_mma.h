// The tensor-core nf4_gemv kernel (nf4_gemv_mma.cu), called by nf4_gemv.cu's dispatcher for decode shapes it
// takes (M <= 4, K % 128 == 0, blocksize 64, aligned data, x fitting in shared memory).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/nf4_cuda.cuh"

namespace swiftlora::cuda {

// Launches y [m, n] = x [m, k] @ dequant(W)ᵀ on `stream` and returns true, or returns false (nothing launched)
// when the shape, alignment or shared-memory size is outside what the kernel takes. T: c10::BFloat16 or c10::Half.
template <typename T>
bool launch_nf4_gemv_mma(const T* x, int m, int64_t k, int64_t n, const nf4::Nf4Args& a, T* y, int max_smem,
                         cudaStream_t stream);

}  // namespace swiftlora::cuda
