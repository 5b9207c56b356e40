// nf4_gemv on tensor cores for decode (M <= 4): y [M, N] = x [M, K] @ dequant(W [N, K])ᵀ with mma.sync m16n8k16
// (bf16 or fp16 inputs, fp32 accumulation). Budget (W [14336, 4096], H100): the 30.3 MB of weight bytes take
// 10.1 µs at 3.0 TB/s, in which the GPU issues ~10 M warp instructions; the SIMT kernel (nf4_gemv.cu) needed
// ~7 thread-instructions per weight element and sat at 26 µs. Here, per lane and 64 weight elements (two 64-byte
// row chunks of a 16-row tile): 2 LDG.128, 32 PRMT + 32 LDS (one per packed byte), 8 HMMA, 4 scale decodes,
// 4 FFMA (SASS: ~127 per chunk of 64 elements, 2.0 per element), half the shared-memory bytes of an fp32 lookup.
//
// Mapping and weights (nf4_mma_chunk.cuh, shared with nf4_gemv_stream.cu): a warp owns a 16-row tile of W and
// walks its K range in 128-code chunks, lane t of each quad loading 16 bytes of each of its two rows; a chunk is
// 8 MMAs whose B columns are (x row, block half), a packed byte becomes an A register through the per-lane pair
// table (one byte_perm + one LDS). The NF4 values enter rounded to T (bitsandbytes' fp32 table·scale rounds to T as
// well, after the scale): the result is as accurate as the dequantize-then-matmul reference in T (DESIGN.md's
// rule), not the SIMT kernel's exact fp32 weights. M <= 4 costs the same as M = 1.
// Launch: tiles split over SMs so each SM gets the same number of tiles (ceil(tiles / SMs) per CTA, one CTA per SM
// for this shape), `splits` warps per tile, each lane issuing its first `depth` chunks before the tables and x are
// staged. Only K % 128 == 0 and blocksize 64 (the QLoRA default: a chunk is exactly two blocks) come here.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "common/cuda_utils.cuh"
#include "common/smem_optin.cuh"
#include "cuda/nf4_gemv_mma.h"
#include "cuda/nf4_mma_chunk.cuh"

namespace swiftlora::cuda {
namespace {

using nf4::Nf4Args;
using nf4mma::lds128;
using nf4mma::lookup;
using nf4mma::pinned;

constexpr int kMaxWarps = 14;  // 448 threads: up to 144 registers per thread at one CTA per SM
constexpr int kMaxM = 4;
using nf4mma::kChunkCodes;
using nf4mma::kTableBytes;
// Dynamic shared memory: the small arrays first, then the table at the next 64 KiB-aligned shared address (the
// byte_perm addressing needs its low 16 bits free), so the allocation reserves 64 KiB of alignment slack.
// Table row e (256 bytes): [4l, 4l + 4) the T pair of byte e for lane l; [128 + 4l, ...) code2[e] (fp32) for lane l.
constexpr int kCode2Offset = 0;                                // float[256], staged for the table fill
constexpr int kCodeOffset = kCode2Offset + 256 * 4;            // float[16]
constexpr int kRedOffset = kCodeOffset + 16 * 4;               // float[2][kMaxWarps][64]: split partial sums
constexpr int kXOffset = kRedOffset + 2 * kMaxWarps * 64 * 4;  // T[m][k]

// The raw loads of one chunk for a lane's two rows (r = 0: row g, 1: row g + 8).
struct Chunk {
  uint4 w[2];      // 32 codes per row
  uint32_t q[2];   // nested: the uint8 absmax codes of blocks A (byte 0) and B (byte 1)
  float v[2][2];   // nested: [r][0] = absmax2 of the blocks' group; plain: [r][h] = absmax of block h
};

// Where a lane's next loads come from, advanced one chunk per load: the 16-byte piece of each row and the index
// of the row chunk's pair of 64-code blocks (32 bits: the host checks the range). Rows past n are clamped to
// n - 1: their sums are computed and not stored.
struct LoadPtrs {
  const uint4* w[2];
  uint32_t pair[2];
};

template <bool Nested>
__device__ __forceinline__ void load_chunk(Chunk& ch, const Nf4Args& a, LoadPtrs& lp) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    ch.w[r] = __ldcs(lp.w[r]);
    if constexpr (Nested) {
      ch.q[r] = __ldg(reinterpret_cast<const unsigned short*>(a.qabsmax) + lp.pair[r]);
      ch.v[r][0] = __ldg(a.absmax2 + (lp.pair[r] >> (nf4::kNestedBlocksizeLog2 - 1)));  // block 2·pair >> 8
    } else {
      const float2 s = __ldg(reinterpret_cast<const float2*>(a.absmax) + lp.pair[r]);
      ch.v[r][0] = s.x;
      ch.v[r][1] = s.y;
    }
    lp.w[r] += 4;
    ++lp.pair[r];
  }
}

template <typename T, bool Nested, int S, int D>
__global__ void __launch_bounds__(kMaxWarps * 32) nf4_gemv_mma_kernel(const T* __restrict__ x, int m, int k,
                                                                      int64_t n, Nf4Args a, T* __restrict__ y,
                                                                      int tiles_per_cta) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int slot = warp / S, part = warp % S;
  const int64_t ntiles = (n + 15) / 16;
  const int kc = k / kChunkCodes;
  const int64_t per_round = static_cast<int64_t>(gridDim.x) * tiles_per_cta;
  const int64_t rounds = (ntiles + per_round - 1) / per_round;
  const int c_begin = part * kc / S, c_end = (part + 1) * kc / S;
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t table = (smem_base + kXOffset + static_cast<uint32_t>(m * k) * sizeof(T) + 0xFFFFu) & ~0xFFFFu;
  const uint32_t lane_base = pinned(table + 4u * lane), code2_base = pinned(lane_base + 128u);
  // x row g / 2 feeds B column g where this lane's k half (t / 2) is the column's block half (g % 2).
  const bool x_lane = pinned((g >> 1) < m && (t >> 1) == (g & 1)) != 0;
  const uint32_t x_lane_addr = smem_base + kXOffset + static_cast<uint32_t>((g >> 1) * k + 32 * t) * sizeof(T);
  float* red = reinterpret_cast<float*>(smem + kRedOffset);

  float offset = 0.f;
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t tile = (round * gridDim.x + blockIdx.x) * tiles_per_cta + slot;
    const bool active = tile < ntiles;
    LoadPtrs lp;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = std::min<int64_t>(tile * 16 + g + 8 * r, n - 1);
      lp.w[r] = reinterpret_cast<const uint4*>(a.packed) + row * (k / 32) + 4 * c_begin + t;
      lp.pair[r] = static_cast<uint32_t>(row * kc + c_begin);
    }
    Chunk ring[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
      if (active && c_begin + d < c_end) load_chunk<Nested>(ring[d], a, lp);
    }
    if (round == 0) {  // tables and x, staged while the first chunks are in flight
      float* code = reinterpret_cast<float*>(smem + kCodeOffset);
      float* code2 = reinterpret_cast<float*>(smem + kCode2Offset);
      if (threadIdx.x == 0) nf4::fill_code_table(code);
      if constexpr (Nested) {
        offset = __ldg(a.offset);
        for (int i = threadIdx.x; i < nf4::kCode2Size; i += blockDim.x) code2[i] = __ldg(a.code2 + i);
      }
      const int xchunks = m * k / 8;
#pragma unroll 4
      for (int i = threadIdx.x; i < xchunks; i += blockDim.x) {
        reinterpret_cast<uint4*>(smem + kXOffset)[i] = __ldg(reinterpret_cast<const uint4*>(x) + i);
      }
      __syncthreads();
      nf4mma::fill_pair_table<T, Nested>(smem + (table - smem_base), code, code2, threadIdx.x, blockDim.x);
      __syncthreads();
    }

    float acc[2] = {0.f, 0.f};
    if (active) {
      uint4 xb[4] = {};  // stays zero in lanes that feed no x
      uint32_t x_addr = x_lane_addr + static_cast<uint32_t>(c_begin) * (kChunkCodes * sizeof(T));
      for (int c = c_begin; c < c_end; c += D) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
          const int cc = c + d;
          if (cc < c_end) {
            const Chunk& cur = ring[d];
            if (x_lane) {
#pragma unroll
              for (int i = 0; i < 4; ++i) xb[i] = lds128(x_addr + 16 * i);
            }
            x_addr += kChunkCodes * sizeof(T);
            float s[2][2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              if constexpr (Nested) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                  s[r][h] = nf4::nested_absmax(__uint_as_float(lookup(cur.q[r], code2_base, h)), cur.v[r][0],
                                               offset);
                }
              } else {
                s[r][0] = cur.v[r][0];
                s[r][1] = cur.v[r][1];
              }
            }
            float dacc[4] = {0.f, 0.f, 0.f, 0.f};
            nf4mma::chunk_mma<T>(dacc, dacc, cur.w[0], cur.w[1], xb, lane_base);
            acc[0] = fmaf(dacc[1], s[0][1], fmaf(dacc[0], s[0][0], acc[0]));
            acc[1] = fmaf(dacc[3], s[1][1], fmaf(dacc[2], s[1][0], acc[1]));
            // The slot is free again: chunk cc + D goes in flight behind the D - 1 already there. Even D: slots
            // refill in pairs, so the two 64-byte halves of each row's 128-byte line are requested together.
            if constexpr (D % 2 == 0) {
              if (d % 2 == 1) {
                if (cc - 1 + D < c_end) load_chunk<Nested>(ring[d - 1], a, lp);
                if (cc + D < c_end) load_chunk<Nested>(ring[d], a, lp);
              }
            } else if (cc + D < c_end) {
              load_chunk<Nested>(ring[d], a, lp);
            }
          }
        }
      }
    }

    // Lane (g, t) holds y[t][tile·16 + g] and y[t][tile·16 + g + 8] (of this warp's K part).
    if constexpr (S > 1) {
      float* buf = red + (round & 1) * kMaxWarps * 64;
      buf[warp * 64 + lane * 2] = acc[0];
      buf[warp * 64 + lane * 2 + 1] = acc[1];
      __syncthreads();  // one barrier per round: the other buffer is the next round's
      if (part == 0) {
#pragma unroll
        for (int p = 1; p < S; ++p) {
          acc[0] += buf[(warp + p) * 64 + lane * 2];
          acc[1] += buf[(warp + p) * 64 + lane * 2 + 1];
        }
      }
    }
    if (active && part == 0 && t < m) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t row = tile * 16 + g + 8 * r;
        if (row < n) y[t * n + row] = static_cast<T>(acc[r]);
      }
    }
  }
}

template <typename T, bool Nested, int S, int D>
bool launch(const T* x, int m, int64_t k, int64_t n, const Nf4Args& a, T* y, int max_smem, cudaStream_t stream) {
  auto kernel = nf4_gemv_mma_kernel<T, Nested, S, D>;
  const int64_t ntiles = ceil_div(n, 16);
  const int sms = sm_count();
  const int tiles_per_cta = static_cast<int>(std::clamp<int64_t>(ceil_div(ntiles, sms), 1, kMaxWarps / S));
  const int threads = tiles_per_cta * S * 32;
  const std::size_t smem = kXOffset + static_cast<std::size_t>(m) * k * sizeof(T) + 2 * kTableBytes;
  if (smem > static_cast<std::size_t>(max_smem)) return false;
  static std::mutex mu;
  static std::map<std::pair<int, std::size_t>, int> ctas_per_sm;  // (device, threads << 32 | smem) -> CTAs/SM
  int per_sm = 0;
  {
    const std::lock_guard<std::mutex> lock(mu);
    const auto key = std::make_pair(static_cast<int>(c10::cuda::current_device()),
                                    (static_cast<std::size_t>(threads) << 32) | smem);
    auto it = ctas_per_sm.find(key);
    if (it == ctas_per_sm.end()) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
      it = ctas_per_sm.emplace(key, per_sm).first;
    }
    per_sm = it->second;
  }
  if (per_sm < 1) return false;
  const int64_t grid = std::min<int64_t>(ceil_div(ntiles, tiles_per_cta), static_cast<int64_t>(sms) * per_sm);
  kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(x, m, static_cast<int>(k), n, a, y, tiles_per_cta);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace

template <typename T>
bool launch_nf4_gemv_mma(const T* x, int m, int64_t k, int64_t n, const Nf4Args& a, T* y, int max_smem,
                         cudaStream_t stream) {
  const bool scales_aligned = a.nested ? aligned_to(a.qabsmax, 2) : aligned_to(a.absmax, 8);  // pair loads
  const bool small = k < (int64_t{1} << 24) && n * (k / kChunkCodes) < (int64_t{1} << 31);  // 32-bit indices
  if (m < 1 || m > kMaxM || k % kChunkCodes != 0 || a.log2_blocksize != 6 || !aligned_to(a.packed, 16) ||
      !aligned_to(x, 16) || !scales_aligned || !small || device_major() < 8) {
    return false;
  }
  // 2 warps per tile, a 6-chunk ring: the fastest of the (splits, depth) measured (bench/NOTES.md)
  return a.nested ? launch<T, true, 2, 6>(x, m, k, n, a, y, max_smem, stream)
                  : launch<T, false, 2, 6>(x, m, k, n, a, y, max_smem, stream);
}

template bool launch_nf4_gemv_mma<c10::BFloat16>(const c10::BFloat16*, int, int64_t, int64_t, const Nf4Args&,
                                                 c10::BFloat16*, int, cudaStream_t);
template bool launch_nf4_gemv_mma<c10::Half>(const c10::Half*, int, int64_t, int64_t, const Nf4Args&, c10::Half*,
                                             int, cudaStream_t);

}  // namespace swiftlora::cuda
