// online_softmax_block_ on the GPU (see csrc/cpu/online_softmax.cpp for what it computes). One 256-thread block per
// row of the vocabulary block; each thread holds up to kBlockVecs 16-byte vectors of the row in registers (as
// single elements when rows are not 16-byte aligned), so the row is read once and written once (plus pz when asked) whatever the two reductions (max, then Σe) need.
// Floor: N·B·E read + N·B·E written (×2 written with pz); the block was just written by the logits GEMM, so much of
// it comes from L2. With g_rescale, the row's CTA also scales its row of g (and gz) [N, H] float32, which costs a
// load of the factor when it is exactly 1 (almost always: lm_head_blocks_ passes the previous block's rescale).
#include <ATen/ops/empty.h>
#include <cstdlib>
#include <string>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/online_softmax.h"
#include "ops.h"
#include "softmax_row.cuh"

namespace swiftlora::cuda {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kBlockVecs = 4;  // 16-byte vectors a thread holds: B ≤ 256·4·VEC (8192 for 16-bit, 4096 for fp32)
constexpr int kMinBlocksPerSM = 4;  // ≤ 64 registers: measured 63 µs a [2048, 8192] bf16 block at 2 blocks/SM

// Two block-wide reductions at once (one pair of barriers): (max, sum) or (sum, sum). scratch: 2·32 floats.
template <bool kFirstIsMax>
__device__ __forceinline__ float2 block_reduce2(float2 v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float x = __shfl_xor_sync(0xffffffffu, v.x, o), y = __shfl_xor_sync(0xffffffffu, v.y, o);
    v.x = kFirstIsMax ? fmaxf(v.x, x) : v.x + x;
    v.y += y;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read by the previous reduction
  if (lane == 0) scratch[warp] = v.x, scratch[32 + warp] = v.y;
  __syncthreads();
  constexpr int kWarps = kBlockThreads / 32;
  v = lane < kWarps ? make_float2(scratch[lane], scratch[32 + lane]) : make_float2(kFirstIsMax ? kNegInf : 0.f, 0.f);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float x = __shfl_xor_sync(0xffffffffu, v.x, o), y = __shfl_xor_sync(0xffffffffu, v.y, o);
    v.x = kFirstIsMax ? fmaxf(v.x, x) : v.x + x;
    v.y += y;
  }
  return v;
}

// The row's block-wide (Σe, Σe·z), then the carried statistics and the rescale factor, by thread 0.
__device__ __forceinline__ void finish_row(float s, float spz, float m, float r, float zsum, float* st,
                                           float* rescale, float* scratch) {
  const float2 sums = block_reduce2<false>(make_float2(s, spz), scratch);
  if (threadIdx.x == 0) {
    st[0] = m;
    st[1] = st[1] * r + sums.x;
    st[2] += zsum;
    st[3] = st[3] * r + sums.y;
    *rescale = r;
  }
}

// Row `row` of g (and gz) [N, h] times s, as scale_rows_ does it (one float32 multiply). Called only for a factor
// other than 1, which is uniform per CTA. Not inlined: inlined, its loop made ptxas spill twice as much in the
// unaligned 16-bit kernels (~136 -> ~290 bytes; ptxas -v), although it runs after the row's work.
__device__ __noinline__ void rescale_row(float* __restrict__ g, float* __restrict__ gz, int64_t row, int h,
                                         float s) {
  float* gr = g + row * h;
  float* gzr = gz == nullptr ? nullptr : gz + row * h;
  for (int k = static_cast<int>(threadIdx.x); k < h; k += kBlockThreads) {
    gr[k] = gr[k] * s;
    if (gzr != nullptr) gzr[k] = gzr[k] * s;
  }
}

// z (and dz) as Transform gives them, but x·scale rounded on its own, never contracted into the add that follows,
// whose contraction the compiler may choose differently here and in the lean kernel below; the two must agree bitwise.
__device__ __forceinline__ float block_z(const Transform& f, float x, float& dz) {
  if (f.cap > 0.f) return f.z_and_dz(x, dz);
  dz = f.scale;
  return __fmul_rn(x, f.scale);
}

// NV vectors of VEC elements a thread: 16-byte vectors, or single elements (NV 8x larger) for unaligned rows.
template <typename T, typename L, int VEC, int NV, bool kPz>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    online_softmax_block_kernel(T* x, int64_t x_stride, T* pz, int64_t pz_stride, const L* __restrict__ labels,
                                int64_t col0, int64_t ignore_index, int b, Transform f, float max_slack,
                                float* __restrict__ stats, float* __restrict__ rescale, float* __restrict__ g,
                                float* __restrict__ gz, const float* __restrict__ g_rescale, int h) {
  __shared__ float scratch[64], g_scale;
  const int64_t row = blockIdx.x;
  T* xr = x + row * x_stride;
  float* st = stats + row * kOnlineStats;
  const float m_old = st[0];  // loaded early: its latency hides behind the row's
  const float gs = g_rescale != nullptr && threadIdx.x == 0 ? g_rescale[row] : 1.f;  // likewise, by one thread
  int label = -1;  // the label's column inside this block
  if (labels != nullptr) {
    const int64_t l = static_cast<int64_t>(labels[row]);
    if (l != ignore_index && l >= col0 && l < col0 + b) label = static_cast<int>(l - col0);
  }
  constexpr int kStep = kBlockThreads * VEC;
  const int c0 = static_cast<int>(threadIdx.x) * VEC;

  Vec<T, VEC> xv[NV];
#pragma unroll
  for (int u = 0; u < NV; ++u) {
    const int c = c0 + u * kStep;
    if (c + VEC <= b) {
      xv[u] = load_vec<T, VEC>(xr + c);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) xv[u].v[j] = c + j < b ? xr[c + j] : T(0);
    }
  }
  if (threadIdx.x == 0) g_scale = gs;  // read after the reductions' barriers
  float bm = kNegInf, zsum = 0.f;
#pragma unroll
  for (int u = 0; u < NV; ++u) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (c0 + u * kStep + j < b) {
        float dz;
        const float z = block_z(f, static_cast<float>(xv[u].v[j]), dz);
        bm = fmaxf(bm, z);
        zsum += z;
      }
    }
  }
  const float2 mz = block_reduce2<true>(make_float2(bm, zsum), scratch);
  const float m = online_reference_max(m_old, mz.x, max_slack);
  const float r = m_old == kNegInf ? 0.f : (m == m_old ? 1.f : __expf(m_old - m));

  float s = 0.f, spz = 0.f;
#pragma unroll
  for (int u = 0; u < NV; ++u) {
    const int c = c0 + u * kStep;
    Vec<T, VEC> p, q;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float dz;
      const float z = block_z(f, static_cast<float>(xv[u].v[j]), dz);
      const float e = (c + j < b && m != kNegInf) ? __expf(z - m) : 0.f;
      s += e;
      spz = fmaf(e, z, spz);  // the fma written out, as in the lean kernel
      if (c + j == label) st[4] = z, st[5] = dz;  // one thread of the block owns the label's column
      p.v[j] = static_cast<T>(e * dz);
      if constexpr (kPz) q.v[j] = static_cast<T>(e * z * dz);
    }
    if (c + VEC <= b) {
      store_vec<T, VEC>(xr + c, p);
      if constexpr (kPz) store_vec<T, VEC>(pz + row * pz_stride + c, q);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (c + j < b) {
          xr[c + j] = p.v[j];
          if constexpr (kPz) pz[row * pz_stride + c + j] = q.v[j];
        }
      }
    }
  }
  finish_row(s, spz, m, r, mz.y, st, rescale + row, scratch);
  if (g_scale != 1.f) rescale_row(g, gz, row, h, g_scale);  // 1 without g
}

// The common case with the fewest instructions per element: no soft-cap (z = x·scale, dz = scale), no pz, 16-byte
// vectors, B a multiple of the vector. Same arithmetic in the same order as the kernel above (bit-identical results,
// tests/ops/test_lm_head_blocks.py); what goes is the per-element work that case does not need: bounds checks
// (whole vectors instead), the label compare (the label's owner reads the raw logit before the row is overwritten
// and writes (z, dz) at the end) and the soft-cap selects. The general kernel took ~27.8 µs per [2048, 8192] bf16
// block (2.4 TB/s; bench/NOTES.md), ~2 ms of token_logprobs' forward + backward.
template <typename T, typename L>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    online_softmax_block_lean_kernel(T* x, int64_t x_stride, const L* __restrict__ labels, int64_t col0,
                                     int64_t ignore_index, int b, float scale, float max_slack,
                                     float* __restrict__ stats, float* __restrict__ rescale, float* __restrict__ g,
                                     float* __restrict__ gz, const float* __restrict__ g_rescale, int h) {
  constexpr int VEC = 16 / sizeof(T), NV = kBlockVecs, kStep = kBlockThreads * VEC;
  __shared__ float scratch[64], g_scale;
  const int64_t row = blockIdx.x;
  T* xr = x + row * x_stride;
  float* st = stats + row * kOnlineStats;
  const float m_old = st[0];
  const float gs = g_rescale != nullptr && threadIdx.x == 0 ? g_rescale[row] : 1.f;
  const int c0 = static_cast<int>(threadIdx.x) * VEC;
  Vec<T, VEC> xv[NV];
#pragma unroll
  for (int u = 0; u < NV; ++u) {
    if (c0 + u * kStep < b) xv[u] = load_vec<T, VEC>(xr + c0 + u * kStep);
  }
  if (threadIdx.x == 0) g_scale = gs;
  int label = -1;  // the label's column inside this block, kept by the thread that stores it
  float x_label = 0.f;
  if (labels != nullptr) {
    const int64_t l = static_cast<int64_t>(labels[row]);
    if (l != ignore_index && l >= col0 && l < col0 + b && (l - col0) % kStep / VEC == threadIdx.x) {
      label = static_cast<int>(l - col0);
      x_label = static_cast<float>(xr[label]);  // before this thread overwrites the column
    }
  }
  float bm = kNegInf, zsum = 0.f;
#pragma unroll
  for (int u = 0; u < NV; ++u) {
    if (c0 + u * kStep < b) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float z = __fmul_rn(static_cast<float>(xv[u].v[j]), scale);
        bm = fmaxf(bm, z);
        zsum += z;
      }
    }
  }
  const float2 mz = block_reduce2<true>(make_float2(bm, zsum), scratch);
  const float m = online_reference_max(m_old, mz.x, max_slack);
  const float r = m_old == kNegInf ? 0.f : (m == m_old ? 1.f : __expf(m_old - m));
  const bool live = m != kNegInf;
  float s = 0.f, spz = 0.f;
#pragma unroll
  for (int u = 0; u < NV; ++u) {
    const int c = c0 + u * kStep;
    if (c < b) {
      Vec<T, VEC> p;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float z = __fmul_rn(static_cast<float>(xv[u].v[j]), scale);
        const float e = live ? __expf(z - m) : 0.f;
        s += e;
        spz = fmaf(e, z, spz);
        p.v[j] = static_cast<T>(e * scale);
      }
      store_vec<T, VEC>(xr + c, p);
    }
  }
  if (label >= 0) st[4] = __fmul_rn(x_label, scale), st[5] = scale;
  finish_row(s, spz, m, r, mz.y, st, rescale + row, scratch);
  if (g_scale != 1.f) rescale_row(g, gz, row, h, g_scale);  // 1 without g
}

// SWIFTLORA_SOFTMAX_BLOCK_VARIANT, a benchmarking knob read on every call: "lean" (default: the kernel above where
// it applies) or "general".
bool lean_kernel_allowed() {
  const char* env = std::getenv("SWIFTLORA_SOFTMAX_BLOCK_VARIANT");
  if (env == nullptr || *env == '\0') return true;
  const std::string v(env);
  TORCH_CHECK(v == "lean" || v == "general", "SWIFTLORA_SOFTMAX_BLOCK_VARIANT must be lean or general, got '", v,
              "'");
  return v == "lean";
}

at::Tensor online_softmax_block_cuda(at::Tensor& block, at::Tensor& stats, const std::optional<at::Tensor>& labels_in,
                                     const std::optional<at::Tensor>& pz, int64_t col0, int64_t ignore_index,
                                     double softcap, double logit_scale, const std::optional<at::Tensor>& g,
                                     const std::optional<at::Tensor>& gz, const std::optional<at::Tensor>& g_rescale) {
  constexpr const char* op = "online_softmax_block_";
  check_online_softmax_block_args(block, stats, labels_in, pz, col0, softcap, logit_scale, g, gz, g_rescale);
  const c10::cuda::CUDAGuard guard(block.device());
  const int64_t n = block.size(0), b = block.size(1);
  const int64_t cap = kBlockThreads * kBlockVecs * (16 / block.element_size());
  TORCH_CHECK_VALUE(b <= cap, op, ": on CUDA a block has at most ", cap, " columns for ", block.scalar_type(),
                    ", got ", b);
  TORCH_CHECK_VALUE(n <= std::numeric_limits<int>::max(), op, ": too many rows (", n, ")");
  const int64_t h = g.has_value() ? g->size(1) : 0;
  TORCH_CHECK_VALUE(h <= std::numeric_limits<int>::max(), op, ": g has too many columns (", h, ")");
  float* gp = g.has_value() ? g->mutable_data_ptr<float>() : nullptr;
  float* gzp = gz.has_value() ? gz->mutable_data_ptr<float>() : nullptr;
  const float* grp = g_rescale.has_value() ? g_rescale->const_data_ptr<float>() : nullptr;
  at::Tensor rescale = at::empty({n}, stats.options());
  const std::optional<at::Tensor> labels =
      labels_in.has_value() ? std::optional<at::Tensor>(labels_in->contiguous()) : std::nullopt;
  const bool aligned = aligned_to(block.const_data_ptr(), 16) && (block.stride(0) * block.element_size()) % 16 == 0 &&
                       (!pz.has_value() || (aligned_to(pz->const_data_ptr(), 16) &&
                                            (pz->stride(0) * pz->element_size()) % 16 == 0));
  const Transform f{static_cast<float>(logit_scale), static_cast<float>(softcap),
                    softcap > 0 ? static_cast<float>(1.0 / softcap) : 0.f};
  SWIFTLORA_DISPATCH_FLOAT(block.scalar_type(), "online_softmax_block_cuda", [&] {
    using T = scalar_t;
    constexpr int kVec = 16 / sizeof(T);
    auto launch = [&](auto label_tag, auto with_pz, auto vec) {
      using L = decltype(label_tag);
      constexpr int VEC = decltype(vec)::value;
      const L* lp = labels.has_value() ? labels->const_data_ptr<L>() : nullptr;
      online_softmax_block_kernel<T, L, VEC, kBlockVecs * kVec / VEC, decltype(with_pz)::value>
          <<<static_cast<unsigned>(n), kBlockThreads, 0, current_stream()>>>(
              block.mutable_data_ptr<T>(), block.stride(0), pz.has_value() ? pz->mutable_data_ptr<T>() : nullptr,
              pz.has_value() ? pz->stride(0) : 0, lp, col0, ignore_index, static_cast<int>(b), f,
              online_max_slack(block.scalar_type()), stats.mutable_data_ptr<float>(), rescale.mutable_data_ptr<float>(),
              gp, gzp, grp, static_cast<int>(h));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto with_vec = [&](auto label_tag, auto with_pz) {
      if (aligned) {
        launch(label_tag, with_pz, std::integral_constant<int, kVec>{});
      } else {
        launch(label_tag, with_pz, std::integral_constant<int, 1>{});
      }
    };
    const bool lean = !pz.has_value() && softcap == 0.0 && aligned && b % kVec == 0 && lean_kernel_allowed();
    auto launch_lean = [&](auto label_tag) {
      using L = decltype(label_tag);
      online_softmax_block_lean_kernel<T, L><<<static_cast<unsigned>(n), kBlockThreads, 0, current_stream()>>>(
          block.mutable_data_ptr<T>(), block.stride(0), labels.has_value() ? labels->const_data_ptr<L>() : nullptr,
          col0, ignore_index, static_cast<int>(b), f.scale, online_max_slack(block.scalar_type()),
          stats.mutable_data_ptr<float>(), rescale.mutable_data_ptr<float>(), gp, gzp, grp, static_cast<int>(h));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto with_labels = [&](auto with_pz) {
      const bool i32 = labels.has_value() && labels->scalar_type() == at::kInt;
      if (lean) {
        i32 ? launch_lean(int32_t{}) : launch_lean(int64_t{});
      } else if (i32) {
        with_vec(int32_t{}, with_pz);
      } else {
        with_vec(int64_t{}, with_pz);
      }
    };
    if (pz.has_value()) {
      with_labels(std::true_type{});
    } else {
      with_labels(std::false_type{});
    }
  });
  return rescale;
}

}  // namespace
}  // namespace swiftlora::cuda

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) { m.impl("online_softmax_block_", &swiftlora::cuda::online_softmax_block_cuda); }
