// nf4_gemv for decode (M <= 4) with the weight streamed by TMA bulk copies into a shared-memory ring and the math
// of nf4_gemv_mma.cu (mma.sync m16n8k16 on the pair table, nf4_mma_chunk.cuh) read from that ring.
//
// Floor (W [14336, 4096] nested, H100): 29.4 MB packed + 0.9 MB scales = 30.3 MB, 10.1 µs at 3.0 TB/s. The
// register-ring tensor-core kernel reached 44% of DRAM peak: ~28 K row streams touched 64-128 B at a time.
// Here the DRAM sees one long stream per SM: one CTA per SM owns a contiguous range of rows (balanced to ±1 row),
// i.e. one contiguous stretch of `packed`, read front to back in stages of 16 rows × 64·W bytes (W compute warps).
// Launch: (W + 1) warps. The last warp's lane 0 is the producer: it issues one cp.async.bulk per row segment into
// a ring of D stages (full / empty mbarriers), the first D stages before anything else. Warps 0..W-1 stage x, the
// CTA's block scales (nested: the qabsmax bytes + its absmax2 slice; plain: the fp32 absmax) and the 64 KiB pair
// table while those land, then take chunk w (128 codes) of every stage; a warp keeps its 16 rows' partial sums in
// registers over a tile's stages and leaves them in shared memory; one reduction in fixed order ends the kernel.
// Shared memory: [base, table) holds the first stages of the ring (the table needs a 64 KiB-aligned address: the
// slack below it is the ring's), then the 64 KiB table, then region B (barriers, tables, scales, partials, x, the
// stages that did not fit below the table).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <type_traits>
#include <utility>

#include "common/cuda_utils.cuh"
#include "common/smem_optin.cuh"
#include "cuda/nf4_gemv_stream.h"
#include "cuda/nf4_mma_chunk.cuh"
#include "cuda/tma_bulk.cuh"

namespace swiftlora::cuda {
namespace {

using nf4::Nf4Args;
using nf4mma::kChunkCodes;
using nf4mma::kTableBytes;
using nf4mma::lds128;
using nf4mma::lds32;
using nf4mma::lookup;
using nf4mma::pinned;

constexpr int kMaxM = 4;
constexpr int kTileRows = 16;
constexpr uint32_t kBaseSlack = 4096;  // the dynamic window may start above a 64 KiB boundary by this much (1 KiB
                                       // is reserved on sm_90); checked on the device
constexpr uint32_t kRegionA = 65536 - kBaseSlack;
// Staging loads in flight per thread at W compute warps: 128 / W scale pairs (W [14336, 4096] on 132 SMs: 14 per
// thread at W = 8) and 64 / W x chunks (x [4, 4096]: 8 per thread at W = 8).
template <int W>
constexpr int kScaleBatch = 128 / W;
template <int W>
constexpr int kXBatch = 64 / W;

// Stage geometry: a row segment is W chunks of 64 bytes; rows sit kRowStride apart (≡ 64 mod 128: the lanes g and
// g + 1 of a quarter-warp read different bank quads).
template <int W>
struct Stage {
  static constexpr uint32_t kSegBytes = 64 * W;
  static constexpr uint32_t kRowStride = kSegBytes + 64;
  static constexpr uint32_t kBytes = kTileRows * kRowStride;
};

struct Shape {
  int m, k, n;
  int rows_base, rows_rem;  // CTA c owns rows_base + (c < rows_rem) rows
};

// Byte offsets from region B's start; stages 0 .. a_stages - 1 sit from the window base, the others at `ring`.
struct Layout {
  uint32_t bars, code, code2, a2, scales, red, x, ring, b_bytes;
  uint32_t scale_stride;  // bytes between rows of the staged scales
  uint32_t a_stages;
};

// A position in the ring: slot, the parity of its current round, and its shared address.
template <int W, int D>
struct RingCursor {
  uint32_t stage = 0, phase = 0, addr, base, ring_b, a_stages;
  __device__ RingCursor(uint32_t base_, uint32_t ring_b_, uint32_t a_stages_)
      : addr(base_), base(base_), ring_b(ring_b_), a_stages(a_stages_) {}
  __device__ __forceinline__ void advance() {
    if (++stage == D) {
      stage = 0;
      phase ^= 1;
      addr = base;
    } else {
      addr = stage == a_stages ? ring_b : addr + Stage<W>::kBytes;
    }
  }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // used by the sm_90 kernel body only
__device__ __forceinline__ uint32_t lds16(uint32_t addr) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ float2 lds64f(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}
#endif

// Up to N items i0, i0 + stride, ... (below count) held in registers between their loads and their stores.
template <int N, typename V>
struct Batch {
  V v[N];
  template <typename Load>
  __device__ __forceinline__ void load(int i0, int stride, int count, Load f) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (i0 + j * stride < count) v[j] = f(i0 + j * stride);
    }
  }
  template <typename Store>
  __device__ __forceinline__ void store(int i0, int stride, int count, Store f) const {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (i0 + j * stride < count) f(i0 + j * stride, v[j]);
    }
  }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void compute_barrier(int threads) {  // the compute warps only (barrier 1)
  asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
}
#endif

template <typename T, bool Nested, int W, int D>
__global__ void __launch_bounds__((W + 1) * 32, 1)
    nf4_gemv_stream_kernel(const T* __restrict__ x, T* __restrict__ y, Nf4Args a, Shape sh, Layout L) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using St = Stage<W>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c = blockIdx.x;
  const int r0 = c * sh.rows_base + min(c, sh.rows_rem), rows = sh.rows_base + (c < sh.rows_rem ? 1 : 0);
  const int tiles = (rows + kTileRows - 1) / kTileRows, kc = sh.k / kChunkCodes, spt = (kc + W - 1) / W;
  const uint32_t half_k = static_cast<uint32_t>(sh.k) / 2;  // packed bytes per row

  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t table = (base + kRegionA + 0xFFFFu) & ~0xFFFFu;
  const uint32_t b = table + kTableBytes;
  const uint32_t full = b + L.bars, empty = full + 8 * D;
  unsigned char* bp = smem + (b - base);

  if (threadIdx.x == W * 32) {
    uint32_t size;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(size));
    if (b + L.b_bytes > base + size) __trap();  // the host's kBaseSlack was too small: never silently overlap
#pragma unroll
    for (int s = 0; s < D; ++s) {
      tma::mbar_init(full + 8 * s, 1);
      tma::mbar_init(empty + 8 * s, W);
    }
    tma::fence_mbar_init();
  }
  __syncthreads();

  if (warp == W) {  // producer
    if (lane == 0) {
      const unsigned char* src = a.packed + static_cast<int64_t>(r0) * half_k;
      RingCursor<W, D> rc(base, b + L.ring, L.a_stages);
      uint32_t issued = 0;
      for (int tile = 0; tile < tiles; ++tile) {
        const int trows = min(kTileRows, rows - tile * kTileRows);
        for (int seg = 0; seg < spt; ++seg, ++issued) {
          if (issued >= D) tma::mbar_wait(empty + 8 * rc.stage, rc.phase ^ 1);
          const uint32_t bytes = 64u * min(W, kc - seg * W);
          tma::mbar_arrive_expect_tx(full + 8 * rc.stage, bytes * trows);
          const unsigned char* s0 = src + static_cast<int64_t>(tile * kTileRows) * half_k + seg * St::kSegBytes;
          for (int r = 0; r < trows; ++r) {
            tma::bulk_copy(rc.addr + r * St::kRowStride, s0 + static_cast<int64_t>(r) * half_k, bytes,
                           full + 8 * rc.stage);
          }
          rc.advance();
        }
      }
    }
    return;
  }

  // Staging by the compute warps while the first stages are in flight: every thread issues its first batch of
  // loads of every array before any store, so the start costs one memory round trip (later batches: big shapes).
  const int tid = threadIdx.x, nthreads = W * 32;
  const int nb = sh.k / 64, pairs = nb / 2;  // blocks per row; scales move as pairs (blocks A and B of a chunk)
  const uint32_t blk0 = static_cast<uint32_t>(r0) * nb, grp0 = blk0 >> nf4::kNestedBlocksizeLog2;
  const int ngrp = static_cast<int>(((blk0 + static_cast<uint32_t>(rows) * nb - 1) >> 8) - grp0 + 1);
  const int nscale = rows * pairs, xchunks = sh.m * sh.k / 8;
  using ScalePair = std::conditional_t<Nested, unsigned short, float2>;  // the host checks 2- / 8-byte alignment
  const auto* scale_src = reinterpret_cast<const ScalePair*>(Nested ? static_cast<const void*>(a.qabsmax + blk0)
                                                                    : static_cast<const void*>(a.absmax + blk0));
  auto scale_load = [&](int i) { return __ldg(scale_src + i); };
  // Item i goes to (row, col) = (i / pairs, i % pairs); a thread's items step by nthreads, so (row, col) steps by
  // (sq, sr) with a carry (the stores run in item order) instead of a division per item.
  int row = tid / pairs, col = tid - row * pairs;
  const int sq = nthreads / pairs, sr = nthreads - sq * pairs;
  auto scale_store = [&](int, ScalePair v) {
    *reinterpret_cast<ScalePair*>(bp + L.scales + row * L.scale_stride + sizeof(ScalePair) * col) = v;
    row += sq;
    col += sr;
    if (col >= pairs) {
      col -= pairs;
      ++row;
    }
  };
  auto x_load = [&](int i) { return __ldg(reinterpret_cast<const uint4*>(x) + i); };
  auto x_store = [&](int i, uint4 v) { reinterpret_cast<uint4*>(bp + L.x)[i] = v; };
  Batch<kScaleBatch<W>, ScalePair> sb;
  Batch<kXBatch<W>, uint4> xv;
  sb.load(tid, nthreads, nscale, scale_load);
  xv.load(tid, nthreads, xchunks, x_load);
  float* code = reinterpret_cast<float*>(bp + L.code);
  float* code2 = reinterpret_cast<float*>(bp + L.code2);
  float offset = 0.f;
  if constexpr (Nested) {
    offset = __ldg(a.offset);
    for (int i = tid; i < nf4::kCode2Size; i += nthreads) code2[i] = __ldg(a.code2 + i);
    for (int i = tid; i < ngrp; i += nthreads) reinterpret_cast<float*>(bp + L.a2)[i] = __ldg(a.absmax2 + grp0 + i);
  }
  if (tid == 0) nf4::fill_code_table(code);
  sb.store(tid, nthreads, nscale, scale_store);
  xv.store(tid, nthreads, xchunks, x_store);
  for (int i0 = tid + kScaleBatch<W> * nthreads; i0 < nscale; i0 += kScaleBatch<W> * nthreads) {
    sb.load(i0, nthreads, nscale, scale_load);
    sb.store(i0, nthreads, nscale, scale_store);
  }
  for (int i0 = tid + kXBatch<W> * nthreads; i0 < xchunks; i0 += kXBatch<W> * nthreads) {
    xv.load(i0, nthreads, xchunks, x_load);
    xv.store(i0, nthreads, xchunks, x_store);
  }
  compute_barrier(nthreads);
  nf4mma::fill_pair_table<T, Nested>(smem + (table - base), code, code2, tid, nthreads);
  compute_barrier(nthreads);

  const int g = lane >> 2, t = lane & 3;
  const uint32_t lane_base = pinned(table + 4u * lane), code2_base = pinned(lane_base + 128u);
  const bool x_lane = pinned((g >> 1) < sh.m && (t >> 1) == (g & 1)) != 0;  // B column g's x row and block half
  const uint32_t x_lane_addr = b + L.x + static_cast<uint32_t>((g >> 1) * sh.k + 32 * t) * sizeof(T);
  const uint32_t frag = g * St::kRowStride + warp * 64 + 16 * t;  // the lane's 16 bytes of row g in a stage
  uint4 xb[4] = {};  // stays zero in lanes that feed no x
  RingCursor<W, D> rc(base, b + L.ring, L.a_stages);
  for (int tile = 0; tile < tiles; ++tile) {
    // Rows past the CTA's range compute on stale stage bytes with a valid row's scales; they are never stored.
    int rr[2] = {min(tile * kTileRows + g, rows - 1), min(tile * kTileRows + g + 8, rows - 1)};
    float acc[2] = {0.f, 0.f};
    for (int seg = 0; seg < spt; ++seg) {
      const int ch = seg * W + warp;
      tma::mbar_wait(full + 8 * rc.stage, rc.phase);
      if (ch < kc) {
        const uint32_t wa = rc.addr + frag;
        const uint4 w0 = lds128(wa), w1 = lds128(wa + 8 * St::kRowStride);
        if (x_lane) {
#pragma unroll
          for (int i = 0; i < 4; ++i) xb[i] = lds128(x_lane_addr + ch * (kChunkCodes * sizeof(T)) + 16 * i);
        }
        float s[2][2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint32_t srow = b + L.scales + rr[r] * L.scale_stride;
          if constexpr (Nested) {
            const uint32_t q = lds16(srow + 2 * ch);  // the bytes of blocks A and B
            const uint32_t grp = ((blk0 + rr[r] * nb + 2 * ch) >> nf4::kNestedBlocksizeLog2) - grp0;
            const float a2 = __uint_as_float(lds32(b + L.a2 + 4 * grp));
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              s[r][h] = nf4::nested_absmax(__uint_as_float(lookup(q, code2_base, h)), a2, offset);
            }
          } else {
            const float2 v = lds64f(srow + 8 * ch);
            s[r][0] = v.x;
            s[r][1] = v.y;
          }
        }
        float d0[4] = {0.f, 0.f, 0.f, 0.f}, d1[4] = {0.f, 0.f, 0.f, 0.f};  // two MMA chains: half the latency
        nf4mma::chunk_mma<T>(d0, d1, w0, w1, xb, lane_base);
        acc[0] = fmaf(d0[1] + d1[1], s[0][1], fmaf(d0[0] + d1[0], s[0][0], acc[0]));
        acc[1] = fmaf(d0[3] + d1[3], s[1][1], fmaf(d0[2] + d1[2], s[1][0], acc[1]));
      }
      __syncwarp();
      if (lane == 0) tma::mbar_arrive(empty + 8 * rc.stage);  // the warp's reads of this stage are done
      rc.advance();
    }
    // Lane (g, t) holds y[t][row g] and y[t][row g + 8] of this warp's chunks.
    reinterpret_cast<float2*>(bp + L.red)[(tile * W + warp) * 32 + lane] = make_float2(acc[0], acc[1]);
  }
  compute_barrier(nthreads);
  const float* red = reinterpret_cast<const float*>(bp + L.red);
  for (int i = tid; i < tiles * 64; i += nthreads) {
    const int tile = i >> 6, j = i & 63, ln = j >> 1, row = tile * kTileRows + (ln >> 2) + 8 * (j & 1);
    const int xrow = ln & 3;
    if (xrow < sh.m && row < rows) {
      float v = 0.f;
      for (int w = 0; w < W; ++w) v += red[(tile * W + w) * 64 + j];
      y[static_cast<int64_t>(xrow) * sh.n + r0 + row] = static_cast<T>(v);
    }
  }
#else
  __trap();  // bulk copies need sm_90; the host launches this kernel only there
#endif
}

// Shared-memory layout of a launch: region B = barriers, code, code2, absmax2 slice, scales, partials, x (and the
// stages that do not fit below the table).
template <int W, int D>
Layout make_layout(int m, int k, int max_rows, bool nested, std::size_t* total) {
  auto up16 = [](uint32_t v) { return (v + 15u) & ~15u; };
  const uint32_t nb = static_cast<uint32_t>(k) / 64;
  const uint32_t max_tiles = (static_cast<uint32_t>(max_rows) + kTileRows - 1) / kTileRows;
  Layout L{};
  // Scale rows padded so the 8 rows g of a fragment read (16-bit or 64-bit) hit different banks.
  L.scale_stride = nested ? ((nb + 7u) & ~7u) + 4u : 4u * ((nb / 2) % 2 == 0 ? nb + 2 : nb);
  uint32_t off = 0;
  L.bars = off;
  off = up16(off + 16u * D);
  L.code = off;
  off = up16(off + 16 * 4);
  L.code2 = off;
  off = up16(off + nf4::kCode2Size * 4);
  L.a2 = off;
  off = up16(off + 4u * ((max_rows * nb + 255u) / 256u + 1u));
  L.scales = off;
  off = up16(off + L.scale_stride * max_rows);
  L.red = off;
  off = up16(off + max_tiles * W * 64u * 4u);
  L.x = off;
  off = up16(off + static_cast<uint32_t>(m) * k * 2u);
  L.a_stages = std::min<uint32_t>(D, kRegionA / Stage<W>::kBytes);
  L.ring = off;
  off += (D - L.a_stages) * Stage<W>::kBytes;
  L.b_bytes = off;
  *total = std::size_t{65536} + kTableBytes + off;  // region A (with the base slack) + table + region B
  return L;
}

template <typename T, bool Nested, int W, int D>
bool launch(const T* x, int m, int64_t k, int64_t n, const Nf4Args& a, T* y, int max_smem, cudaStream_t stream) {
  auto kernel = nf4_gemv_stream_kernel<T, Nested, W, D>;
  const int sms = cached_attribute(cudaDevAttrMultiProcessorCount);  // no driver query per call
  const int64_t grid = std::min<int64_t>(sms, ceil_div(n, kTileRows));
  const Shape sh{m, static_cast<int>(k), static_cast<int>(n), static_cast<int>(n / grid),
                 static_cast<int>(n % grid)};
  std::size_t smem = 0;
  const Layout L = make_layout<W, D>(m, static_cast<int>(k), static_cast<int>(ceil_div(n, grid)), Nested, &smem);
  if (smem > static_cast<std::size_t>(max_smem)) return false;
  static std::mutex mu;
  static std::set<int> ready;  // devices where the kernel's shared-memory limit is raised
  {
    const std::lock_guard<std::mutex> lock(mu);
    const int dev = c10::cuda::current_device();
    if (!ready.count(dev)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
      ready.insert(dev);
    }
  }
  kernel<<<static_cast<unsigned>(grid), (W + 1) * 32, smem, stream>>>(x, y, a, sh, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T, int W, int D>
bool launch_scales(const T* x, int m, int64_t k, int64_t n, const Nf4Args& a, T* y, int max_smem, cudaStream_t s) {
  return a.nested ? launch<T, true, W, D>(x, m, k, n, a, y, max_smem, s)
                  : launch<T, false, W, D>(x, m, k, n, a, y, max_smem, s);
}

}  // namespace

template <typename T>
bool launch_nf4_gemv_stream(const T* x, int m, int64_t k, int64_t n, const Nf4Args& a, T* y, int max_smem,
                            cudaStream_t stream, Nf4StreamVariant variant) {
  const bool scales_aligned = a.nested ? aligned_to(a.qabsmax, 2) : aligned_to(a.absmax, 8);  // pair loads
  const bool small = k < (int64_t{1} << 20) && n < (int64_t{1} << 30) && n * (k / 64) < (int64_t{1} << 31);
  if (m < 1 || m > kMaxM || n < 1 || k % kChunkCodes != 0 || a.log2_blocksize != 6 || !aligned_to(a.packed, 16) ||
      !aligned_to(x, 16) || !scales_aligned || !small || device_major() < 9) {
    return false;
  }
  switch (variant) {
    case Nf4StreamVariant::kW8D4:
      return launch_scales<T, 8, 4>(x, m, k, n, a, y, max_smem, stream);
    case Nf4StreamVariant::kW8D8:
      return launch_scales<T, 8, 8>(x, m, k, n, a, y, max_smem, stream);
    case Nf4StreamVariant::kW16D4:
      return launch_scales<T, 16, 4>(x, m, k, n, a, y, max_smem, stream);
    case Nf4StreamVariant::kW8D6:
    default:
      return launch_scales<T, 8, 6>(x, m, k, n, a, y, max_smem, stream);
  }
}

template bool launch_nf4_gemv_stream<c10::BFloat16>(const c10::BFloat16*, int, int64_t, int64_t, const Nf4Args&,
                                                    c10::BFloat16*, int, cudaStream_t, Nf4StreamVariant);
template bool launch_nf4_gemv_stream<c10::Half>(const c10::Half*, int, int64_t, int64_t, const Nf4Args&, c10::Half*,
                                                int, cudaStream_t, Nf4StreamVariant);

}  // namespace swiftlora::cuda
