// The device side of the NF4 format, free of ATen (the library's kernels and the standalone bench/micro programs
// include it): the raw pointers a kernel reads, the per-CTA shared-memory tables, and the block-scale decode. Bit
// rules: common/nf4.h; filling Nf4Args from a checked Nf4Weight: common/nf4_cuda.cuh.
#pragma once
#include <cstdint>

#include "common/nf4.h"

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
