// sm_90a: the logits GEMM of one vocabulary block with the online softmax in its epilogue, for a frozen LM head's
// block loop (lm_head_blocks_). P [M, width] (bf16) = e^{z − use}·scale with z = (hidden [M, K] · W[v0 .., K]ᵀ)·scale,
// where `use` is the row's reference max from the previous blocks (stats[row][0]) unless this 256-column tile's max
// passes it by more than `slack`; then the tile uses its own max and its partial says so (a "flagged" tile, which
// the merge kernel corrects). Per (row, tile) the kernel writes the partial (use, Σe, Σe·z, Σz) and, for the label's
// column, stats[row][4..5] = (z_label, scale), as online_softmax_block_'s lean kernel does. So the block costs the
// GEMM and a few MB of partials instead of the GEMM, a 32 MiB write of z and a 64 MiB read + write pass over it.
//
// CTA (384 threads, one per SM, persistent over 128-token × 256-column tiles):
//   warp 0, lane 0: TMA producer into a 4-stage ring (A = 128 hidden rows × 64 k, B = 256 W rows × 64 k, both
//     K-major with the 128-byte swizzle). With kCluster = 2 the two CTAs of a cluster take token tiles 2p and 2p + 1
//     of the same columns and each loads half of B, multicast into both CTAs (measured: no faster; kept as a knob).
//   warpgroups 1 and 2: wgmma m64n256k16 with both operands in shared memory, 128 fp32 accumulators a thread. After
//     a tile's last k-tile each thread holds its two rows' 64 columns (the row's other 192 columns sit in the 3 other
//     lanes of its quad: 2 shuffles a reduction) as packed bf16 z. consume(): the softmax and the P stores (through a
//     2 KB per-warp staging buffer, 16-byte global stores) run right away; consume_overlapped() (kOverlap, what
//     lm_head_blocks_ runs: csrc/cuda/lm_head_fused_sm90.cu) runs them in kSlices slices under the next tile's first
//     k-tiles, with setmaxnreg 40 / 232 so the packed tile and the next accumulators fit together.
// Why not an epilogue by separate warps under the next tile's MMAs (the first version): its 64 KB staging tile left
// room for 3 stages only, and the GEMM alone runs 8% slower with 3 stages than with 4 (bench/NOTES.md, session 10).
// Restrictions (the host checks them): bf16, width % 8 == 0, K % 8 == 0 (16-byte rows for TMA), M ≥ 1, scale > 0,
// and K > kSlices·64 for the overlapped consumer. Standalone checks and timing: bench/micro/logits_softmax.
#pragma once
#include <cuda.h>  // CUtensorMap
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/tma_bulk.cuh"
#include "cuda/wgmma_sm90.cuh"

namespace swiftlora::cuda::logits_sm90 {

constexpr int kThreads = 384;
constexpr int kBM = 128, kBN = 256, kBK = 64;
constexpr int kStages = 4;
constexpr int kABytes = kBM * kBK * 2;            // 16384
constexpr int kBBytes = kBN * kBK * 2;            // 32768
constexpr int kStageBytes = kABytes + kBBytes;    // 49152
constexpr int kWarpStagingBytes = 16 * 64 * 2;   // a consumer warp's 16 rows × 64 columns of bf16
constexpr int kOffStaging = kStages * kStageBytes;                 // 196608
constexpr int kOffBars = kOffStaging + 8 * kWarpStagingBytes;      // 212992
constexpr int kNumBars = 2 * kStages;                              // full, empty
constexpr int kSmemBytes = kOffBars + kNumBars * 8 + 1024;         // + slack to align the dynamic base to 1024
static_assert(kSmemBytes <= 232448, "fits the sm_90 227 KB opt-in");
constexpr int kModeCopy = 0;     // tests and timing: the tile's z (bf16) is stored, nothing else
constexpr int kModeSoftmax = 1;  // the op: P and the partials
constexpr int kModeDiscard = 2;  // timing aid: the accumulators are dropped (the pipeline alone)
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kSlices = 14;  // the overlapped epilogue's slices (it needs K > kSlices·kBK)

struct Params {
  CUtensorMap ta;  // hidden [M, K] bf16, box {64, 128}, 128B swizzle
  CUtensorMap tb;  // W [V, K] bf16, box {64, 256 / kCluster}, 128B swizzle
  uint16_t* p;     // [M, ldp] bf16 bits: P (kModeSoftmax) or z (kModeCopy), columns [0, width)
  int64_t ldp;
  float* stats;    // [M, 6]: [0] the reference max (read), [4], [5] the label's (z, dz) (written)
  float4* part;    // [M, tiles_n]: (use, Σe, Σe·z, Σz) per row and column tile
  const void* labels;  // [M] int64 / int32 (the kernel's L), or null
  int64_t col0;        // vocabulary index of column 0 (= v0)
  int64_t ignore_index;
  int m, width, k;
  int v0;              // W row of column 0
  int tiles_m, tiles_n;
  float scale, slack;
  float c_exp;      // scale·log2(e): e^{x·scale − use}·scale = 2^{x·c_exp − (use·log2(e) − log2_scale)}
  float log2_scale;
  int sums;         // 0: Σe only; kSumZ: also Σz (label smoothing); kSumEz: also Σe·z (entropy)
};
constexpr int kSumZ = 1, kSumEz = 2;

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

using tma::fence_mbar_init;
using tma::mbar_arrive;
using tma::mbar_arrive_expect_tx;
using tma::mbar_init;
using tma::mbar_wait;
using wgmma::desc_sw128;
using wgmma::pin;
using wgmma::smem_u32;
using wgmma::wgmma_commit;
using wgmma::wgmma_fence;
using wgmma::wgmma_wait;

__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// Arrives on the mbarrier at the same shared offset in CTA `rank` of the cluster.
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t rank) {
  asm volatile(
      "{\n .reg .b32 ra;\n mapa.shared::cluster.u32 ra, %0, %1;\n mbarrier.arrive.shared::cluster.b64 _, [ra];\n}" ::"r"(
          bar),
      "r"(rank)
      : "memory");
}
// A TMA box written to the same shared offset (and completing on the same mbarrier offset) in every CTA of `mask`.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                                      uint32_t bar, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
      "%3}], [%4], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(mask)
      : "memory");
}

// D[64 × 256] (+)= A[64 × 16] · B[16 × 256], both from shared memory (K-major); scale_d = 0 starts the tile.
__device__ __forceinline__ void wgmma_ss(float (&d)[128], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
  asm volatile("{\n"
               ".reg .pred p;\n"
               "setp.ne.b32 p, %130, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " SWIFTLORA_WGMMA_ACC128_REGS
               ", %128, %129, p, 1, 1, 0, 0;\n"
               "}\n"
               : SWIFTLORA_WGMMA_ACC128_OPS(d)
               : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// A tile's first MMA: D = A·B (scale-d false), D write-only for the compiler ("=f"), so the previous tile's
// accumulators are dead once its epilogue has read them (with "+f" and a runtime scale-d they stayed live through
// the epilogue, which spilled 2-4 KB).
__device__ __forceinline__ void wgmma_ss_first(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " SWIFTLORA_WGMMA_ACC128_REGS
               ", %128, %129, 0, 1, 1, 0, 0;\n"
               : SWIFTLORA_WGMMA_ACC128_OUT(d)
               : "l"(desc_a), "l"(desc_b));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

struct Smem {
  uint8_t* gen;   // generic pointer to the aligned base
  uint32_t base;  // its shared address
  __device__ __forceinline__ uint32_t a(int s) const { return base + s * kStageBytes; }
  __device__ __forceinline__ uint32_t b(int s) const { return base + s * kStageBytes + kABytes; }
  __device__ __forceinline__ uint32_t staging(int warp) const { return base + kOffStaging + warp * kWarpStagingBytes; }
  __device__ __forceinline__ uint32_t full(int s) const { return base + kOffBars + s * 8; }
  __device__ __forceinline__ uint32_t empty(int s) const { return base + kOffBars + (kStages + s) * 8; }
};

// The j-th tile of this CTA: token row m0, column n0 (relative to the block). Clusters of two take token tiles
// 2q and 2q + 1 of the same columns (both CTAs walk the same sequence, so their B loads pair up).
template <int kCluster>
struct Tiles {
  int first, stride, per_n, count;  // count: tiles this CTA (cluster) walks
  __device__ __forceinline__ Tiles(const Params& p) {
    if constexpr (kCluster == 1) {
      first = blockIdx.x, stride = gridDim.x, per_n = p.tiles_m;
    } else {
      first = blockIdx.x / 2, stride = gridDim.x / 2, per_n = (p.tiles_m + 1) / 2;
    }
    const int total = per_n * p.tiles_n;
    count = first < total ? (total - 1 - first) / stride + 1 : 0;
  }
  __device__ __forceinline__ int2 at(int j, uint32_t rank) const {
    const int t = first + j * stride, q = t % per_n, nt = t / per_n;
    return make_int2((kCluster == 1 ? q : 2 * q + static_cast<int>(rank)) * kBM, nt * kBN);
  }
};

template <int kCluster>
__device__ __forceinline__ void produce(const Params& p, const Smem& l, const Tiles<kCluster>& tiles, uint32_t rank) {
  const int ktiles = (p.k + kBK - 1) / kBK;
  const int total = tiles.count * ktiles;
  for (int it = 0; it < total; ++it) {
    const int s = it % kStages, j = it / ktiles, kt = it - j * ktiles;
    if (it >= kStages) mbar_wait(l.empty(s), ((it / kStages) - 1) & 1);
    const int2 t = tiles.at(j, rank);
    mbar_arrive_expect_tx(l.full(s), kStageBytes);  // A + the whole B (both halves, with kCluster = 2)
    wgmma::tma_load_2d(l.a(s), &p.ta, kt * kBK, t.x, l.full(s));
    if constexpr (kCluster == 1) {
      wgmma::tma_load_2d(l.b(s), &p.tb, kt * kBK, p.v0 + t.y, l.full(s));
    } else {
      const uint32_t half = rank * (kBBytes / 2);
      tma_load_2d_multicast(l.b(s) + half, &p.tb, kt * kBK, p.v0 + t.y + static_cast<int>(rank) * (kBN / 2),
                            l.full(s), 0x3);
    }
  }
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float bf_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }
__device__ __forceinline__ uint32_t hmax2_bf16(uint32_t a, uint32_t b) {
  const __nv_bfloat162 m = __hmax2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                   *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&m);
}

struct RowIn {
  float ref;  // the row's reference max (stats[row][0])
  int lc;     // its label's column in the block, −1 if none (ignored, or in another block)
};

// Loaded when a tile starts, used in its epilogue: the latency hides under the tile's MMAs.
template <int kMode, typename L>
__device__ __forceinline__ RowIn load_row_in(const Params& p, int grow) {
  RowIn in{0.f, -1};
  if (kMode == kModeSoftmax && grow < p.m) {
    in.ref = p.stats[static_cast<int64_t>(grow) * 6];
    if (p.labels != nullptr) {
      const int64_t lab = static_cast<int64_t>(static_cast<const L*>(p.labels)[grow]);
      if (lab != p.ignore_index && lab >= p.col0 && lab < p.col0 + p.width) in.lc = static_cast<int>(lab - p.col0);
    }
  }
  return in;
}

// The finished tile's accumulators as bf16 pairs: pk[2j + h] = (column 8j + 2tq, + 1) of row h (see softmax_rows),
// pinned here so the accumulators die now (left to itself ptxas repacked them at every use, keeping all 128 alive
// through the softmax, and spilled 2 KB).
__device__ __forceinline__ void pack_tile(const float (&acc)[128], uint32_t (&pk)[64]) {
#pragma unroll
  for (int jj = 0; jj < 32; ++jj) {
#pragma unroll
    for (int h = 0; h < 2; ++h) pk[2 * jj + h] = pack_bf16(acc[4 * jj + 2 * h], acc[4 * jj + 2 * h + 1]);
  }
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+r"(pk[i])::"memory");
}

// Row h's label logit, when the label's column `rel` (relative to the tile) is one of this thread's pairs:
// stats[row][4..5] = (z_label, scale), as online_softmax_block_'s lean kernel writes them. Rare: one tile of ~500.
__device__ __forceinline__ void store_label_logit(const Params& p, const uint32_t (&pk)[64], int h, int rel, int grow,
                                                  int tq) {
  if (rel >= 0 && rel < kBN && ((rel >> 1) & 3) == tq && grow < p.m) {
    uint32_t w = pk[h];
    const int jl = rel >> 3;
#pragma unroll
    for (int j = 1; j < 32; ++j) {  // selects in asm: as C++, the chain became an indexed local-memory copy of pk
      asm("{\n .reg .pred q;\n setp.eq.s32 q, %2, %3;\n selp.b32 %0, %4, %1, q;\n}"
          : "=r"(w)
          : "r"(w), "r"(jl), "r"(j), "r"(pk[2 * j + h]));
    }
    float* st = p.stats + static_cast<int64_t>(grow) * 6;
    st[4] = __fmul_rn((rel & 1) ? bf_hi(w) : bf_lo(w), p.scale);
    st[5] = p.scale;
  }
}

// The reference max the tile uses for row h: the row's `ref`, unless the tile's max (over its valid column blocks)
// passes it by more than the slack (ref = −inf: always the tile's own max).
template <bool kFull>
__device__ __forceinline__ float tile_reference(const Params& p, const uint32_t (&pk)[64], int h, int nvalid,
                                                float ref) {
  // 4 independent chains (one chain of 32 left the epilogue latency-bound: 2.4 us a tile)
  uint32_t mw[4] = {0xFF80FF80u, 0xFF80FF80u, 0xFF80FF80u, 0xFF80FF80u};  // (−inf, −inf)
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    if (kFull || j < nvalid) mw[j & 3] = hmax2_bf16(mw[j & 3], pk[2 * j + h]);
  }
  const uint32_t m2 = hmax2_bf16(hmax2_bf16(mw[0], mw[1]), hmax2_bf16(mw[2], mw[3]));
  // scale > 0 (the host's condition): max(x·scale) = max(x)·scale, both rounded the same way
  const float cm = __fmul_rn(quad_max(fmaxf(bf_lo(m2), bf_hi(m2))), p.scale);
  return cm > ref + p.slack ? cm : ref;
}

// The accumulator fragment (wgmma m64nNk16, fp32 D): thread lane = 4g + tq of warp wi holds acc[4j + 2h + e] at
// row 16·wi + g + 8h, column 8j + 2tq + e (j < 32). pk[2j + h] = that pair rounded to bf16: the logits as a bf16 GEMM
// gives them, so z here is exactly the z online_softmax_block_ reads. The softmax then overwrites pk with P.
// kFull: all 256 columns of the tile are in the block (no per-column-block checks: with them ptxas kept 32
// predicates alive and spilled).
template <bool kFull, int kH0 = 0, int kH1 = 2>  // rows h in [kH0, kH1) (the overlapped epilogue does one at a time)
__device__ __forceinline__ void softmax_rows(const Params& p, uint32_t (&pk)[64], const RowIn (&in)[2], int row0,
                                             int n0, int nt, int tq) {
  const float c = p.c_exp;
  const int nvalid = kFull ? 32 : (p.width - n0 + 7) >> 3;  // valid column blocks (a block is all valid or not)
#pragma unroll
  for (int h = kH0; h < kH1; ++h) {
    const int grow = row0 + 8 * h;
    store_label_logit(p, pk, h, in[h].lc - n0, grow, tq);
    const float use = tile_reference<kFull>(p, pk, h, nvalid, in[h].ref);
    const float u3 = use * kLog2e - p.log2_scale;
    float sa[4] = {0.f, 0.f, 0.f, 0.f}, sxa[4] = {0.f, 0.f, 0.f, 0.f}, xsa[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const uint32_t w = pk[2 * j + h];
      const float x0 = bf_lo(w), x1 = bf_hi(w);
      float p0 = 0.f, p1 = 0.f;
      if (kFull || j < nvalid) {
        xsa[j & 3] += x0 + x1;
        p0 = ex2(fmaf(x0, c, -u3));  // e^{z − use}·scale
        p1 = ex2(fmaf(x1, c, -u3));
        sa[j & 3] += p0 + p1;
        sxa[j & 3] = fmaf(p0, x0, fmaf(p1, x1, sxa[j & 3]));  // Σ P·x = Σ e·z
      }
      pk[2 * j + h] = pack_bf16(p0, p1);
    }
    const float s = quad_sum((sa[0] + sa[1]) + (sa[2] + sa[3]));
    const float sx = quad_sum((sxa[0] + sxa[1]) + (sxa[2] + sxa[3]));
    const float xs = quad_sum((xsa[0] + xsa[1]) + (xsa[2] + xsa[3]));
    if (tq == 0 && grow < p.m) {
      p.part[static_cast<int64_t>(grow) * p.tiles_n + nt] = make_float4(use, s / p.scale, sx, xs * p.scale);
    }
  }
}

// pk (bf16 pairs as above) -> rows row0 .. row0 + 15 of the output, 64 columns at a time through the warp's staging
// buffer [16 rows][64 columns], 16-byte chunk ch of row R at R·128 + ((ch ^ (R % 8))·16): stmatrix and the row
// reads are both conflict-free, and each global store instruction writes 8 rows × 64 contiguous bytes... × 2.
template <int kQ0 = 0, int kQ1 = 4>  // column slices q in [kQ0, kQ1)
__device__ __forceinline__ void store_rows(const Params& p, const uint32_t (&pk)[64], uint32_t buf, const uint8_t* bp,
                                           int row0, int n0, int lane) {
  const int li = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int q = kQ0; q < kQ1; ++q) {  // columns 64q .. 64q + 63 = column blocks j = 8q .. 8q + 7
#pragma unroll
    for (int jp = 0; jp < 8; jp += 2) {
      const int j = 8 * q + jp;
      const int R = 8 * (li & 1) + lr, ch = jp + (li >> 1);  // the row this lane addresses (matrix li)
      asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                       buf + R * 128 + ((ch ^ (R & 7)) << 4)),
                   "r"(pk[2 * j]), "r"(pk[2 * j + 1]), "r"(pk[2 * j + 2]), "r"(pk[2 * j + 3])
                   : "memory");
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int piece = lane + 32 * i, R = piece >> 3, ch = piece & 7;
      const int grow = row0 + R, col = n0 + 64 * q + 8 * ch;
      if (grow < p.m && col < p.width) {
        const uint4 v = *reinterpret_cast<const uint4*>(bp + R * 128 + ((ch ^ (R & 7)) << 4));
        *reinterpret_cast<uint4*>(p.p + static_cast<int64_t>(grow) * p.ldp + col) = v;
      }
    }
    __syncwarp();
  }
}

// One stage released by a consumer warp: an arrival on its empty barrier in every CTA of the cluster.
template <int kCluster>
__device__ __forceinline__ void release_stage(const Smem& l, int s, int lane) {
  if (lane == 0) {
    if constexpr (kCluster == 1) {
      mbar_arrive(l.empty(s));
    } else {
      mbar_arrive_cluster(l.empty(s), 0);
      mbar_arrive_cluster(l.empty(s), 1);
    }
  }
}

// K-tile `it`'s four MMAs for consumer warpgroup cw, committed as one group; kFirst: the tile's first k-tile, whose
// first MMA starts the accumulators (write-only).
template <bool kFirst>
__device__ __forceinline__ void issue_ktile(const Smem& l, float (&acc)[128], int it, int cw) {
  const int s = it % kStages;
  mbar_wait(l.full(s), (it / kStages) & 1);
  const uint32_t a0 = l.a(s) + cw * (64 * 128), b0 = l.b(s);
  wgmma_fence();
  if constexpr (kFirst) {
    wgmma_ss_first(acc, desc_sw128(a0), desc_sw128(b0));
  } else {
    wgmma_ss(acc, desc_sw128(a0), desc_sw128(b0), 1u);
  }
#pragma unroll
  for (int k16 = 1; k16 < 4; ++k16) wgmma_ss(acc, desc_sw128(a0 + 32 * k16), desc_sw128(b0 + 32 * k16), 1u);
  wgmma_commit();
}

template <int kCluster, int kMode, typename L>
__device__ __forceinline__ void consume(const Params& p, const Smem& l, const Tiles<kCluster>& tiles, uint32_t rank) {
  const int cw = (threadIdx.x >> 7) - 1, wi = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int cwarp = 4 * cw + wi;
  const uint32_t buf = l.staging(cwarp);
  const uint8_t* bp = l.gen + kOffStaging + cwarp * kWarpStagingBytes;
  const int ktiles = (p.k + kBK - 1) / kBK;
  float acc[128];  // set by each tile's first MMA (scale_d = 0)
  auto release = [&](int s) { release_stage<kCluster>(l, s, lane); };
  int it = 0;
  for (int j = 0; j < tiles.count; ++j) {
    const int2 t = tiles.at(j, rank);
    const int row0 = t.x + 64 * cw + 16 * wi + (lane >> 2);  // this thread's rows: row0, row0 + 8
    const RowIn in[2] = {load_row_in<kMode, L>(p, row0), load_row_in<kMode, L>(p, row0 + 8)};
    // k-tile 0 peeled (straight-line, so no wgmma sits in a divergent path): its first MMA starts the accumulators
    issue_ktile<true>(l, acc, it++, cw);
    for (int kt = 1; kt < ktiles; ++kt, ++it) {
      issue_ktile<false>(l, acc, it, cw);
      wgmma_wait<1>();  // k-tile it − 1 has completed: its stage may be refilled
      release((it - 1) % kStages);
    }
    wgmma_wait<0>();
    pin(acc);
    release((it - 1) % kStages);
    if constexpr (kMode == kModeDiscard) {  // one data-dependent (never taken) store keeps the MMAs alive
      if (acc[0] + acc[127] == 1.2345e-30f) p.part[0].x = acc[64];
    } else {
      uint32_t pk[64];
      pack_tile(acc, pk);
      if constexpr (kMode == kModeSoftmax) {
        if (t.y + kBN <= p.width) {
          softmax_rows<true>(p, pk, in, row0, t.y, t.y / kBN, lane & 3);
        } else {
          softmax_rows<false>(p, pk, in, row0, t.y, t.y / kBN, lane & 3);
        }
      }
      store_rows(p, pk, buf, bp, t.x + 64 * cw + 16 * wi, t.y, lane);
    }
  }
}

// The epilogue of a finished tile (its z packed in pk) in kSlices slices, so that the overlapped consumer can run one
// right after issuing each of k-tiles 1..kSlices of the next tile, while the tensor cores work:
//   slice 0: both rows' max, reference decision and label column; 1..8: e for column blocks 4(s − 1) .. 4(s − 1) + 3
//   of both rows (16 ex2 a thread per slice: the MUFU work spread thin); 9: the row sums and partials; 10..13: the
//   stores, 64 columns each. (Six slices, the whole softmax of a row in one, ran slower than no overlap at all.)
struct Pending {
  int row0, n0;  // this thread's first row (the other is row0 + 8); the tile's first column
  RowIn in[2];
  float use[2], u3[2];       // slice 0: the reference used, and the exponent offset
  float s[2], sx[2], xs[2];  // slices 1..8: this lane's sums
};

template <int S, int N, class F>
__device__ __forceinline__ void static_for(F&& f) {
  if constexpr (S < N) {
    f(std::integral_constant<int, S>{});
    static_for<S + 1, N>(f);
  }
}

// Slice kSlice (1..8) of the exponentials: column blocks 4(kSlice − 1) .. + 3 of both rows.
template <int kSlice, bool kFull, int kSums>
__device__ __forceinline__ void exp_slice(const Params& p, uint32_t (&pk)[64], Pending& e, int nvalid) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float u3 = e.u3[h];
    float s = 0.f, sx = 0.f, xs = 0.f;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int j = 4 * (kSlice - 1) + jj;
      if (kFull || j < nvalid) {
        const uint32_t w = pk[2 * j + h];
        const float x0 = bf_lo(w), x1 = bf_hi(w);
        const float p0 = ex2(fmaf(x0, p.c_exp, -u3));  // e^{z − use}·scale
        const float p1 = ex2(fmaf(x1, p.c_exp, -u3));
        s += p0 + p1;
        if constexpr ((kSums & kSumZ) != 0) xs += x0 + x1;
        if constexpr ((kSums & kSumEz) != 0) sx = fmaf(p0, x0, fmaf(p1, x1, sx));  // Σ P·x = Σ e·z
        pk[2 * j + h] = pack_bf16(p0, p1);
      }
    }
    e.s[h] += s;
    if constexpr ((kSums & kSumZ) != 0) e.xs[h] += xs;
    if constexpr ((kSums & kSumEz) != 0) e.sx[h] += sx;
  }
}

template <int kMode, int kSlice>
__device__ __forceinline__ void epilogue_slice(const Params& p, uint32_t (&pk)[64], Pending& e, uint32_t buf,
                                               const uint8_t* bp, int lane) {
  const int tq = lane & 3;
  const int nvalid = min(32, (p.width - e.n0 + 7) >> 3);  // valid column blocks (a block is all valid or not)
  if constexpr (kSlice == 0) {
    if constexpr (kMode == kModeSoftmax) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int grow = e.row0 + 8 * h;
        store_label_logit(p, pk, h, e.in[h].lc - e.n0, grow, tq);
        e.use[h] = tile_reference<false>(p, pk, h, nvalid, e.in[h].ref);
        e.u3[h] = e.use[h] * kLog2e - p.log2_scale;
        e.s[h] = e.sx[h] = e.xs[h] = 0.f;
      }
    }
  } else if constexpr (kSlice <= 8) {
    if constexpr (kMode == kModeSoftmax) {
      // one uniform choice per slice, so the column-block loop has no per-block tests or flag loads (the first
      // build branched and reloaded the flags for every block)
      const bool full = e.n0 + kBN <= p.width;
      if (full && p.sums == 0) {
        exp_slice<kSlice, true, 0>(p, pk, e, nvalid);
      } else if (full && p.sums == kSumZ) {
        exp_slice<kSlice, true, kSumZ>(p, pk, e, nvalid);
      } else {
        exp_slice<kSlice, false, kSumZ | kSumEz>(p, pk, e, nvalid);  // partial tiles and entropy: everything
      }
    }
  } else if constexpr (kSlice == 9) {
    if constexpr (kMode == kModeSoftmax) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float s = quad_sum(e.s[h]), sx = quad_sum(e.sx[h]), xs = quad_sum(e.xs[h]);
        const int grow = e.row0 + 8 * h;
        if (tq == 0 && grow < p.m) {
          p.part[static_cast<int64_t>(grow) * p.tiles_n + e.n0 / kBN] =
              make_float4(e.use[h], s / p.scale, sx, xs * p.scale);
        }
      }
    }
  } else {
    store_rows<kSlice - 10, kSlice - 9>(p, pk, buf, bp, e.row0 - (lane >> 2), e.n0, lane);
  }
}

// The consumer with the epilogue of tile j − 1 under the MMAs of tile j (FA3-style): needs 128 accumulators in flight
// plus the 64 packed registers of the finished tile, so the consumer warpgroups run with setmaxnreg 232 (the
// producer warpgroup gives its registers back). K > kSlices·64 (the host's condition): the slices ride k-tiles
// 1..kSlices.
template <int kCluster, int kMode, typename L>
__device__ __forceinline__ void consume_overlapped(const Params& p, const Smem& l, const Tiles<kCluster>& tiles,
                                                   uint32_t rank) {
  const int cw = (threadIdx.x >> 7) - 1, wi = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int cwarp = 4 * cw + wi;
  const uint32_t buf = l.staging(cwarp);
  const uint8_t* bp = l.gen + kOffStaging + cwarp * kWarpStagingBytes;
  const int ktiles = (p.k + kBK - 1) / kBK;
  float acc[128];
  uint32_t pk[64];
  Pending e{};
  bool pending = false;
  auto release = [&](int s) { release_stage<kCluster>(l, s, lane); };
  int it = 0;
  for (int j = 0; j < tiles.count; ++j) {
    const int2 t = tiles.at(j, rank);
    const int row0 = t.x + 64 * cw + 16 * wi + (lane >> 2);
    const RowIn in[2] = {load_row_in<kMode, L>(p, row0), load_row_in<kMode, L>(p, row0 + 8)};
    issue_ktile<true>(l, acc, it++, cw);  // k-tile 0: its first MMA starts the accumulators (write-only)
    // k-tile it, k-tile it − 1's stage released, then (if a tile is pending) one epilogue slice under k-tile it.
    // (With the slice first, every stage was held back by a slice's time before its release.)
    static_for<0, kSlices>([&](auto slice) {
      issue_ktile<false>(l, acc, it, cw);
      wgmma_wait<1>();
      release((it - 1) % kStages);
      if (pending) epilogue_slice<kMode, decltype(slice)::value>(p, pk, e, buf, bp, lane);
      ++it;
    });
    for (int kt = kSlices + 1; kt < ktiles; ++kt, ++it) {
      issue_ktile<false>(l, acc, it, cw);
      wgmma_wait<1>();
      release((it - 1) % kStages);
    }
    wgmma_wait<0>();
    pin(acc);
    release((it - 1) % kStages);
    pack_tile(acc, pk);
    e.row0 = row0, e.n0 = t.y, e.in[0] = in[0], e.in[1] = in[1];
    pending = true;
  }
  if (pending) {  // the last tile's epilogue, with nothing left to hide under
    static_for<0, kSlices>([&](auto slice) { epilogue_slice<kMode, decltype(slice)::value>(p, pk, e, buf, bp, lane); });
  }
}

template <int kCluster, int kMode, typename L, bool kOverlap = false>
__device__ __forceinline__ void logits_softmax_body(const Params& p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  Smem l;
  const uint32_t raw = smem_u32(smem_raw);
  l.base = (raw + 1023) & ~1023u;
  l.gen = smem_raw + (l.base - raw);
  const uint32_t rank = kCluster == 1 ? 0u : cluster_rank();
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(l.full(s), 1);                // the producer's arrive.expect_tx
      mbar_init(l.empty(s), 8 * kCluster);    // every consumer warp of every CTA that reads the stage's B
    }
    fence_mbar_init();
  }
  if constexpr (kCluster == 1) {
    __syncthreads();
  } else {
    cluster_sync();  // the peer's barriers are initialized before any multicast or remote arrival reaches them
  }
  const Tiles<kCluster> tiles(p);
  if (threadIdx.x < 128) {
    if constexpr (kOverlap) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0) produce<kCluster>(p, l, tiles, rank);
  } else if constexpr (kOverlap) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    consume_overlapped<kCluster, kMode, L>(p, l, tiles, rank);
  } else {
    consume<kCluster, kMode, L>(p, l, tiles, rank);
  }
  if constexpr (kCluster == 2) {
    __syncwarp();
    cluster_sync();  // no CTA leaves while its peer may still multicast into it or arrive on its barriers
  }
}

#endif  // sm_90a

// The kernels (cluster dims are a compile-time attribute, so one kernel per cluster size).
template <int kMode, typename L, bool kOverlap = false>
__global__ void __launch_bounds__(kThreads, 1) logits_softmax_kernel_c1(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  logits_softmax_body<1, kMode, L, kOverlap>(p);
#endif
}
// The 2-CTA cluster kernel (measured: no faster than cluster 1; the micro keeps it). __cluster_dims__ does not
// compile for sm_80, which the library also builds: only programs that define SWIFTLORA_LS_CLUSTER_KERNEL get it.
#ifdef SWIFTLORA_LS_CLUSTER_KERNEL
template <int kMode, typename L>
__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(kThreads, 1)
    logits_softmax_kernel_c2(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  logits_softmax_body<2, kMode, L>(p);
#endif
}
#endif

}  // namespace swiftlora::cuda::logits_sm90
