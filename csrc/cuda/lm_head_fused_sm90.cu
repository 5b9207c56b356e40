// lm_head_blocks_ on sm_90a with the online softmax inside the logits GEMM (see lm_head_fused.h for the scheme and
// csrc/cuda/logits_softmax_sm90.cuh for the kernel). Per vocabulary block j >= 1 (2·cols columns each):
//   1. the fused GEMM: P_j = e^{z − m_ref}·scale into the block buffer (m_ref: stats[:, 0], block 0's max unless a
//      tile moved it) and per (row, 256-column tile) the partial (use, Σe, Σe·z, Σz) — no logits in memory, no
//      softmax pass over them (bench/NOTES.md, "Session 10");
//   2. cuBLAS: G += P_j @ W_j in float32, as in the host loop;
//   3. the merge (lm_head_merge_kernel): per row, the partials into stats; a tile whose max passed m_ref by more than
//      kFusedSlack used its own max instead (its "use" differs from m_ref): the row's reference moves to the largest
//      such max M, the row's sums are rescaled, and G's row is corrected: G = r·G + Σ_f (e^{use_f − M} − r)·(P_f·W_f)
//      with r = e^{m_ref − M} (rare: a later block beating block 0's best logit by 32).
// The statistics are those of online_softmax_block_ up to the reference max (any reference gives the same
// lse = m + log s and the same G / s); sums the caller did not ask for (`sums`) are left unspecified.
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "common/aten_compat.h"
#include "common/cuda_utils.cuh"
#include "common/smem_optin.cuh"
#include "cuda/lm_head_fused.h"
#include "cuda/logits_softmax_sm90.cuh"
#include "cuda/tensor_map.h"
#include "ops.h"

namespace swiftlora::cuda {
namespace {

namespace ls = logits_sm90;

// How far a tile's max may pass the row's reference before the tile uses its own: P = e^{z − m_ref}·scale stays
// below e^32·scale (bf16 and the float32 sums have the room), and tiles almost never need the correction.
constexpr float kFusedSlack = 32.f;
constexpr int kMergeRows = 8;  // rows (warps) per merge CTA

// One warp per row: the block's partials into the row's statistics, and G's row corrected for flagged tiles.
// p: the block's P [rows, ldp] (bf16), w: the block's first W row [width, h].
__global__ void __launch_bounds__(32 * kMergeRows)
    lm_head_merge_kernel(float* __restrict__ stats, const float4* __restrict__ part, int tiles_n, int rows,
                         float* __restrict__ g, int h, const __nv_bfloat16* __restrict__ p, int64_t ldp,
                         const __nv_bfloat16* __restrict__ w, int width, int sums) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kMergeRows + (threadIdx.x >> 5);
  if (row >= rows) return;
  float* st = stats + static_cast<int64_t>(row) * 6;
  const float m_old = st[0];
  const float4* pr = part + static_cast<int64_t>(row) * tiles_n;
  float mx = m_old;
  bool flagged = false;
  for (int t = lane; t < tiles_n; t += 32) {
    const float u = pr[t].x;
    if (u != m_old) flagged = true, mx = fmaxf(mx, u);
  }
  const float m_new = warp_max(mx);
  const bool any = __any_sync(0xffffffffu, flagged);
  const float r = m_new == m_old ? 1.f : (m_old == -INFINITY ? 0.f : __expf(m_old - m_new));
  float s = 0.f, spz = 0.f, zs = 0.f;
  for (int t = lane; t < tiles_n; t += 32) {
    const float4 q = pr[t];
    const float f = q.x == m_old ? r : __expf(q.x - m_new);
    s = fmaf(f, q.y, s);
    spz = fmaf(f, q.z, spz);
    zs += q.w;
  }
  s = warp_sum(s);
  spz = warp_sum(spz);
  zs = warp_sum(zs);
  if (lane == 0) {
    st[0] = m_new;
    st[1] = fmaf(r, st[1], s);
    if (sums & ls::kSumZ) st[2] += zs;
    if (sums & ls::kSumEz) st[3] = fmaf(r, st[3], spz);
  }
  if (!any) return;
  // G's row: r·G + Σ_f (e^{use_f − m_new} − r)·F_f, F_f = Σ_{k in tile f} P[row, k]·W[k, :]; 8 columns a lane
  float* gr = g + static_cast<int64_t>(row) * h;
  const __nv_bfloat16* prow = p + static_cast<int64_t>(row) * ldp;
  for (int c0 = 8 * lane; c0 < h; c0 += 256) {
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = r * gr[c0 + i];
    for (int t = 0; t < tiles_n; ++t) {
      const float u = pr[t].x;
      if (u == m_old) continue;
      const float coef = __expf(u - m_new) - r;
      float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      const int k1 = min(width, (t + 1) * ls::kBN);
      for (int k = t * ls::kBN; k < k1; ++k) {
        const float pk = __bfloat162float(prow[k]);
        const uint4 wv = *reinterpret_cast<const uint4*>(w + static_cast<int64_t>(k) * h + c0);
        const uint32_t ww[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          f[2 * i] = fmaf(pk, __uint_as_float(ww[i] << 16), f[2 * i]);
          f[2 * i + 1] = fmaf(pk, __uint_as_float(ww[i] & 0xFFFF0000u), f[2 * i + 1]);
        }
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = fmaf(coef, f[i], acc[i]);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) gr[c0 + i] = acc[i];
  }
}

bool rows16(const at::Tensor& t) {  // TMA: 16-byte aligned base and row pitch, unit column stride
  return t.dim() == 2 && t.stride(1) == 1 && (t.stride(0) * 2) % 16 == 0 && aligned_to(t.const_data_ptr(), 16);
}

#ifdef SWIFTLORA_WITH_SM90A
template <typename L>
void launch_fused(const ls::Params& p, int grid) {
  auto kernel = ls::logits_softmax_kernel_c1<ls::kModeSoftmax, L, true>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, ls::kSmemBytes));
  kernel<<<grid, ls::kThreads, ls::kSmemBytes, current_stream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace

bool lm_head_fused_supported(const at::Tensor& hc, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& gz, double softcap, double logit_scale) {
#ifndef SWIFTLORA_WITH_SM90A
  return false;
#else
  const char* env = std::getenv("SWIFTLORA_LM_HEAD_FUSED");  // "0": the host loop (A/B runs, bisecting)
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (hc.dim() != 2 || weight.dim() != 2) return false;  // the host loop's checks then name what is wrong
  if (!hc.is_cuda() || hc.scalar_type() != at::kBFloat16 || weight.scalar_type() != at::kBFloat16) return false;
  if (bias.has_value() || gz.has_value() || softcap != 0.0 || !(logit_scale > 0.0) || !std::isfinite(logit_scale)) {
    return false;
  }
  const int64_t h = hc.size(1);
  if (h % 8 != 0 || ceil_div(h, ls::kBK) <= ls::kSlices || h > std::numeric_limits<int>::max()) return false;
  if (hc.size(0) > std::numeric_limits<int>::max() || weight.size(0) > std::numeric_limits<int>::max()) return false;
  if (!rows16(hc) || !rows16(weight)) return false;
  if (weight.size(0) % 8 != 0) return false;  // every block's width a multiple of 8 (16-byte P rows; the
                                                // epilogue's column blocks are all valid or all not)
  return device_major() == 9 && cached_attribute(cudaDevAttrComputeCapabilityMinor) == 0;
#endif
}

void lm_head_blocks_fused(const at::Tensor& hc, const at::Tensor& weight, const std::optional<at::Tensor>& labels_in,
                          at::Tensor& stats, at::Tensor& g, int64_t cols, int64_t ignore_index, double logit_scale,
                          int64_t sums) {
  cols = std::min(cols, weight.size(0));
  cols = std::max<int64_t>(8, cols / 8 * 8);  // widths a multiple of 8 (block_plan gives multiples of 256)
#ifndef SWIFTLORA_WITH_SM90A
  TORCH_CHECK(false, "lm_head_blocks_: this build has no sm_90a kernels");
#else
  const c10::cuda::CUDAGuard guard(hc.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t c = hc.size(0), h = hc.size(1), vocab = weight.size(0);
  const std::optional<at::Tensor> labels =
      labels_in.has_value() ? std::optional<at::Tensor>(labels_in->contiguous()) : std::nullopt;
  // One buffer of the host loop's two (the same memory): block j + 1's kernel runs after block j's accumulation
  // and merge have read P_j, so the blocks after the first can be twice as wide (half the launches and merges).
  // Block 0 keeps `cols` columns (online_softmax_block_'s row limit).
  const int64_t wide = std::min(2 * cols, vocab);
  const at::Tensor buf = at::empty({c * wide}, hc.options());

  // block 0: cuBLAS and online_softmax_block_ set the statistics (and the reference max), G = P_0 @ W_0
  const int64_t w0 = std::min(cols, vocab);
  at::Tensor block0 = buf.narrow(0, 0, c * w0).view({c, w0});
  const at::Tensor wt0 = weight.narrow(0, 0, w0);
  at::mm_out(block0, hc, wt0.t());
  reset_online_stats(stats);
  online_softmax_block_call(block0, stats, labels, std::nullopt, 0, ignore_index, 0.0, logit_scale, std::nullopt,
                            std::nullopt, std::nullopt);
  compat::addmm_fp32_(g, block0, wt0, true, 0.0);
  if (w0 == vocab) return;

  const int64_t tiles_max = ceil_div(wide, ls::kBN);
  const at::Tensor part = at::empty({c, tiles_max, 4}, stats.options());
  ls::Params p{};
  p.ta = tensor_map_2d(hc.const_data_ptr(), CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, h, c, hc.stride(0) * 2, ls::kBK, ls::kBM,
                       CU_TENSOR_MAP_SWIZZLE_128B);
  p.tb = tensor_map_2d(weight.const_data_ptr(), CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, h, vocab, weight.stride(0) * 2,
                       ls::kBK, ls::kBN, CU_TENSOR_MAP_SWIZZLE_128B);
  p.stats = stats.mutable_data_ptr<float>();
  p.part = reinterpret_cast<float4*>(part.mutable_data_ptr<float>());
  p.labels = labels.has_value() ? labels->const_data_ptr() : nullptr;
  p.ignore_index = ignore_index;
  p.m = static_cast<int>(c), p.k = static_cast<int>(h);
  p.tiles_m = static_cast<int>(ceil_div(c, ls::kBM));
  p.scale = static_cast<float>(logit_scale), p.slack = kFusedSlack;
  p.c_exp = static_cast<float>(logit_scale * 1.4426950408889634);
  p.log2_scale = static_cast<float>(std::log2(logit_scale));
  p.sums = static_cast<int>(sums & (ls::kSumZ | ls::kSumEz));
  const bool i32 = labels.has_value() && labels->scalar_type() == at::kInt;
  for (int64_t v0 = w0; v0 < vocab; v0 += wide) {
    const int64_t width = std::min(wide, vocab - v0);
    at::Tensor block = buf.narrow(0, 0, c * width).view({c, width});
    p.p = reinterpret_cast<uint16_t*>(block.mutable_data_ptr());
    p.ldp = width;
    p.col0 = v0, p.v0 = static_cast<int>(v0), p.width = static_cast<int>(width);
    p.tiles_n = static_cast<int>(ceil_div(width, ls::kBN));
    const int grid = static_cast<int>(std::min<int64_t>(int64_t{p.tiles_m} * p.tiles_n, sm_count()));
    i32 ? launch_fused<int32_t>(p, grid) : launch_fused<int64_t>(p, grid);
    const at::Tensor wt = weight.narrow(0, v0, width);
    compat::addmm_fp32_(g, block, wt, true, 1.0);
    lm_head_merge_kernel<<<static_cast<unsigned>(ceil_div(c, kMergeRows)), 32 * kMergeRows, 0, current_stream()>>>(
        stats.mutable_data_ptr<float>(), reinterpret_cast<const float4*>(part.const_data_ptr<float>()), p.tiles_n,
        static_cast<int>(c), g.mutable_data_ptr<float>(), static_cast<int>(h),
        reinterpret_cast<const __nv_bfloat16*>(block.const_data_ptr()), width,
        reinterpret_cast<const __nv_bfloat16*>(wt.const_data_ptr()), static_cast<int>(width), p.sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
#endif
}

}  // namespace swiftlora::cuda
