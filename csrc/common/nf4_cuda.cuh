// CUDA side of the NF4 format shared by the NF4 kernels (dequantize, gemv, and the qlora GEMMs): the raw pointers
// of a checked Nf4Weight, the per-CTA shared-memory tables, and the block-scale decode. Bit rules: common/nf4.h.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common/nf4.h"
#include "ops.h"

namespace swiftlora::nf4 {

// What a kernel reads of one NF4 tensor. Plain: absmax. Nested: qabsmax, absmax2, code2 and offset (a device
// pointer: the offset bitsandbytes computes on the GPU is read there, no host sync).
struct Nf4Args {
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;
  const uint8_t* qabsmax = nullptr;
  const float* absmax2 = nullptr;
  const float* code2 = nullptr;
  const float* offset = nullptr;
  int64_t n = 0;
  int log2_blocksize = 0;
  bool nested = false;
};

inline Nf4Args nf4_args(const Nf4Weight& w) {
  Nf4Args a;
  a.packed = w.packed.const_data_ptr<uint8_t>();
  a.n = w.n;
  a.log2_blocksize = log2_exact(w.blocksize);
  a.nested = w.nested;
  if (w.nested) {
    a.qabsmax = w.absmax.const_data_ptr<uint8_t>();
    a.absmax2 = w.absmax2.const_data_ptr<float>();
    a.code2 = w.code2.const_data_ptr<float>();
    a.offset = w.offset.const_data_ptr<float>();
  } else {
    a.absmax = w.absmax.const_data_ptr<float>();
  }
  return a;
}

// Shared-memory copies a CTA decodes from: the NF4 table, and the dynamic map when nested. Call from every thread
// of the CTA, then __syncthreads() before use.
struct Nf4Tables {
  float code[16];
  float code2[kCode2Size];
};

__device__ __forceinline__ void load_tables(Nf4Tables& t, const Nf4Args& a) {
  if (threadIdx.x == 0) fill_code_table(t.code);
  if (a.nested) {
    for (int i = threadIdx.x; i < kCode2Size; i += blockDim.x) t.code2[i] = a.code2[i];
  }
}

// A block scale in two phases, so a kernel can issue its global loads (they depend only on the block index)
// together with the packed words and decode through the shared tables after they land.
struct ScaleParts {
  float value;  // absmax[b] (plain) or absmax2[b / 256] (nested)
  uint32_t q;   // qabsmax[b] (nested)
};

__device__ __forceinline__ ScaleParts load_scale_parts(const Nf4Args& a, int64_t b) {
  if (!a.nested) return {__ldg(a.absmax + b), 0u};
  return {__ldg(a.absmax2 + (b >> kNestedBlocksizeLog2)), static_cast<uint32_t>(__ldg(a.qabsmax + b))};
}

__device__ __forceinline__ float scale_from_parts(const Nf4Args& a, const Nf4Tables& t, ScaleParts s, float offset) {
  return a.nested ? nested_absmax(t.code2[s.q], s.value, offset) : s.value;
}

// The fp32 scale of NF4 block b (offset: *a.offset, read once per thread by the caller).
__device__ __forceinline__ float block_scale(const Nf4Args& a, const Nf4Tables& t, int64_t b, float offset) {
  return scale_from_parts(a, t, load_scale_parts(a, b), offset);
}

}  // namespace swiftlora::nf4
