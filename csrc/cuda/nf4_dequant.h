// The one NF4 dequantization kernel (csrc/cuda/nf4_dequant.cu): nf4_dequantize writes a whole tensor with it, the
// qlora ops a row or column chunk of a weight into a strided slice of a scratch panel.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/nf4_device.cuh"

namespace swiftlora::cuda {

// A rectangle of the flattened NF4 tensor: element (r, c), r < rows, c < cols, is element first + r·src_ld + c,
// written to out[r·ld + c] (out in T's elements). A whole tensor of n elements: {0, 1, n, n, n}.
struct Nf4Rect {
  int64_t first = 0, rows = 0, cols = 0, src_ld = 0, ld = 0;
};

// Launches on `stream`. T: float, c10::Half or c10::BFloat16 (explicitly instantiated in nf4_dequant.cu). Bits as
// bitsandbytes' dequantize_4bit (common/nf4.h).
template <typename T>
void launch_nf4_dequant(const nf4::Nf4Args& a, const Nf4Rect& rect, T* out, cudaStream_t stream);

}  // namespace swiftlora::cuda
