// qlora_gemm on sm_90a, version 3: a warp-specialized, persistent wgmma GEMM with the NF4 dequantization in
// registers. y [M, N] = x [M, K] · dequant(W [N, K])ᵀ + xa [M, R] · lbᵀ [R, N] (+ bias), computed as its
// transpose tile by tile, yᵀ = W · xᵀ, so W is wgmma's A operand and comes from REGISTERS: a consumer thread turns
// the packed codes of its fragment straight into bf16/fp16 pairs (no dequantized tile is written anywhere, not even
// to shared memory), while x is the B operand, read by the tensor cores from a 128-byte-swizzled shared tile.
//
// CTA: 3 warpgroups. WG0 produces into a ring of stages (full / empty mbarriers): the x tile (tokens × 64 k), the
// packed W tile (feature rows × 32 bytes) and the tile's block scales (pre-decoded once per call into [K/64, N'] by
// decode_scales_kernel); one thread issues the three pieces as TMA copies (produce_tma). (A cp.async producer
// warpgroup, the ws* variants, took ~30% of the kernel's instructions and was removed.)
// WG1 and WG2 consume. Tile geometry (Geo): 256 features × 128 tokens (each consumer two m64 blocks × n128), or,
// for more than 128 rows of x (the default there), 128 × 256 (one m64 block × n256: half the dequantization per
// MAC); 128 fp32 accumulators a thread either way. Per k16 step a thread looks up the packed bytes of its fragment
// rows (g, g + 8 of each m block) in a byte → (code_hi, code_lo) table replicated per lane (one byte_perm makes
// the address: the table is 64 KB-aligned), applies the row's block scale (fp32, bitsandbytes' rounding; or one
// HMUL2 in 16 bits, the *16 variants) and issues wgmma with A from those registers, two k16 steps per commit group.
// A fragments rotate through 4 register buffers (one per k16 step of a k-tile); wgmma.wait_group keeps the previous
// group in flight while the next is dequantized; a stage is released (its "empty" mbarrier) once the last group
// reading it has completed.
// LoRA: one extra k-tile first in each output tile: B = the xa tile (zero-filled past R), A = rows of s·B loaded
// from global memory straight into the fragment registers during the previous tile's epilogue, ceil(R / 16) k16
// steps; for R <= 32 they stay in flight under the first weight steps (fragment slots 2 and 3). The tile's first
// MMA runs with scale_d = 0, so no instruction zeroes accumulators.
// Persistent grid (one CTA per SM) over tiles in feature-fastest order (a wave covers all of W and ~2 token
// tiles: W's 33 MB of codes and scales stay in L2); the producer runs ahead into the next tile during the epilogue.
// Epilogue: fp32 + bias, one rounding, stmatrix .trans into a per-warp staging buffer, 16-byte evict-first stores.
// Measured (H100, x [4096, 4096], W [14336, 4096], r = 16, cuBLAS on the bf16 weight 0.624 ms in the same run):
// tma16w 0.698 ms (1.12x), tma16 0.795 ms; bench/NOTES.md ("The wide tile, measured").
#include <cuda.h>  // CUtensorMap (the encoder comes from the runtime's driver entry point: no libcuda link)
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/nf4_cuda.cuh"
#include "common/smem_optin.cuh"
#include "cuda/qlora_gemm_sm90.h"
#include "cuda/tensor_map.h"
#include "cuda/tma_bulk.cuh"
#include "cuda/wgmma_sm90.cuh"

namespace swiftlora::cuda::sm90 {
namespace {

constexpr int kBK = 64;  // k per tile
constexpr int kThreads = 384;
// byte -> (code_hi, code_lo) float2 table, one copy per lane: entry e of lane l at table + 256·e + 8·l. The table
// sits at a 64 KB-aligned shared address, so ONE byte_perm of the packed word and the lane's base makes the whole
// lookup address (byte 1 = e).
constexpr int kTableBytes = 256 * 256;
constexpr int kScalePitch = 256;  // decoded scales: rows padded to a multiple of every tile's features

// Tile geometry. Standard: 256 features × 128 tokens, each consumer warpgroup two m64 blocks × n128. Wide (variants
// tmaw / tma16w): 128 features × 256 tokens, each consumer one m64 block × n256, so every dequantized pair feeds
// twice the tokens and the consumers' dequantization per MAC halves; its x box doubles, so 3 stages, and the
// epilogue goes through 64-token slices, which keeps the whole layout inside the 227 KB.
template <bool kWide>
struct Geo {
  static constexpr int kMB = kWide ? 1 : 2;               // m64 blocks per consumer
  static constexpr int kBF = 128 * kMB, kBT = 256 / kMB;  // features (W rows), tokens (x rows, wgmma N)
  static constexpr int kAcc = kBT / 2;                    // fp32 accumulators per m block and thread
  static constexpr int kStages = kWide ? 3 : 4;
  static constexpr int kXBytes = kBT * kBK * 2;  // token rows of 128 bytes, 128B-swizzled
  static constexpr int kWBytes = kBF * kBK / 2;  // feature rows of 32 packed bytes (two 16-byte halves, swizzled)
  static constexpr int kSBytes = kBF * 4;        // the rows' block scales
  static constexpr int kStageBytes = (kXBytes + kWBytes + kSBytes + 1023) / 1024 * 1024;  // swizzle atoms
  static constexpr int kEpiTokens = kWide ? 64 : 128;  // tokens per epilogue slice
  static constexpr int kEpiBytes = 8 * kEpiTokens * 16 * 2;  // 8 consumer warps: [slice tokens][16 features]
  static constexpr int kTailBytes = 2 * kStages * 8 + 16 * 4;  // mbarriers, the 16 NF4 codes
  // Worst case of the layout (kernel prologue): a 64 KB table at the next 64 KB boundary, everything after it.
  static constexpr int kSmemBytes = 65536 + kTableBytes + kStages * kStageBytes + kEpiBytes + kTailBytes;
  static_assert(kStageBytes % 1024 == 0 && kXBytes % 1024 == 0, "stages keep the 1024-byte swizzle alignment");
  static_assert(kMB * kAcc == 128, "128 fp32 accumulators a consumer thread, whichever the geometry");
};

struct Params {
  CUtensorMap tx, tw, txa;  // x [M, K], packed W [N, K/2] bytes, xa [M, R] (R > 0)
  const uint16_t* x;
  int64_t ldx;
  const uint8_t* packed;
  const float* scales;  // [K / 64, pitch] decoded block scales, zero past N
  int64_t pitch;
  const uint16_t* xa;  // [M, R] (R = 0: none)
  int64_t ldxa;
  const uint16_t* lb;  // [N, R], already scaled
  int64_t ldlb;
  const uint16_t* bias;  // [N] or null
  uint16_t* y;
  int64_t ldy;
  int64_t m, n, k;
  int r;
  int tiles_f, tiles;  // feature tiles, all tiles
  int smem;            // dynamic shared memory bytes (the layout is checked against it)
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

using wgmma::desc_sw128;
using wgmma::pin;
using wgmma::smem_u32;
using wgmma::tma_load_2d;
using wgmma::wgmma_commit;
using wgmma::wgmma_fence;
using wgmma::wgmma_wait;

// Where everything lives in the CTA's shared window (computed once from the dynamic base): the stages below the
// 64 KB-aligned table while they fit, the epilogue buffers and barriers in what is left below it if they fit
// (the wide geometry needs that to stay inside 227 KB), the rest above the table.
template <bool kWide>
struct Layout {
  using G = Geo<kWide>;
  uint32_t lo, hi, table, epi, bars, codes, end;  // stages [0, nlo) at lo, the rest at hi
  int nlo;
  __device__ __forceinline__ uint32_t stage(int s) const {
    return s < nlo ? lo + s * G::kStageBytes : hi + (s - nlo) * G::kStageBytes;
  }
  __device__ __forceinline__ uint32_t full(int s) const { return bars + s * 8; }
  __device__ __forceinline__ uint32_t empty(int s) const { return bars + (G::kStages + s) * 8; }
};

template <bool kWide>
__device__ __forceinline__ Layout<kWide> make_layout(uint32_t raw) {
  using G = Geo<kWide>;
  Layout<kWide> l;
  l.lo = (raw + 1023) & ~1023u;
  l.table = (raw + 0xFFFF) & ~0xFFFFu;
  l.nlo = min(static_cast<int>((l.table - l.lo) / G::kStageBytes), G::kStages);
  l.hi = l.table + kTableBytes;
  const uint32_t below = l.lo + l.nlo * G::kStageBytes, above = l.hi + (G::kStages - l.nlo) * G::kStageBytes;
  l.epi = below + G::kEpiBytes + G::kTailBytes <= l.table ? below : above;
  l.bars = l.epi + G::kEpiBytes;
  l.codes = l.bars + 2 * G::kStages * 8;
  l.end = max(l.codes + 16 * 4, above);
  return l;
}

// D[64 × 128] (+)= A[64 × 16] (registers) · B[16 × 128] (shared, descriptor), fp32 accumulators; scale_d = 0
// ignores D's old contents (a tile's first MMA: no zeroing instructions on registers an in-flight wgmma owns).
#define SWIFTLORA_WGMMA_RS_M64N128K16(TY)                                                                \
  asm volatile("{\n"                                                                                     \
               ".reg .pred p;\n"                                                                         \
               "setp.ne.b32 p, %69, 0;\n"                                                                \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " SWIFTLORA_WGMMA_ACC64_REGS     \
               ", {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n"                                               \
               "}\n"                                                                                     \
               : SWIFTLORA_WGMMA_ACC64_OPS(d)                                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d))

template <bool kBf16>
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, uint32_t scale_d) {
  if constexpr (kBf16) {
    SWIFTLORA_WGMMA_RS_M64N128K16("bf16");
  } else {
    SWIFTLORA_WGMMA_RS_M64N128K16("f16");
  }
}
#undef SWIFTLORA_WGMMA_RS_M64N128K16

// D[64 × 256] (+)= A[64 × 16] (registers) · B[16 × 256] (shared, descriptor), fp32 accumulators (the wide tile).
#define SWIFTLORA_WGMMA_RS_M64N256K16(TY)                                                                \
  asm volatile("{\n"                                                                                     \
               ".reg .pred p;\n"                                                                         \
               "setp.ne.b32 p, %133, 0;\n"                                                               \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " " SWIFTLORA_WGMMA_ACC128_REGS    \
               ", {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"                                          \
               "}\n"                                                                                     \
               : SWIFTLORA_WGMMA_ACC128_OPS(d)                                                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d))

template <bool kBf16>
__device__ __forceinline__ void wgmma_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t desc, uint32_t scale_d) {
  if constexpr (kBf16) {
    SWIFTLORA_WGMMA_RS_M64N256K16("bf16");
  } else {
    SWIFTLORA_WGMMA_RS_M64N256K16("f16");
  }
}
#undef SWIFTLORA_WGMMA_RS_M64N256K16

template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {  // lo -> bits 0..15, round to nearest even
  if constexpr (kBf16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

template <bool kBf16>
__device__ __forceinline__ float to_float(uint16_t b) {
  if constexpr (kBf16) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  } else {
    return __half2float(__ushort_as_half(b));
  }
}

template <bool kBf16>
__device__ __forceinline__ uint16_t to_bits(float v) {
  if constexpr (kBf16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

// Fragment pair of one packed byte: byte j of `word` (codes k = 2b, 2b + 1) -> (code_hi·s, code_lo·s) rounded to
// 16 bits. lane_table = table + 8·lane (64 KB-aligned table): byte_perm puts the byte in bits 8..15.
template <bool kBf16>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, int j, uint32_t lane_table, float scale) {
  const uint32_t addr = __byte_perm(word, lane_table, 0x7604u | (static_cast<uint32_t>(j) << 4));
  float2 c;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(c.x), "=f"(c.y) : "r"(addr));
  return pack2<kBf16>(nf4::dequant_value(c.x, scale), nf4::dequant_value(c.y, scale));
}

// The same with the scale applied in 16 bits (variant "ws16"): the table holds the code pair already rounded to T
// (entry e of lane l at table + 256·e + 4·l), one HMUL2 by the scale pair: 3 instructions a pair instead of 5, at
// the price of two more roundings (the code's and the scale's) than bitsandbytes' fp32 product.
template <bool kBf16>
__device__ __forceinline__ uint32_t dequant_pair16(uint32_t word, int j, uint32_t lane_table, uint32_t scale2) {
  const uint32_t addr = __byte_perm(word, lane_table, 0x7604u | (static_cast<uint32_t>(j) << 4));
  uint32_t c;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(c) : "r"(addr));
  uint32_t r;
  if constexpr (kBf16) {
    const __nv_bfloat162 v = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&c),
                                     *reinterpret_cast<const __nv_bfloat162*>(&scale2));
    r = *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __hmul2(*reinterpret_cast<const __half2*>(&c), *reinterpret_cast<const __half2*>(&scale2));
    r = *reinterpret_cast<const uint32_t*>(&v);
  }
  return r;
}

// ------------------------------------------------------------------------------------------------- producer
// One thread: per stage one arrive.expect_tx and three copies (the x box and the W box, which TMA swizzles into
// exactly the layouts the consumers read: 128B for x, 32B for W's two 16-byte halves, and the scales' row); the
// LoRA k-tile is the xa box, zero past R. (A cp.async producer warpgroup spent ~180 instructions per k-tile in each
// of its four warps, on the consumers' schedulers: 5% slower, removed; bench/NOTES.md.)
template <bool kWide>
__device__ __forceinline__ void produce_tma(const Params& p, const Layout<kWide>& l, int kt_total, bool lora) {
  using G = Geo<kWide>;
  int it = 0;
  for (int tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const int f0 = (tile % p.tiles_f) * G::kBF, t0 = (tile / p.tiles_f) * G::kBT;
    for (int kt = 0; kt < kt_total; ++kt, ++it) {
      const int stage = it % G::kStages, round = it / G::kStages;
      if (round > 0) tma::mbar_wait(l.empty(stage), (round - 1) & 1);
      const uint32_t base = l.stage(stage), full = l.full(stage);
      if (lora && kt == 0) {
        tma::mbar_arrive_expect_tx(full, G::kXBytes);
        tma_load_2d(base, &p.txa, 0, t0, full);
      } else {
        const int k = kt - (lora ? 1 : 0);
        tma::mbar_arrive_expect_tx(full, G::kXBytes + G::kWBytes + G::kSBytes);
        tma_load_2d(base, &p.tx, k * kBK, t0, full);
        tma_load_2d(base + G::kXBytes, &p.tw, k * (kBK / 2), f0, full);
        tma::bulk_copy(base + G::kXBytes + G::kWBytes, p.scales + static_cast<int64_t>(k) * p.pitch + f0, G::kSBytes,
                       full);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------- consumers
// A consumer thread (warpgroup cw, warp wi, lane = 4g + tq) holds fragment rows fbase + 64·mb + 16·wi + g + 8h of
// the tile's features (fbase = cw · kBF / 2; m block mb, half h) and accumulates
// acc[mb][4j + 2h + c] = yᵀ[row][token 8j + 2tq + c].
struct Frag {
  int cw, wi, lane, g, tq, fbase;
  __device__ __forceinline__ int row(int mb, int h) const { return fbase + 64 * mb + 16 * wi + g + 8 * h; }
};

// The packed words of k16 step s for the thread's rows: (word 2s, word 2s + 1) of each row's 32 bytes.
template <int MB>
__device__ __forceinline__ void load_step_words(const uint8_t* wtile, const Frag& fr, int s, uint2 (&w)[MB][2]) {
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = fr.row(mb, h);
      w[mb][h] = *reinterpret_cast<const uint2*>(wtile + row * 32 + (((s >> 1) ^ ((row >> 2) & 1)) << 4) + (s & 1) * 8);
    }
  }
}

// The LoRA k-tile's A fragments (rows of s·B, tiny and L2-resident) of the tile at feature f0, k16 steps
// 0 .. kSteps - 1 into fragment slots kFirst + s (zeros past R or N). Loaded one tile ahead, during the previous
// tile's epilogue, so their latency is hidden.
template <int kFirst, int kSteps, int MB>
__device__ __forceinline__ void load_lora(const Params& p, const Frag& fr, int64_t f0, int lora_steps,
                                          uint32_t (&a)[4][MB][4]) {
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // q: (h = q & 1, k half = q >> 1)
        const int64_t f = f0 + fr.row(mb, q & 1);
        const int kc = 16 * s + 2 * fr.tq + 8 * (q >> 1);
        a[kFirst + s][mb][q] = (s < lora_steps && f < p.n && kc < p.r)
                                   ? __ldg(reinterpret_cast<const uint32_t*>(p.lb + f * p.ldlb + kc))
                                   : 0u;
      }
    }
  }
}

// wgmma.mma_async m64nNk16 of every m block for one k16 step (A fragments a, B at desc), committed as one group.
template <bool kBf16, int MB, int N>
__device__ __forceinline__ void mma_step(float (&acc)[MB][N], uint32_t (&a)[MB][4], uint64_t desc, uint32_t scale_d) {
  wgmma_fence();
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) wgmma_rs<kBf16>(acc[mb], a[mb], desc, scale_d);
  wgmma_commit();
}

// acc (+ bias) -> y through this warp's [slice tokens][16 features] staging buffer, one m block and token slice at
// a time: stmatrix .trans turns the fragments into token rows (the two 16-byte halves swizzled by token bit 2), then
// each lane stores 16-byte pieces of token rows (2-byte stores where a piece leaves the row's bounds or alignment).
template <bool kBf16, bool kWide>
__device__ __forceinline__ void store_tile(const Params& p, const Frag& fr,
                                           float (&acc)[Geo<kWide>::kMB][Geo<kWide>::kAcc], uint32_t buf,
                                           uint8_t* buf_ptr, int64_t f0, int64_t t0) {
  using G = Geo<kWide>;
  constexpr int kSlices = G::kBT / G::kEpiTokens, kBlocks = G::kEpiTokens / 8;  // 8-token blocks per slice
  const bool vec = (reinterpret_cast<uintptr_t>(p.y) & 15) == 0 && p.ldy % 8 == 0;
#pragma unroll
  for (int mb = 0; mb < G::kMB; ++mb) {
    float bias[2] = {0.f, 0.f};
    if (p.bias) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t f = f0 + fr.row(mb, h);
        bias[h] = f < p.n ? to_float<kBf16>(p.bias[f]) : 0.f;
      }
    }
    // matrix i of an x4 store = (token block j + i / 2, half i % 2); lane L addresses row L % 8 of matrix L / 8
    const int li = fr.lane >> 3, lr = fr.lane & 7;
#pragma unroll
    for (int q = 0; q < kSlices; ++q) {
#pragma unroll
      for (int j = 0; j < kBlocks; j += 2) {
        uint32_t r[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int jj = q * kBlocks + j + (i >> 1), h = i & 1;
          r[i] = pack2<kBf16>(acc[mb][4 * jj + 2 * h] + bias[h], acc[mb][4 * jj + 2 * h + 1] + bias[h]);
        }
        const int t = 8 * (j + (li >> 1)) + lr, hh = li & 1;
        const uint32_t addr = buf + t * 32 + ((hh ^ ((t >> 2) & 1)) << 4);
        asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
                     "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
                     : "memory");
      }
      __syncwarp();
      const int64_t fb = f0 + fr.fbase + 64 * mb + 16 * fr.wi;  // this warp's 16 features
#pragma unroll
      for (int i = 0; i < G::kEpiTokens / 16; ++i) {
        const int piece = fr.lane + 32 * i, t = piece >> 1, hh = piece & 1;
        const int64_t token = t0 + q * G::kEpiTokens + t, f = fb + 8 * hh;
        if (token < p.m && f < p.n) {
          const uint4 v = *reinterpret_cast<const uint4*>(buf_ptr + t * 32 + ((hh ^ ((t >> 2) & 1)) << 4));
          uint16_t* dst = p.y + token * p.ldy + f;
          if (vec && f + 8 <= p.n) {
            __stcs(reinterpret_cast<uint4*>(dst), v);
          } else {
            const uint16_t* e = reinterpret_cast<const uint16_t*>(&v);
            for (int c = 0; c < 8 && f + c < p.n; ++c) dst[c] = e[c];
          }
        }
      }
      __syncwarp();
    }
  }
}

template <bool kBf16, bool kScale16, bool kWide>
__device__ __forceinline__ void consume(const Params& p, uint8_t* smem, const Layout<kWide>& l, uint32_t raw,
                                        int ktiles, bool lora) {
  using G = Geo<kWide>;
  constexpr int MB = G::kMB;
  Frag fr;
  fr.cw = (threadIdx.x >> 7) - 1;
  fr.wi = (threadIdx.x >> 5) & 3;
  fr.lane = threadIdx.x & 31;
  fr.g = fr.lane >> 2;
  fr.tq = fr.lane & 3;
  fr.fbase = fr.cw * (G::kBF / 2);
  const uint32_t lane_table = l.table + fr.lane * (kScale16 ? 4 : 8);
  const int lora_steps = (p.r + 15) / 16;
  const int warp = 4 * fr.cw + fr.wi;
  const uint32_t epi = l.epi + warp * (G::kEpiBytes / 8);
  uint8_t* epi_ptr = smem + (epi - raw);
  float acc[MB][G::kAcc];  // set by each tile's first MMA (scale_d = 0)
  uint32_t a[4][MB][4] = {};  // [k16 step][m block][fragment register]
  const bool lora_early = lora_steps <= 2;
  if (lora && static_cast<int>(blockIdx.x) < p.tiles) {
    const int64_t f0 = static_cast<int64_t>(blockIdx.x % p.tiles_f) * G::kBF;
    lora_early ? load_lora<2, 2>(p, fr, f0, lora_steps, a) : load_lora<0, 4>(p, fr, f0, lora_steps, a);
  }
  int it = 0;
  for (int tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const int64_t f0 = static_cast<int64_t>(tile % p.tiles_f) * G::kBF;
    const int64_t t0 = static_cast<int64_t>(tile / p.tiles_f) * G::kBT;
    // No zeroing of acc: the tile's first MMA runs with scale_d = 0.
    // The LoRA k-tile first (B = the xa tile; A = s·B's rows, loaded ahead). With R <= 32 its fragments sit in
    // slots 2 and 3, which the weight steps first rewrite after their first group's wait: the LoRA MMAs stay in
    // flight under the first dequantization, and their stage is released with that wait. Larger R: slots 0-3 and
    // a full wait before the weight steps.
    int prev = -1;
    if (lora) {
      const int stage = it % G::kStages;
      tma::mbar_wait(l.full(stage), (it / G::kStages) & 1);
      if (lora_early) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          if (s < lora_steps) mma_step<kBf16>(acc, a[2 + s], desc_sw128(l.stage(stage) + s * 32), s > 0);
        }
        prev = stage;
      } else {
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          if (s < lora_steps) mma_step<kBf16>(acc, a[s], desc_sw128(l.stage(stage) + s * 32), s > 0);
        }
        wgmma_wait<0>();  // every fragment buffer is free for the weight steps
#pragma unroll
        for (int s = 0; s < 4; ++s) pin(a[s]);
        tma::mbar_arrive(l.empty(stage));
      }
      ++it;
    }
    for (int kt = 0; kt < ktiles; ++kt, ++it) {
      const int stage = it % G::kStages;
      tma::mbar_wait(l.full(stage), (it / G::kStages) & 1);
      const uint32_t base = l.stage(stage);
      const uint8_t* wtile = smem + (base - raw) + G::kXBytes;
      const float* stile = reinterpret_cast<const float*>(wtile + G::kWBytes);
      float sc[MB][2];
      uint32_t sc2[MB][2];  // kScale16: the scale rounded to T, twice
      uint2 w[2][MB][2];  // [step parity][m block][half]: the next step's words are loaded one step ahead
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          sc[mb][h] = stile[fr.row(mb, h)];
          if constexpr (kScale16) sc2[mb][h] = pack2<kBf16>(sc[mb][h], sc[mb][h]);
        }
      }
      load_step_words(wtile, fr, 0, w[0]);
#pragma unroll
      for (int s0 = 0; s0 < 4; s0 += 2) {  // two k16 steps per commit group
#pragma unroll
        for (int s = s0; s < s0 + 2; ++s) {
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              if constexpr (kScale16) {
                a[s][mb][h] = dequant_pair16<kBf16>(w[s & 1][mb][h].x, fr.tq, lane_table, sc2[mb][h]);
                a[s][mb][2 + h] = dequant_pair16<kBf16>(w[s & 1][mb][h].y, fr.tq, lane_table, sc2[mb][h]);
              } else {
                a[s][mb][h] = dequant_pair<kBf16>(w[s & 1][mb][h].x, fr.tq, lane_table, sc[mb][h]);      // k 16s+2tq
                a[s][mb][2 + h] = dequant_pair<kBf16>(w[s & 1][mb][h].y, fr.tq, lane_table, sc[mb][h]);  // +8
              }
            }
          }
          if (s < 3) load_step_words(wtile, fr, s + 1, w[(s + 1) & 1]);
        }
        wgmma_fence();
#pragma unroll
        for (int s = s0; s < s0 + 2; ++s) {
          const uint64_t desc = desc_sw128(base + s * 32);
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) wgmma_rs<kBf16>(acc[mb], a[s][mb], desc, lora || kt > 0 || s > 0);
        }
        wgmma_commit();
        // keep one group (two steps) in flight: the group before it has completed, its fragment buffers may be
        // rewritten, and once it held the previous k-tile's last steps (or the LoRA k-tile), that stage is free
        wgmma_wait<1>();
#pragma unroll
        for (int s = s0; s < s0 + 2; ++s) pin(a[(s + 2) & 3]);
        if (s0 == 0 && prev >= 0) tma::mbar_arrive(l.empty(prev));
      }
      prev = stage;
    }
    wgmma_wait<0>();
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) pin(acc[mb]);
#pragma unroll
    for (int s = 0; s < 4; ++s) pin(a[s]);
    if (prev >= 0) tma::mbar_arrive(l.empty(prev));
    const int next = tile + static_cast<int>(gridDim.x);
    if (lora && next < p.tiles) {  // the next tile's LoRA fragments, in flight during this epilogue
      const int64_t nf0 = static_cast<int64_t>(next % p.tiles_f) * G::kBF;
      lora_early ? load_lora<2, 2>(p, fr, nf0, lora_steps, a) : load_lora<0, 4>(p, fr, nf0, lora_steps, a);
    }
    store_tile<kBf16, kWide>(p, fr, acc, epi, epi_ptr, f0, t0);
  }
}

#endif  // sm_90a

// kScale16: the block scale applied in 16 bits (one HMUL2 a pair); kWide: the 128-feature × 256-token tile (Geo).
template <bool kBf16, bool kScale16, bool kWide>
__global__ void __launch_bounds__(kThreads, 1) qlora_gemm_ws_kernel(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const Layout<kWide> l = make_layout<kWide>(raw);
  if (l.end - raw > static_cast<uint32_t>(p.smem)) __trap();  // cannot happen with a <= 1 KB base
  float* codes = reinterpret_cast<float*>(smem_raw + (l.codes - raw));
  if (threadIdx.x == 0) nf4::fill_code_table(codes);
  __syncthreads();
  if constexpr (kScale16) {  // the byte -> (code_hi, code_lo) pair rounded to T, one copy per lane (first 128 B)
    uint32_t* t = reinterpret_cast<uint32_t*>(smem_raw + (l.table - raw));
    for (int i = threadIdx.x; i < 256 * 32; i += kThreads) {
      const int e = i >> 5;
      t[e * 64 + (i & 31)] = pack2<kBf16>(codes[e >> 4], codes[e & 15]);
    }
  } else {  // the byte -> (code_hi, code_lo) table, one copy per lane
    float2* t = reinterpret_cast<float2*>(smem_raw + (l.table - raw));
    for (int i = threadIdx.x; i < 256 * 32; i += kThreads) {
      const int e = i >> 5;
      t[i] = make_float2(codes[e >> 4], codes[e & 15]);
    }
  }
  if (threadIdx.x == 0) {
    for (int s = 0; s < Geo<kWide>::kStages; ++s) {
      tma::mbar_init(l.full(s), 1);  // the TMA thread's arrive.expect_tx
      tma::mbar_init(l.empty(s), 256);  // every consumer thread releases its own reads
    }
    tma::fence_mbar_init();
  }
  __syncthreads();
  const bool lora = p.r > 0;
  const int ktiles = static_cast<int>(p.k / kBK);
  if (threadIdx.x < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
    if (threadIdx.x == 0) produce_tma(p, l, ktiles + (lora ? 1 : 0), lora);
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 216;\n" ::: "memory");
    consume<kBf16, kScale16, kWide>(p, smem_raw, l, raw, ktiles, lora);
  }
#endif
}

// Decoded block scales [K / 64, pitch]: the fp32 absmax of the block holding (row f, k-tile kt), zero past N.
__global__ void decode_scales_kernel(nf4::Nf4Args a, int64_t n, int64_t k, int64_t pitch, int64_t total,
                                     float* __restrict__ out) {
  const float offset = a.nested ? __ldg(a.offset) : 0.f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t kt = i / pitch, f = i - kt * pitch;
    float v = 0.f;
    if (f < n) {
      const int64_t b = (f * k + kt * kBK) >> a.log2_blocksize;
      v = a.nested ? nf4::nested_absmax(__ldg(a.code2 + __ldg(a.qabsmax + b)),
                                        __ldg(a.absmax2 + (b >> nf4::kNestedBlocksizeLog2)), offset)
                   : __ldg(a.absmax + b);
    }
    out[i] = v;
  }
}

// The row pitch a tensor map needs: the stride, or (one row, whose stride may be anything) the row's own bytes.
int64_t map_pitch(const at::Tensor& t) {
  return t.size(0) == 1 ? ceil_div(t.size(1) * 2, int64_t{16}) * 16 : t.stride(0) * 2;
}

}  // namespace

bool supported(const qlora::GemmArgs& a) {
#ifdef SWIFTLORA_WITH_SM90A
  if (!a.x.is_cuda()) return false;
  const auto dt = a.x.scalar_type();
  if (dt != at::kBFloat16 && dt != at::kHalf) return false;
  // cached per device (the caller's CUDAGuard makes x's device current): no driver query per call
  if (device_major() != 9 || cached_attribute(cudaDevAttrComputeCapabilityMinor) != 0) return false;
  auto rows16 = [](const at::Tensor& t) {  // 16-byte aligned rows of 16-bit elements
    return aligned_to(t.const_data_ptr(), 16) && (t.size(0) == 1 || t.stride(0) % 8 == 0);
  };
  if (a.k % kBK != 0 || !rows16(a.x) || !aligned_to(a.w.nf4.packed.const_data_ptr(), 16)) return false;
  if (a.w.nf4.blocksize < kBK || ceil_div(a.n, int64_t{128}) * ceil_div(a.m, int64_t{128}) >= (int64_t{1} << 31)) {
    return false;  // tile counts in int (both geometries)
  }
  if (a.r > 0 && (a.r > 64 || a.r % 8 != 0 || !rows16(a.xa) || !rows16(a.lora_b))) return false;
  return true;
#else
  return false;
#endif
}

void run(const qlora::GemmArgs& a, at::Tensor& y, bool scale16, bool wide) {
  const int bf = wide ? Geo<true>::kBF : Geo<false>::kBF, bt = wide ? Geo<true>::kBT : Geo<false>::kBT;
  const nf4::Nf4Args w = nf4::nf4_args(a.w.nf4);
  const int64_t ktiles = a.k / kBK, pitch = ceil_div(a.n, kScalePitch) * kScalePitch;
  at::Tensor scales = at::empty({ktiles, pitch}, a.x.options().dtype(at::kFloat));
  const int64_t total = ktiles * pitch;
  decode_scales_kernel<<<static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), int64_t{sm_count()} * 8)),
                         256, 0, current_stream()>>>(w, a.n, a.k, pitch, total, scales.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  Params p{};
  p.x = static_cast<const uint16_t*>(a.x.const_data_ptr());
  p.ldx = a.x.stride(0);
  p.packed = w.packed;
  p.scales = scales.const_data_ptr<float>();
  p.pitch = pitch;
  if (a.r > 0) {
    p.xa = static_cast<const uint16_t*>(a.xa.const_data_ptr());
    p.ldxa = a.xa.stride(0);
    p.lb = static_cast<const uint16_t*>(a.lora_b.const_data_ptr());
    p.ldlb = a.lora_b.stride(0);
  }
  p.bias = a.bias.defined() ? static_cast<const uint16_t*>(a.bias.const_data_ptr()) : nullptr;
  p.y = static_cast<uint16_t*>(y.mutable_data_ptr());
  p.ldy = y.stride(0);
  p.m = a.m;
  p.n = a.n;
  p.k = a.k;
  p.r = static_cast<int>(a.r);
  p.tiles_f = static_cast<int>(ceil_div(a.n, int64_t{bf}));
  p.tiles = static_cast<int>(p.tiles_f * ceil_div(a.m, int64_t{bt}));
  p.tx = tensor_map_2d(p.x, CU_TENSOR_MAP_DATA_TYPE_UINT16, a.k, a.m, map_pitch(a.x), kBK, bt,
                       CU_TENSOR_MAP_SWIZZLE_128B);
  p.tw = tensor_map_2d(p.packed, CU_TENSOR_MAP_DATA_TYPE_UINT8, a.k / 2, a.n, a.k / 2, kBK / 2, bf,
                       CU_TENSOR_MAP_SWIZZLE_32B);
  if (a.r > 0) {
    p.txa = tensor_map_2d(p.xa, CU_TENSOR_MAP_DATA_TYPE_UINT16, a.r, a.m, map_pitch(a.xa), kBK, bt,
                          CU_TENSOR_MAP_SWIZZLE_128B);
  }
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(p.tiles, sm_count()));
  // the layout needs far less than its worst case
  const int smem = std::min(wide ? Geo<true>::kSmemBytes : Geo<false>::kSmemBytes, max_optin_smem());
  p.smem = smem;
  auto launch = [&](auto kernel) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, kThreads, smem, current_stream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const bool bf16 = a.x.scalar_type() == at::kBFloat16;
  // qlora_gemm_ws_kernel<bf16, 16-bit scale, wide>
  auto launch_dtype = [&](auto b16) {
    constexpr bool kB = decltype(b16)::value;
    if (wide) {
      scale16 ? launch(qlora_gemm_ws_kernel<kB, true, true>) : launch(qlora_gemm_ws_kernel<kB, false, true>);
    } else {
      scale16 ? launch(qlora_gemm_ws_kernel<kB, true, false>) : launch(qlora_gemm_ws_kernel<kB, false, false>);
    }
  };
  bf16 ? launch_dtype(std::true_type{}) : launch_dtype(std::false_type{});
}

}  // namespace swiftlora::cuda::sm90
