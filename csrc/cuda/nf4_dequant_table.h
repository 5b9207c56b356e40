// The flat, table-lookup NF4 dequantization kernel (nf4_dequant_table.cu), one of nf4_dequant.cu's variants.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/nf4_cuda.cuh"

namespace swiftlora::cuda {

// Dequantizes elements [first, first + count) of the flattened tensor into out[0, count) on `stream` and returns
// true, or returns false (nothing launched) when the range or alignment is outside what the kernel takes.
// streaming: evict-first stores (for a standalone nf4_dequantize, whose output is not re-read soon).
template <typename T>
bool launch_nf4_dequant_table(const nf4::Nf4Args& a, int64_t first, int64_t count, T* out, bool streaming,
                              int max_smem, cudaStream_t stream);

}  // namespace swiftlora::cuda
