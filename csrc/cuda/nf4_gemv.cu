// nf4_gemv on CUDA: y [M, N] = x [M, K] @ dequant(W [N, K])ᵀ for M = 1..16 (decode). The weight enters as its
// exact fp32 values table[code]·scale, products are summed in fp32, y is rounded once to x's dtype.
//
// Floor: reading the packed weight once, N·K/2 bytes, plus its scales (N·K/blocksize bytes nested, 4× that plain);
// x and y are small. W[14336, 4096] nested: 29.4 MB + 0.9 MB ≈ 9 µs at 3.35 TB/s.
// Launch: persistent CTAs of 8 warps (at most kCtasPerSm per SM); x is staged once per CTA in shared memory as
// 16-byte chunks, XOR-swizzled so the lanes of a quarter-warp read 8 different bank quads. Each warp takes groups
// of R consecutive rows; per step every lane loads 16 packed bytes (32 codes, one block since K % 32 == 0) of each
// of the R rows with one 128-bit load (a warp reads 512 contiguous bytes per row), and the next step's loads are
// issued before this step's math. The NF4 table is 16 floats in shared memory (a warp's lookups never conflict);
// per 32 codes: one scale decode, Σ x·table[code] in fp32, then one multiply by the scale. A warp reduces its
// R·M sums with shuffles at the end of each row group.
// Other shapes (K % 32 != 0, x too large for shared memory, unaligned packed) take a one-warp-per-row loop kernel.
// Decode shapes the tensor-core kernel takes (nf4_gemv_mma.cu: M <= 4, K % 128 == 0, blocksize 64) go there.
//
// Decode shapes the TMA-streamed kernel takes (nf4_gemv_stream.cu: sm_90+, the same shapes) go there first.
//
// Benchmarking knob: SWIFTLORA_NF4_GEMV_VARIANT, read on every call (bench/nf4_gemv_sweep.py times each value):
// unset or "stream": the streamed kernel with 16 warps and a 4-stage ring (measured fastest on the H100:
// bench/NOTES.md), else the tensor-core one, where they apply (default); "stream-w8", "stream-d4", "stream-d8": its
// 8-warp ring shapes (6, 4, 8 stages; nf4_gemv_stream.h); "mma": the tensor-core kernel where it
// applies; "simt": the SIMT kernels of this file for every shape (the kernel before the tensor-core one).
#include <ATen/ops/empty.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/nf4_cuda.cuh"
#include "common/smem_optin.cuh"
#include "cuda/nf4_gemv_mma.h"
#include "cuda/nf4_gemv_stream.h"
#include "ops.h"

namespace swiftlora::cuda {
namespace {

using nf4::Nf4Args;
using nf4::Nf4Tables;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCtasPerSm = 4;
constexpr int kStepK = 32 * 32;  // k elements a warp covers per step

// 16-byte chunk q of a row of x lives at q ^ ((q >> 3) & 3): lane l of a step reads chunks 4l + j (j = 0..3), and
// the swizzle spreads lanes 0..7 (one 128-bit wavefront) over all 8 bank quads. Needs K / 8 % 4 == 0.
__device__ __forceinline__ int64_t swizzle(int64_t q) { return q ^ ((q >> 3) & 3); }

template <typename T>
__device__ __forceinline__ void to_float8(const uint4& c, float (&f)[8]) {
  const uint32_t u[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      f[2 * i] = __uint_as_float(u[i] << 16);
      f[2 * i + 1] = __uint_as_float(u[i] & 0xFFFF0000u);
    } else {
      const float2 p = __half22float2(*reinterpret_cast<const __half2*>(&u[i]));
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
}

// The raw loads of one step (R rows × 32 codes), issued a step ahead of their use.
template <int R>
struct StepLoads {
  uint4 w[R];
  float scale_raw[R];  // plain: the fp32 absmax; nested: absmax2 of the block's group
  uint32_t q[R];       // nested: the uint8 absmax code
};

template <typename T, int MAXM, int R>
__global__ void __launch_bounds__(kThreads) nf4_gemv_kernel(const T* __restrict__ x, int m, int64_t k, int64_t n,
                                                            Nf4Args a, T* __restrict__ y) {
  extern __shared__ uint4 xs[];  // [m][k / 8] swizzled chunks
  __shared__ Nf4Tables tables;
  nf4::load_tables(tables, a);
  const int64_t kc = k / 8;
  for (int64_t i = threadIdx.x; i < m * kc; i += kThreads) {
    const int64_t row = i / kc, q = i % kc;
    xs[row * kc + swizzle(q)] = __ldg(reinterpret_cast<const uint4*>(x) + i);
  }
  __syncthreads();
  const float offset = a.nested ? __ldg(a.offset) : 0.f;
  const char* table = reinterpret_cast<const char*>(tables.code);
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t ngroups = (n + R - 1) / R, ksteps = (k + kStepK - 1) / kStepK;

  auto load = [&](int64_t g, int64_t s, StepLoads<R>& ld) {
    const int64_t k0 = s * kStepK + lane * 32;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = g * R + r;
      ld.w[r] = make_uint4(0x77777777u, 0x77777777u, 0x77777777u, 0x77777777u);  // code 7 = 0.0
      ld.scale_raw[r] = 0.f;
      ld.q[r] = 0;
      if (row < n && k0 < k) {
        const int64_t e0 = row * k + k0;
        ld.w[r] = __ldcs(reinterpret_cast<const uint4*>(a.packed + e0 / 2));
        const int64_t b = e0 >> a.log2_blocksize;
        if (a.nested) {
          ld.q[r] = __ldg(a.qabsmax + b);
          ld.scale_raw[r] = __ldg(a.absmax2 + (b >> nf4::kNestedBlocksizeLog2));
        } else {
          ld.scale_raw[r] = __ldg(a.absmax + b);
        }
      }
    }
  };

  float acc[R][MAXM];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int i = 0; i < MAXM; ++i) acc[r][i] = 0.f;
  }
  int64_t g = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32, s = 0;
  StepLoads<R> cur;
  if (g < ngroups) load(g, s, cur);
  while (g < ngroups) {
    int64_t g_next = g, s_next = s + 1;
    if (s_next == ksteps) {
      s_next = 0;
      g_next += nwarps;
    }
    StepLoads<R> next{};
    if (g_next < ngroups) load(g_next, s_next, next);

    const int64_t q0 = (s * kStepK + lane * 32) / 8;
    float part[R][MAXM];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int i = 0; i < MAXM; ++i) part[r][i] = 0.f;
    }
    if (s * kStepK + lane * 32 < k) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // 8 codes of each row: word j of the 16 loaded bytes
        float xf[MAXM][8];
#pragma unroll
        for (int i = 0; i < MAXM; ++i) {
          if (i < m) to_float8<T>(xs[i * kc + swizzle(q0 + j)], xf[i]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t word = j == 0 ? cur.w[r].x : j == 1 ? cur.w[r].y : j == 2 ? cur.w[r].z : cur.w[r].w;
          // Byte offsets into the table (code · 4) of the even (high nibble) and odd (low nibble) elements.
          const uint32_t even = (word >> 2) & 0x3C3C3C3Cu, odd = (word << 2) & 0x3C3C3C3Cu;
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const float te = *reinterpret_cast<const float*>(table + __byte_perm(even, 0, 0x4440 + b));
            const float to = *reinterpret_cast<const float*>(table + __byte_perm(odd, 0, 0x4440 + b));
#pragma unroll
            for (int i = 0; i < MAXM; ++i) {
              if (i < m) part[r][i] = fmaf(xf[i][2 * b + 1], to, fmaf(xf[i][2 * b], te, part[r][i]));
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float scale = a.nested ? nf4::nested_absmax(tables.code2[cur.q[r]], cur.scale_raw[r], offset)
                                     : cur.scale_raw[r];
#pragma unroll
        for (int i = 0; i < MAXM; ++i) acc[r][i] = fmaf(part[r][i], scale, acc[r][i]);
      }
    }
    if (s == ksteps - 1) {  // the row group is complete
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t row = g * R + r;
#pragma unroll
        for (int i = 0; i < MAXM; ++i) {
          const float v = warp_sum(acc[r][i]);
          acc[r][i] = 0.f;
          if (lane == 0 && i < m && row < n) y[i * n + row] = static_cast<T>(v);
        }
      }
    }
    g = g_next;
    s = s_next;
    cur = next;
  }
}

// Any K and alignment: one warp per output row, one element per lane per step (a slow, simple fallback).
template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_gemv_loop_kernel(const T* __restrict__ x, int m, int64_t k,
                                                                 int64_t n, Nf4Args a, T* __restrict__ y) {
  __shared__ Nf4Tables tables;
  nf4::load_tables(tables, a);
  __syncthreads();
  const float offset = a.nested ? __ldg(a.offset) : 0.f;
  const int lane = threadIdx.x & 31;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < n;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    float acc[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.f;
    for (int64_t j = lane; j < k; j += 32) {
      const int64_t e = row * k + j;
      const float w = nf4::dequant_value(tables.code[nf4::code_at(a.packed, e)],
                                         nf4::block_scale(a, tables, e >> a.log2_blocksize, offset));
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        if (i < m) acc[i] = fmaf(static_cast<float>(x[i * k + j]), w, acc[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const float v = warp_sum(acc[i]);
      if (lane == 0 && i < m) y[i * n + row] = static_cast<T>(v);
    }
  }
}

// Host-side launch facts (max_optin_smem, the occupancy below) are looked up once per device: a decode step is
// ~10 µs, so per-call driver queries would show in its wall time.
template <typename T, int MAXM, int R>
void launch_tiled(const T* x, int m, int64_t k, int64_t n, const Nf4Args& a, T* y, std::size_t smem) {
  auto kernel = nf4_gemv_kernel<T, MAXM, R>;
  static std::mutex mu;
  static std::map<std::pair<int, std::size_t>, int> grid_per_sm;  // (device, smem) -> resident CTAs per SM
  int per_sm = 0;
  {
    const std::lock_guard<std::mutex> lock(mu);
    const auto key = std::make_pair(static_cast<int>(c10::cuda::current_device()), smem);
    auto it = grid_per_sm.find(key);
    if (it == grid_per_sm.end()) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin_smem() -
                                          static_cast<int>(sizeof(Nf4Tables))));
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
      it = grid_per_sm.emplace(key, std::clamp(per_sm, 1, kCtasPerSm)).first;
    }
    per_sm = it->second;
  }
  const int64_t groups = ceil_div(n, R);
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(ceil_div(groups, kWarps),
                                                              static_cast<int64_t>(sm_count()) * per_sm));
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, current_stream()>>>(x, m, k, n, a, y);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether the tiled kernel can run: whole 32-code chunks per row, aligned packed and x, x fits in shared memory.
bool tiled_fits(const void* packed, const void* x, int64_t k, std::size_t smem) {
  return k % 32 == 0 && aligned_to(packed, 16) && aligned_to(x, 16) &&
         smem + sizeof(Nf4Tables) <= static_cast<std::size_t>(max_optin_smem());
}

// SWIFTLORA_NF4_GEMV_VARIANT: which kernels a call may take.
struct GemvVariant {
  bool stream = true;  // the TMA-streamed kernel first, with this ring shape
  Nf4StreamVariant ring = Nf4StreamVariant::kW16D4;
  bool mma = true;  // else the tensor-core kernel
};

GemvVariant gemv_variant() {
  const char* env = std::getenv("SWIFTLORA_NF4_GEMV_VARIANT");
  GemvVariant v;
  if (env == nullptr || *env == '\0') return v;
  const std::string s(env);
  if (s == "stream-d4") {
    v.ring = Nf4StreamVariant::kW8D4;
  } else if (s == "stream-d8") {
    v.ring = Nf4StreamVariant::kW8D8;
  } else if (s == "stream-w8") {
    v.ring = Nf4StreamVariant::kW8D6;
  } else if (s == "mma" || s == "simt") {
    v.stream = false;
    v.mma = s == "mma";
  } else {
    TORCH_CHECK(s == "stream", "SWIFTLORA_NF4_GEMV_VARIANT must be stream, stream-w8, stream-d4, stream-d8, mma or ",
                "simt, got '", s, "'");
  }
  return v;
}

at::Tensor nf4_gemv_cuda(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                         const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features) {
  const Nf4Weight w = check_nf4_gemv_args(x_in, packed, absmax, absmax2, code2, offset, blocksize, out_features);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  if (!aligned_to(x.const_data_ptr(), 16)) x = x.clone();  // a few KB: cheaper than the loop kernel
  const int64_t k = x.size(-1), n = out_features;
  const int m = static_cast<int>(x.numel() / k);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  auto y = at::empty(out_shape, x.options());
  const Nf4Args a = nf4::nf4_args(w);
  const std::size_t smem = static_cast<std::size_t>(m) * k * x.element_size();
  const GemvVariant variant = gemv_variant();
  SWIFTLORA_DISPATCH_HALF(x.scalar_type(), "nf4_gemv_cuda", [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    if (variant.stream && launch_nf4_gemv_stream<scalar_t>(xp, m, k, n, a, yp, max_optin_smem(), current_stream(),
                                                           variant.ring)) {
      return;
    }
    if (variant.mma && launch_nf4_gemv_mma<scalar_t>(xp, m, k, n, a, yp, max_optin_smem(), current_stream())) {
      return;
    }
    if (!tiled_fits(a.packed, xp, k, smem)) {
      const int64_t grid = std::min<int64_t>(ceil_div(n, kWarps), 16 * sm_count());
      nf4_gemv_loop_kernel<scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, current_stream()>>>(xp, m, k, n,
                                                                                                   a, yp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (m == 1) {
      launch_tiled<scalar_t, 1, 4>(xp, m, k, n, a, yp, smem);
    } else if (m == 2) {
      launch_tiled<scalar_t, 2, 4>(xp, m, k, n, a, yp, smem);
    } else if (m <= 4) {
      launch_tiled<scalar_t, 4, 4>(xp, m, k, n, a, yp, smem);
    } else if (m <= 8) {
      launch_tiled<scalar_t, 8, 2>(xp, m, k, n, a, yp, smem);
    } else {
      launch_tiled<scalar_t, 16, 1>(xp, m, k, n, a, yp, smem);
    }
  });
  return y;
}

}  // namespace
}  // namespace swiftlora::cuda

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) { m.impl("nf4_gemv", &swiftlora::cuda::nf4_gemv_cuda); }
