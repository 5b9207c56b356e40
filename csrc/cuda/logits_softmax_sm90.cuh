// sm_90a: the logits GEMM of one vocabulary block with the online softmax in its epilogue, for a frozen LM head's
// block loop (lm_head_blocks_). P [M, width] (bf16) = e^{z − use}·scale with z = (hidden [M, K] · W[v0 .., K]ᵀ)·scale,
// where `use` is the row's reference max from the previous blocks (stats[row][0]) unless this 256-column tile's max
// passes it by more than `slack`; then the tile uses its own max and its partial says so (a "flagged" tile, which
// the merge kernel corrects). Per (row, tile) the kernel writes the partial (use, Σe, Σe·z, Σz) and, for the label's
// column, stats[row][4..5] = (z_label, scale), as online_softmax_block_'s lean kernel does. So the block costs the
// GEMM and a few MB of partials instead of the GEMM, a 32 MiB write of z and a 64 MiB read + write pass over it.
//
// CTA (384 threads, one per SM, persistent over 128-token × 256-column tiles):
//   warp 0, lane 0: TMA producer into a 3-stage ring (A = 128 hidden rows × 64 k, B = 256 W rows × 64 k, both
//     K-major with the 128-byte swizzle). With kCluster = 2 the two CTAs of a cluster take token tiles 2p and 2p + 1
//     of the same columns and each loads half of B, multicast into both CTAs (B's L2 traffic halves).
//   warpgroups 1 and 2: wgmma m64n256k16 with both operands in shared memory, 128 fp32 accumulators a thread; after a
//     tile's last k-tile they round z to bf16 into a 64 KB staging tile (stmatrix, XOR-swizzled rows) and go on with
//     the next tile at once.
//   warps 1..3: the epilogue, under the next tile's MMAs: one row of the staging tile a warp at a time (a lane holds
//     8 columns): row max, the reference decision, e, the row sums (warp shuffles), P stored 16 bytes a lane.
// Restrictions (the host checks them): bf16, width % 8 == 0, K % 8 == 0 (16-byte rows for TMA), M ≥ 1.
#pragma once
#include <cuda.h>  // CUtensorMap
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/tma_bulk.cuh"
#include "cuda/wgmma_sm90.cuh"

namespace swiftlora::cuda::logits_sm90 {

constexpr int kThreads = 384;
constexpr int kBM = 128, kBN = 256, kBK = 64;
#ifndef SWIFTLORA_LS_STAGES  // timing experiments only (bench/micro/logits_softmax)
#define SWIFTLORA_LS_STAGES 3
#endif
#ifndef SWIFTLORA_LS_STAGING_ROWS
#define SWIFTLORA_LS_STAGING_ROWS 128
#endif
constexpr int kStages = SWIFTLORA_LS_STAGES;
constexpr int kABytes = kBM * kBK * 2;            // 16384
constexpr int kBBytes = kBN * kBK * 2;            // 32768
constexpr int kStageBytes = kABytes + kBBytes;    // 49152
constexpr int kRowBytes = kBN * 2;                // a staging row: 256 bf16
constexpr int kOffStaging = kStages * kStageBytes;             // 147456
constexpr int kOffBars = kOffStaging + SWIFTLORA_LS_STAGING_ROWS * kRowBytes;  // 212992
constexpr int kNumBars = 2 * kStages + 2;                      // full, empty, staged, freed
constexpr int kSmemBytes = kOffBars + kNumBars * 8 + 1024;     // + slack to align the dynamic base to 1024
static_assert(kSmemBytes <= 232448, "fits the sm_90 227 KB opt-in");
constexpr int kEpiWarps = 3;  // warps 1..3 of warpgroup 0
constexpr int kModeCopy = 0;     // timing aid: the epilogue stores z itself (bf16), nothing else
constexpr int kModeSoftmax = 1;  // the op: P and the partials
constexpr int kModeDiscard = 2;  // timing aid: the accumulators are dropped (no staging, no epilogue)

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
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

using tma::fence_mbar_init;
using tma::mbar_arrive;
using tma::mbar_arrive_expect_tx;
using tma::mbar_init;
using tma::mbar_wait;
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

// K-major, 128B-swizzled operand tile (rows of 128 bytes, 8-row groups 1024 bytes apart).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
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

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

struct Smem {
  uint8_t* gen;   // generic pointer to the aligned base
  uint32_t base;  // its shared address
  __device__ __forceinline__ uint32_t a(int s) const { return base + s * kStageBytes; }
  __device__ __forceinline__ uint32_t b(int s) const { return base + s * kStageBytes + kABytes; }
  __device__ __forceinline__ uint32_t staging() const { return base + kOffStaging; }
  __device__ __forceinline__ uint32_t full(int s) const { return base + kOffBars + s * 8; }
  __device__ __forceinline__ uint32_t empty(int s) const { return base + kOffBars + (kStages + s) * 8; }
  __device__ __forceinline__ uint32_t staged() const { return base + kOffBars + 2 * kStages * 8; }
  __device__ __forceinline__ uint32_t freed() const { return base + kOffBars + (2 * kStages + 1) * 8; }
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

// Tile accumulators -> bf16 rows of the staging tile: row R's 16-byte chunk c at R·512 + ((c ^ (R % 8))·16)
// (stmatrix: conflict-free; the epilogue's row reads: conflict-free).
__device__ __forceinline__ void stage_tile(const Smem& l, float (&acc)[128], int cw, int wi, int lane) {
  const int q = lane >> 3, lr = lane & 7;
  const int row = 64 * cw + 16 * wi + 8 * (q & 1) + lr;
  const uint32_t rbase = l.staging() + row * kRowBytes;
  // chunk j + (q >> 1) with j = 8a + b (b even): its swizzled slot is 8a + ((b + (q >> 1)) ^ lr), so four offsets and
  // immediates 128·a make every address (keeping 32 addresses live across the tile loop spilled)
  uint32_t off[4];
#pragma unroll
  for (int b = 0; b < 4; ++b) off[b] = rbase + ((((2 * b) + (q >> 1)) ^ lr) << 4);
#pragma unroll
  for (int a = 0; a < 4; ++a) {  // 32 column blocks of 8 (4 accumulators each: 2 rows × 2 columns)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int j = 8 * a + 2 * b;
      uint32_t r[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // matrix i = (column block j + i/2, row half i%2)
        const int jj = j + (i >> 1), h = i & 1;
        r[i] = pack_bf16(acc[4 * jj + 2 * h], acc[4 * jj + 2 * h + 1]);
      }
      asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(off[b] + 128 * a),
                   "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
                   : "memory");
    }
  }
}

template <int kCluster, int kMode>
__device__ __forceinline__ void consume(const Params& p, const Smem& l, const Tiles<kCluster>& tiles) {
  const int cw = (threadIdx.x >> 7) - 1, wi = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int ktiles = (p.k + kBK - 1) / kBK;
  float acc[128];  // set by each tile's first MMA (scale_d = 0)
  auto release = [&](int s) {  // one arrival per warp, on the stage's empty barrier in every CTA of the cluster
    if (lane == 0) {
      if constexpr (kCluster == 1) {
        mbar_arrive(l.empty(s));
      } else {
        mbar_arrive_cluster(l.empty(s), 0);
        mbar_arrive_cluster(l.empty(s), 1);
      }
    }
  };
  int it = 0;
  for (int j = 0; j < tiles.count; ++j) {
    int kt = 0;
    do {  // at least one k-tile (K >= 1): with a possibly empty loop ptxas kept a path staging never-computed
          // accumulators and spilled (~240 bytes)
      const int s = it % kStages;
      mbar_wait(l.full(s), (it / kStages) & 1);
      const uint32_t a0 = l.a(s) + cw * (64 * 128), b0 = l.b(s);
      wgmma_fence();
#pragma unroll
      for (int k16 = 0; k16 < 4; ++k16) {
        wgmma_ss(acc, desc_sw128(a0 + 32 * k16), desc_sw128(b0 + 32 * k16), (kt > 0 || k16 > 0) ? 1u : 0u);
      }
      wgmma_commit();
      wgmma_wait<1>();  // k-tile it − 1 has completed: its stage may be refilled
      if (kt > 0) release((it - 1) % kStages);
      ++kt, ++it;
    } while (kt < ktiles);
    wgmma_wait<0>();
    pin(acc);
    release((it - 1) % kStages);
    if constexpr (kMode == kModeDiscard) {  // one data-dependent (never taken) store keeps the MMAs alive
      if (acc[0] + acc[127] == 1.2345e-30f) p.part[0].x = acc[64];
    } else {
      if (j > 0) mbar_wait(l.freed(), (j - 1) & 1);  // the epilogue warps are done with the previous tile
      stage_tile(l, acc, cw, wi, lane);
      __syncwarp();
      if (lane == 0) mbar_arrive(l.staged());
    }
  }
}

// Epilogue mapping: a warp takes 8 rows of the staging tile at a time, 4 lanes a row (lane = 4·ri + q); lane q holds
// the row's 16-byte chunks q, q + 4, ..., q + 28 (8 columns each). Row group g is rows 8g + ((ri >> 1) | (ri & 1) << 2):
// the two rows of each 8-lane phase of a 16-byte shared load differ in bit 2, so under the staging swizzle the phase
// touches 8 distinct bank groups. Row reductions are 2 shuffles. A row's reference max and label are loaded before
// the tile is staged (a global load inside the row loop put its latency on every row: 1.7x cuBLAS, first GPU run).
constexpr int kGroups = kBM / 8;
constexpr int kGroupsPerWarp = (kGroups + kEpiWarps - 1) / kEpiWarps;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ int group_row(int g, int ri) { return 8 * g + ((ri >> 1) | ((ri & 1) << 2)); }

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

struct RowIn {
  float ref;  // the row's reference max (stats[row][0])
  int lc;     // its label's column in the block, −1 if none (ignored, or in another block)
};

template <typename L>
__device__ __forceinline__ RowIn load_row_in(const Params& p, int grow) {
  RowIn in{0.f, -1};
  if (grow < p.m) {
    in.ref = p.stats[static_cast<int64_t>(grow) * 6];
    if (p.labels != nullptr) {
      const int64_t lab = static_cast<int64_t>(static_cast<const L*>(p.labels)[grow]);
      if (lab != p.ignore_index && lab >= p.col0 && lab < p.col0 + p.width) in.lc = static_cast<int>(lab - p.col0);
    }
  }
  return in;
}

// One row of the staged tile (tile row r, token row grow, block columns n0 + ..): this lane's 8 chunks.
template <int kMode>
__device__ __forceinline__ void epilogue_row(const Params& p, const uint8_t* stg, int r, int grow, int n0, int nt,
                                             int q, const RowIn& in) {
  const bool live = grow < p.m;
  uint4 raw[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    raw[i] = *reinterpret_cast<const uint4*>(stg + r * kRowBytes + (((q + 4 * i) ^ (r & 7)) << 4));
  }
  uint16_t* out = p.p + static_cast<int64_t>(grow) * p.ldp + n0 + 8 * q;
  auto valid = [&](int i) { return n0 + 8 * (q + 4 * i) < p.width; };  // a chunk is all valid or all not
  if constexpr (kMode == kModeCopy) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (live && valid(i)) *reinterpret_cast<uint4*>(out + 32 * i) = raw[i];
    }
  } else {
    // per pair: 2 conversions, 1 packed max, 2 adds (Σx); then 2 FFMA + 2 ex2 (P = e·scale straight from the
    // exponent), 2 adds, 2 FFMA (Σ P·x = Σ e·z) and one pack
    float x[8][8];
    uint32_t mw = 0xFF80FF80u;  // (−inf, −inf) in bf16
    float xs = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t w[4] = {raw[i].x, raw[i].y, raw[i].z, raw[i].w};
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        x[i][2 * h] = bf_lo(w[h]);
        x[i][2 * h + 1] = bf_hi(w[h]);
        if (valid(i)) {
          const __nv_bfloat162 m2 = __hmax2(*reinterpret_cast<const __nv_bfloat162*>(&mw),
                                            *reinterpret_cast<const __nv_bfloat162*>(&w[h]));
          mw = *reinterpret_cast<const uint32_t*>(&m2);
          xs += x[i][2 * h] + x[i][2 * h + 1];
        }
      }
    }
    // scale > 0 (the host's condition): max(x·scale) = max(x)·scale, both rounded the same way
    const float cm = __fmul_rn(quad_max(fmaxf(bf_lo(mw), bf_hi(mw))), p.scale);
    const float use = cm > in.ref + p.slack ? cm : in.ref;  // ref = −inf: the tile's own max
    const float u3 = use * kLog2e - p.log2_scale;
    float s = 0.f, sx = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      uint32_t o[4];
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const float x0 = x[i][2 * h], x1 = x[i][2 * h + 1];
        const float p0 = valid(i) ? ex2(fmaf(x0, p.c_exp, -u3)) : 0.f;
        const float p1 = valid(i) ? ex2(fmaf(x1, p.c_exp, -u3)) : 0.f;
        s += p0 + p1;
        sx = fmaf(p0, x0, fmaf(p1, x1, sx));
        o[h] = pack_bf16(p0, p1);
      }
      if (live && valid(i)) *reinterpret_cast<uint4*>(out + 32 * i) = make_uint4(o[0], o[1], o[2], o[3]);
    }
    const int rel = in.lc - n0;  // the label's column inside this tile, if it is there
    if (live && rel >= 0 && rel < kBN && ((rel >> 3) & 3) == q) {
      const int il = rel >> 5, e = rel & 7;
      uint4 v = raw[0];
#pragma unroll
      for (int i = 1; i < 8; ++i) v = il == i ? raw[i] : v;  // selects, not a local-memory index
      const uint32_t wl = e < 4 ? (e < 2 ? v.x : v.y) : (e < 6 ? v.z : v.w);
      float* st = p.stats + static_cast<int64_t>(grow) * 6;
      st[4] = __fmul_rn((e & 1) ? bf_hi(wl) : bf_lo(wl), p.scale);
      st[5] = p.scale;
    }
    s = quad_sum(s);
    sx = quad_sum(sx);
    xs = quad_sum(xs);
    if (live && q == 0) {
      // Σe = Σ P / scale; Σ e·z = Σ P·x (P = e·scale, z = x·scale)
      p.part[static_cast<int64_t>(grow) * p.tiles_n + nt] = make_float4(use, s / p.scale, sx, xs * p.scale);
    }
  }
}

template <int kCluster, int kMode, typename L>
__device__ __forceinline__ void epilogue(const Params& p, const Smem& l, const Tiles<kCluster>& tiles, uint32_t rank) {
  const int ew = (threadIdx.x >> 5) - 1, lane = threadIdx.x & 31, ri = lane >> 2, q = lane & 3;
  const uint8_t* stg = l.gen + kOffStaging;
  for (int j = 0; j < tiles.count; ++j) {
    const int2 t = tiles.at(j, rank);
    const int nt = t.y / kBN;
    RowIn in[kGroupsPerWarp];
#pragma unroll
    for (int k = 0; k < kGroupsPerWarp; ++k) {
      const int g = ew + kEpiWarps * k;
      in[k] = RowIn{0.f, -1};
      if (kMode == kModeSoftmax && g < kGroups) in[k] = load_row_in<L>(p, t.x + group_row(g, ri));
    }
    mbar_wait(l.staged(), j & 1);
#pragma unroll
    for (int k = 0; k < kGroupsPerWarp; ++k) {
      const int g = ew + kEpiWarps * k;
      if (g < kGroups) {
        const int r = group_row(g, ri);
        epilogue_row<kMode>(p, stg, r, t.x + r, t.y, nt, q, in[k]);
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(l.freed());
  }
}

template <int kCluster, int kMode, typename L>
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
    mbar_init(l.staged(), 8);          // the consumer warps
    mbar_init(l.freed(), kEpiWarps);   // the epilogue warps
    fence_mbar_init();
  }
  if constexpr (kCluster == 1) {
    __syncthreads();
  } else {
    cluster_sync();  // the peer's barriers are initialized before any multicast or remote arrival reaches them
  }
  const Tiles<kCluster> tiles(p);
  const int warp = threadIdx.x >> 5;
  if (warp == 0) {
    if ((threadIdx.x & 31) == 0) produce<kCluster>(p, l, tiles, rank);
  } else if (warp < 4) {
    if constexpr (kMode != kModeDiscard) epilogue<kCluster, kMode, L>(p, l, tiles, rank);
  } else {
    consume<kCluster, kMode>(p, l, tiles);
  }
  if constexpr (kCluster == 2) {
    __syncwarp();
    cluster_sync();  // no CTA leaves while its peer may still multicast into it or arrive on its barriers
  }
}

#endif  // sm_90a

// The kernels (cluster dims are a compile-time attribute, so one kernel per cluster size).
template <int kMode, typename L>
__global__ void __launch_bounds__(kThreads, 1) logits_softmax_kernel_c1(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  logits_softmax_body<1, kMode, L>(p);
#endif
}
template <int kMode, typename L>
__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(kThreads, 1)
    logits_softmax_kernel_c2(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  logits_softmax_body<2, kMode, L>(p);
#endif
}

}  // namespace swiftlora::cuda::logits_sm90
