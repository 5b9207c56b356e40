// GGUF block quantization on CUDA: rows of x (float32/float16/bfloat16) -> GGUF bytes, byte-identical to the CPU
// kernel and to llama.cpp's reference quantizer. Both backends run the same per-block arithmetic
// (csrc/common/gguf_*quant_math.h, compiled here with -fmad=false so no multiply-add is fused).
// Floor: read n elements, write n·bytes_per_block/block bytes (e.g. 2 + 0.56 bytes per bf16 weight for Q4_K).
// Launch:
//   Q4_0..Q8_0: one thread per 32-element block (16-byte vector loads when rows are aligned), 256-thread blocks;
//     the block's output (contiguous) is staged in shared memory and stored with 16-byte writes.
//   K-quants: one thread per sub-block (8 per super-block for Q4_K/Q5_K, 16 for Q2_K/Q3_K/Q6_K), 128-thread
//     blocks. The sub-block searches are independent; the super-block maxima are exact warp-shuffle reductions (a
//     max, or for Q3_K/Q6_K the first scale of largest magnitude, found by (|s|, index) comparison), so every
//     value matches the CPU's sequential loop. Codes go through shared memory; each output byte is then written by
//     one thread of the super-block's group (consecutive threads, consecutive bytes).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/gguf_kquant_math.h"
#include "ops.h"

namespace swiftlora::cuda {
namespace {

using namespace swiftlora::gguf;

constexpr int kLegacyThreads = 256;
constexpr int kKThreads = 128;

// N consecutive elements from src, widened to float (16-byte vector loads when VEC).
template <typename T, int N, bool VEC>
__device__ __forceinline__ void load_floats(const T* __restrict__ src, float* x) {
  if constexpr (VEC) {
    constexpr int kPer = 16 / sizeof(T);
    SWIFTLORA_UNROLL
    for (int v = 0; v < N / kPer; ++v) {
      const Vec<T, kPer> vec = load_vec_stream<T, kPer>(src + v * kPer);
      SWIFTLORA_UNROLL
      for (int j = 0; j < kPer; ++j) x[v * kPer + j] = static_cast<float>(vec.v[j]);
    }
  } else {
    SWIFTLORA_UNROLL
    for (int j = 0; j < N; ++j) x[j] = static_cast<float>(src[j]);
  }
}

template <int QT, typename T, bool VEC>
__global__ void __launch_bounds__(kLegacyThreads) legacy_kernel(const T* __restrict__ x, int64_t xs, int64_t per_row,
                                                                int64_t nblocks, uint8_t* __restrict__ y) {
  constexpr int kBytes = QT == kQ8_0 ? 34 : QT == kQ4_0 ? 18 : QT == kQ4_1 ? 20 : QT == kQ5_0 ? 22 : 24;
  // The CUDA block's output is one contiguous run of kLegacyThreads·kBytes bytes (a multiple of 16): staged here,
  // then stored with 16-byte writes instead of each thread's kBytes scattered byte stores.
  static_assert(kLegacyThreads * kBytes % 16 == 0, "whole 16-byte stores");
  __shared__ __align__(16) uint8_t staged[kLegacyThreads * kBytes];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kLegacyThreads;
  const int64_t b = first + threadIdx.x;
  if (b < nblocks) {
    float v[kQK];
    load_floats<T, kQK, VEC>(x + (b / per_row) * xs + (b % per_row) * kQK, v);
    quantize_block_legacy(QT, v, staged + threadIdx.x * kBytes);
  }
  __syncthreads();
  const int64_t n_here = nblocks - first < kLegacyThreads ? nblocks - first : kLegacyThreads;
  uint8_t* dst = y + first * kBytes;
  if (n_here == kLegacyThreads) {  // full run: 16-byte aligned (y is, and kLegacyThreads·kBytes % 16 == 0)
    constexpr int kVecs = kLegacyThreads * kBytes / 16;
    for (int i = threadIdx.x; i < kVecs; i += kLegacyThreads) {
      reinterpret_cast<int4*>(dst)[i] = reinterpret_cast<const int4*>(staged)[i];
    }
  } else {
    for (int64_t i = threadIdx.x; i < n_here * kBytes; i += kLegacyThreads) dst[i] = staged[i];
  }
}

// Max over the S lanes of a super-block's group (S a power of two <= 32, groups aligned in the warp).
template <int S>
__device__ __forceinline__ float group_max(float v) {
  SWIFTLORA_UNROLL
  for (int o = S / 2; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// The scale of largest magnitude, the lowest sub-block index on ties: what the CPU's first-strictly-greater loop
// from 0 keeps (first_absmax). A NaN never wins (the CPU's comparison skips it) and no positive magnitude gives
// 0 (+0). Returns the signed scale; *amax gets its magnitude.
template <int S>
__device__ __forceinline__ float group_first_absmax(float s, int idx, float* amax) {
  float a = fabsf(s) > 0.f ? fabsf(s) : -1.f;
  SWIFTLORA_UNROLL
  for (int o = S / 2; o > 0; o >>= 1) {
    const float ua = __shfl_xor_sync(0xffffffffu, a, o);
    const float us = __shfl_xor_sync(0xffffffffu, s, o);
    const int ui = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ua > a || (ua == a && ui < idx)) {
      a = ua;
      s = us;
      idx = ui;
    }
  }
  if (a < 0.f) {
    a = 0.f;
    s = 0.f;
  }
  *amax = a;
  return s;
}

template <int QT>
struct KTraits {
  static constexpr int kSubs = (QT == kQ4_K || QT == kQ5_K) ? 8 : 16;  // threads per super-block
  static constexpr int kN = kQKK / kSubs;                              // elements per thread
  static constexpr int kBytes = QT == kQ2_K ? 84 : QT == kQ3_K ? 110 : QT == kQ4_K ? 144 : QT == kQ5_K ? 176 : 210;
  static constexpr int kPerBlock = kKThreads / kSubs;                  // super-blocks per CUDA block
};

template <int QT, typename T, bool VEC>
__global__ void __launch_bounds__(kKThreads) kquant_kernel(const T* __restrict__ x, int64_t xs, int64_t per_row,
                                                           int64_t nsuper, uint8_t* __restrict__ y) {
  using K = KTraits<QT>;
  constexpr int S = K::kSubs, N = K::kN;
  __shared__ uint8_t codes_sh[K::kPerBlock][kQKK];  // element codes L (int8 view for Q3_K/Q6_K)
  __shared__ int scode_sh[K::kPerBlock][16];       // per-sub-block scale codes (Q4_K/Q5_K: ls | lm << 8)
  const int sub = threadIdx.x % S, local = threadIdx.x / S;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * K::kPerBlock + local;
  const bool active = g < nsuper;

  float xv[N];
  if (active) {
    load_floats<T, N, VEC>(x + (g / per_row) * xs + (g % per_row) * kQKK + sub * N, xv);
  } else {
    SWIFTLORA_UNROLL
    for (int i = 0; i < N; ++i) xv[i] = 0.f;  // idle lanes still take part in the shuffles
  }
  uint8_t* L = codes_sh[local] + sub * N;
  int8_t* Ls = reinterpret_cast<int8_t*>(L);
  float hdr[2] = {0.f, 0.f};  // values of the fp16 header fields (d, dmin)
  bool zero_block = false;

  if constexpr (QT == kQ4_K || QT == kQ5_K) {
    constexpr int kNmax = QT == kQ4_K ? 15 : 31;
    uint8_t l[32];
    float neg_min;
    const float scale = q45k_fit<kNmax>(xv, l, &neg_min);
    const float ms = group_max<S>(scale > 0 ? scale : 0.f), mm = group_max<S>(neg_min > 0 ? neg_min : 0.f);
    uint8_t ls, lm;
    q45k_codes(ms, mm, scale, neg_min, &ls, &lm);
    hdr[0] = ms / 63.f;
    hdr[1] = mm / 63.f;
    requant_min<32>(xv, l, kNmax, fp16_to_fp32(fp32_to_fp16(hdr[0])), ls, fp16_to_fp32(fp32_to_fp16(hdr[1])), lm);
    SWIFTLORA_UNROLL
    for (int i = 0; i < 32; ++i) L[i] = l[i];
    scode_sh[local][sub] = ls | (lm << 8);
  } else if constexpr (QT == kQ2_K) {
    uint8_t l[16];
    float neg_min;
    const float scale = q2k_fit(xv, l, &neg_min);
    const float ms = group_max<S>(scale > 0 ? scale : 0.f), mm = group_max<S>(neg_min > 0 ? neg_min : 0.f);
    const uint8_t code = q2k_code(ms, mm, scale, neg_min);
    hdr[0] = ms > 0 ? ms / 15.f : 0.f;
    hdr[1] = mm > 0 ? mm / 15.f : 0.f;
    requant_min<16>(xv, l, 3, fp16_to_fp32(fp32_to_fp16(hdr[0])), code & 0xf, fp16_to_fp32(fp32_to_fp16(hdr[1])),
                    code >> 4);
    SWIFTLORA_UNROLL
    for (int i = 0; i < 16; ++i) L[i] = l[i];
    scode_sh[local][sub] = code;
  } else if constexpr (QT == kQ3_K) {
    int8_t l[16];
    const float scale = fit_scale_q3<16>(4, xv, l);
    float amax;
    const float max_scale = group_first_absmax<S>(scale, sub, &amax);
    const int code = max_scale ? q3k_code(max_scale, scale) : 0;
    hdr[0] = max_scale ? 1 / (-32.f / max_scale) : 0.f;
    requant_sym<16>(xv, l, 4, fp16_to_fp32(fp32_to_fp16(hdr[0])), code - 32);
    SWIFTLORA_UNROLL
    for (int i = 0; i < 16; ++i) Ls[i] = l[i];
    scode_sh[local][sub] = code;
  } else {  // Q6_K
    int8_t l[16];
    const float scale = fit_scale_symmetric<16>(32, xv, l);
    float amax;
    const float max_scale = group_first_absmax<S>(scale, sub, &amax);
    zero_block = amax < kGroupMaxEps;
    const float iscale = -128.f / max_scale;
    hdr[0] = 1 / iscale;
    const int8_t code = zero_block ? int8_t(0) : q6k_code(iscale, scale);
    if (!zero_block) requant_sym<16>(xv, l, 32, fp16_to_fp32(fp32_to_fp16(hdr[0])), code);
    SWIFTLORA_UNROLL
    for (int i = 0; i < 16; ++i) Ls[i] = l[i];
    scode_sh[local][sub] = code;
  }
  __syncwarp();
  if (!active) return;

  const uint8_t* Lg = codes_sh[local];
  const int8_t* Lgs = reinterpret_cast<const int8_t*>(Lg);
  const int* sc = scode_sh[local];
  uint8_t* dst = y + g * K::kBytes;
  for (int b = sub; b < K::kBytes; b += S) {
    uint8_t v = 0;
    if constexpr (QT == kQ4_K || QT == kQ5_K) {
      constexpr int kQs = QT == kQ4_K ? 16 : 48;
      if (b < 4) {
        v = static_cast<uint8_t>(fp32_to_fp16(hdr[b >> 1]) >> (8 * (b & 1)));
      } else if (b < 16) {
        uint8_t ls[8], lm[8];
        SWIFTLORA_UNROLL
        for (int j = 0; j < 8; ++j) {
          ls[j] = static_cast<uint8_t>(sc[j] & 0xff);
          lm[j] = static_cast<uint8_t>(sc[j] >> 8);
        }
        v = q45k_scales_byte(ls, lm, b - 4);
      } else if (b < kQs) {
        v = q5k_qh_byte(Lg, b - 16);
      } else {
        v = q45k_qs_byte(Lg, b - kQs);
      }
    } else if constexpr (QT == kQ2_K) {
      if (b < 16) v = static_cast<uint8_t>(sc[b]);
      else if (b < 80) v = q23k_qs_byte(Lg, b - 16);
      else v = static_cast<uint8_t>(fp32_to_fp16(hdr[(b - 80) >> 1]) >> (8 * (b & 1)));
    } else if constexpr (QT == kQ3_K) {
      if (b < 32) v = q3k_hmask_byte(Lgs, b);
      else if (b < 96) v = q23k_qs_byte(Lgs, b - 32);
      else if (b < 108) v = q3k_scales_byte(sc, b - 96);
      else v = static_cast<uint8_t>(fp32_to_fp16(hdr[0]) >> (8 * (b & 1)));
    } else {
      if (zero_block) v = 0;
      else if (b < 128) v = q6k_ql_byte(Lgs, b);
      else if (b < 192) v = q6k_qh_byte(Lgs, b - 128);
      else if (b < 208) v = static_cast<uint8_t>(sc[b - 192] & 0xff);
      else v = static_cast<uint8_t>(fp32_to_fp16(hdr[0]) >> (8 * (b & 1)));
    }
    dst[b] = v;
  }
}

template <int QT, typename T, bool VEC>
void launch(const T* x, int64_t xs, int64_t per_row, int64_t nblocks, uint8_t* y, cudaStream_t stream) {
  if constexpr (QT >= kQ2_K) {
    const int64_t grid = ceil_div(nblocks, KTraits<QT>::kPerBlock);
    kquant_kernel<QT, T, VEC><<<static_cast<unsigned>(grid), kKThreads, 0, stream>>>(x, xs, per_row, nblocks, y);
  } else {
    const int64_t grid = ceil_div(nblocks, kLegacyThreads);
    legacy_kernel<QT, T, VEC><<<static_cast<unsigned>(grid), kLegacyThreads, 0, stream>>>(x, xs, per_row, nblocks, y);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool VEC>
void launch_type(int qtype, const T* x, int64_t xs, int64_t per_row, int64_t nblocks, uint8_t* y, cudaStream_t s) {
  switch (qtype) {
    case kQ4_0: launch<kQ4_0, T, VEC>(x, xs, per_row, nblocks, y, s); break;
    case kQ4_1: launch<kQ4_1, T, VEC>(x, xs, per_row, nblocks, y, s); break;
    case kQ5_0: launch<kQ5_0, T, VEC>(x, xs, per_row, nblocks, y, s); break;
    case kQ5_1: launch<kQ5_1, T, VEC>(x, xs, per_row, nblocks, y, s); break;
    case kQ8_0: launch<kQ8_0, T, VEC>(x, xs, per_row, nblocks, y, s); break;
    case kQ2_K: launch<kQ2_K, T, VEC>(x, xs, per_row, nblocks, y, s); break;
    case kQ3_K: launch<kQ3_K, T, VEC>(x, xs, per_row, nblocks, y, s); break;
    case kQ4_K: launch<kQ4_K, T, VEC>(x, xs, per_row, nblocks, y, s); break;
    case kQ5_K: launch<kQ5_K, T, VEC>(x, xs, per_row, nblocks, y, s); break;
    default: launch<kQ6_K, T, VEC>(x, xs, per_row, nblocks, y, s); break;
  }
}

at::Tensor gguf_quantize_cuda(const at::Tensor& x, int64_t qtype) {
  check_gguf_quantize_args(x, qtype);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = as_rows(x);
  at::Tensor out = gguf_quantize_output(x, qtype);
  const int t = static_cast<int>(qtype);
  const int64_t per_row = x2.size(1) / block_elems(t), nblocks = x2.size(0) * per_row;
  if (nblocks == 0) return out;
  SWIFTLORA_DISPATCH_FLOAT(x.scalar_type(), "gguf_quantize_cuda", [&] {
    const scalar_t* xp = x2.const_data_ptr<scalar_t>();
    const bool vec = aligned_to(xp, 16) && (x2.stride(0) * sizeof(scalar_t)) % 16 == 0;
    uint8_t* yp = out.mutable_data_ptr<uint8_t>();
    if (vec) launch_type<scalar_t, true>(t, xp, x2.stride(0), per_row, nblocks, yp, current_stream());
    else launch_type<scalar_t, false>(t, xp, x2.stride(0), per_row, nblocks, yp, current_stream());
  });
  return out;
}

}  // namespace
}  // namespace swiftlora::cuda

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) { m.impl("gguf_quantize", &swiftlora::cuda::gguf_quantize_cuda); }
