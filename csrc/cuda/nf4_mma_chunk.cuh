// The tensor-core math of the NF4 decode kernels (nf4_gemv_mma.cu, nf4_gemv_stream.cu): a packed byte becomes a
// bf16x2 / fp16x2 A register through a 256-entry pair table replicated per lane in shared memory, and one
// 128-code chunk of a 16-row tile is 8 mma.sync m16n8k16 (fp32 accumulation).
//
// Chunk layout (both kernels). Lane (g, t) holds 16 bytes (32 codes, k = 32t .. 32t + 31 of the chunk) of tile rows
// g and g + 8; in MMA u it supplies codes 4u .. 4u + 3 of its 32 (A and B permuted the same way: the sum does not
// care). The chunk spans two 64-code NF4 blocks (t = 0, 1: block A; t = 2, 3: block B), so B's 8 columns are
// "x row j, block h" (column 2j + h): lane (g, t) puts x row g / 2 in B only where t / 2 == g % 2, zero elsewhere.
// Then D[row][2j + h] is row's unscaled partial over block h for x row j, and lane (g, t) holds D[g][2t],
// D[g][2t + 1], D[g + 8][2t], D[g + 8][2t + 1]: y[t][g] and y[t][g + 8] after the four block scales.
//
// Table: 64 KiB at a 64 KiB-aligned shared address; row e (256 bytes) holds at [4l, 4l + 4) the T pair of byte e
// for lane l (element 2j, the high nibble, in the low half) and at [128 + 4l, ...) code2[e] as fp32 (nested
// scales decode through the same conflict-free lookup). The address of a lookup is ONE byte_perm of the packed word
// and the lane's constant (table + 4l): byte e lands in bits 8..15.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace swiftlora::cuda::nf4mma {

constexpr int kChunkCodes = 128;
constexpr uint32_t kTableBytes = 256 * 256;

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {  // lo -> bits 0..15
  uint16_t l, h;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    l = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  } else {
    l = __half_as_ushort(__float2half_rn(lo));
    h = __half_as_ushort(__float2half_rn(hi));
  }
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 MMAs need sm_80; the hosts launch these kernels only there
#else
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#endif
}

// Shared-memory loads by 32-bit shared address (volatile: they stay after the barrier that publishes the data).
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

// Table row (byte j of `word`) at this lane's column: byte 1 from the word, bytes 0, 2, 3 from lane_base
// (table + 4·lane, + 128 for the code2 half).
__device__ __forceinline__ uint32_t lookup(uint32_t word, uint32_t lane_base, int j) {
  return lds32(__byte_perm(word, lane_base, 0x7604u | (static_cast<uint32_t>(j) << 4)));
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Keeps a value in a register: the compiler may not recompute it from its inputs inside the hot loop (it does,
// to save registers, at several instructions per use).
__device__ __forceinline__ uint32_t pinned(uint32_t v) {
  asm volatile("" : "+r"(v));
  return v;
}

// Fills the pair table at `tab` (generic pointer to the 64 KiB-aligned shared table) from the 16 NF4 values and,
// when nested, the 256 code2 values, both already in shared memory; threads tid of nthreads share the work.
template <typename T, bool Nested>
__device__ __forceinline__ void fill_pair_table(unsigned char* tab, const float* code, const float* code2, int tid,
                                                int nthreads) {
  for (int i = tid; i < 256 * 16; i += nthreads) {  // row e = i / 16, 16-byte piece i % 16
    const int e = i >> 4, piece = i & 15;
    uint32_t v;
    if (piece < 8) {
      v = pack_pair<T>(code[e >> 4], code[e & 15]);  // element 2j (high nibble) in the low half
    } else {
      v = Nested ? __float_as_uint(code2[e]) : 0u;
    }
    *reinterpret_cast<uint4*>(tab + e * 256 + piece * 16) = make_uint4(v, v, v, v);
  }
}

// The 8 MMAs of one chunk: w0 / w1 the lane's 16 bytes of rows g / g + 8, xb its 32 x values (zero in lanes that
// feed no x). MMAs 0, 2, 4, 6 accumulate into d0 and 1, 3, 5, 7 into d1 (two dependent chains of 4 instead of one
// of 8 when they are different arrays; the same array is one chain). d0 + d1 gets D[g][2t], D[g][2t + 1],
// D[g + 8][2t], D[g + 8][2t + 1] added.
template <typename T>
__device__ __forceinline__ void chunk_mma(float (&d0)[4], float (&d1)[4], const uint4& w0, const uint4& w1,
                                          const uint4 (&xb)[4], uint32_t lane_base) {
#pragma unroll
  for (int u = 0; u < 8; ++u) {  // codes 4u..4u+3 of the lane's 32: bytes 2u (k low) and 2u + 1 (k high)
    const uint32_t a = word_of(w0, u >> 1), b = word_of(w1, u >> 1);
    const int j = (u & 1) * 2;
    mma16816<T>(u & 1 ? d1 : d0, lookup(a, lane_base, j), lookup(b, lane_base, j), lookup(a, lane_base, j + 1),
                lookup(b, lane_base, j + 1), word_of(xb[u >> 1], j), word_of(xb[u >> 1], j + 1));
  }
}

}  // namespace swiftlora::cuda::nf4mma
