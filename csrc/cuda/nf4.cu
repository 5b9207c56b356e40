// NF4 quantize / dequantize on CUDA, bit-identical to bitsandbytes' CUDA kernels (rules: csrc/common/nf4.h, which
// reproduces their fast-math rounding: FTZ, MUFU.RCP for 1/absmax).
//
// Dequantize: the shared kernel of csrc/cuda/nf4_dequant.cu (the qlora ops use it too), on the whole tensor.
//
// Quantize (runs once per weight; correctness first). A group of G = min(32, blocksize/8) lanes owns one block:
// pass 1 reduces max|x| over the group with shuffles, pass 2 re-reads x (L1/L2) and writes 4 packed bytes per
// lane per 8 elements. Double quantization: the offset is torch's mean of the fp32 absmax on the device (the same
// reduction bitsandbytes calls, so the same bits), then one warp per 256 scales writes their 8-bit codes.
#include <ATen/ops/empty.h>
#include <ATen/ops/mean.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/nf4_cuda.cuh"
#include "cuda/nf4_dequant.h"
#include "ops.h"

namespace swiftlora::cuda {
namespace {

using nf4::Nf4Args;

constexpr int kThreads = 256;

// --------------------------------------------------------------------------------------------------- quantize
// 8 consecutive elements from e0 as fp32; zeros at and past `end` (bitsandbytes' zero-padded loads).
template <typename T>
__device__ __forceinline__ void load8(const T* x, int64_t e0, int64_t end, bool vec, float (&v)[8]) {
  if (vec && e0 + 8 <= end) {
    constexpr int kPer = 16 / sizeof(T);  // 8 for 16-bit types, 4 for fp32
#pragma unroll
    for (int h = 0; h < 8 / kPer; ++h) {
      const Vec<T, kPer> in = load_vec<T, kPer>(x + e0 + h * kPer);
#pragma unroll
      for (int j = 0; j < kPer; ++j) v[h * kPer + j] = static_cast<float>(in.v[j]);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = e0 + j < end ? static_cast<float>(x[e0 + j]) : 0.f;
}

// G lanes per quantization block (G divides 32, so a group never spans two warps).
template <typename T, int G>
__global__ void __launch_bounds__(kThreads) nf4_quantize_kernel(const T* __restrict__ x, int64_t n, int log2_bs,
                                                                uint8_t* __restrict__ packed,
                                                                float* __restrict__ absmax, bool vec) {
  const int64_t nblocks = (n + (int64_t{1} << log2_bs) - 1) >> log2_bs;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / G) + threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const bool valid = b < nblocks;  // invalid groups still join the shuffles
  const int64_t bs = int64_t{1} << log2_bs, start = b * bs, end = valid ? min(n, start + bs) : start;
  const int iters = static_cast<int>(bs / (8 * G));
  float m = nf4::absmax_init(valid && end - start < bs);
  for (int it = 0; it < iters; ++it) {
    float v[8];
    load8<T>(x, start + (it * G + lane) * 8, end, vec, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) m = nf4::absmax_step(m, v[j]);
  }
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));  // flushed, not NaN
  if (!valid) return;
  if (lane == 0) absmax[b] = m;
  const float recip = nf4::reciprocal(m);
  for (int it = 0; it < iters; ++it) {
    const int64_t e0 = start + (it * G + lane) * 8;
    if (e0 >= end) break;
    float v[8];
    load8<T>(x, e0, end, vec, v);
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      word |= static_cast<uint32_t>(nf4::pack(nf4::encode(v[2 * j], recip), nf4::encode(v[2 * j + 1], recip)))
              << (8 * j);
    }
    if (e0 + 8 <= end) {
      *reinterpret_cast<uint32_t*>(packed + e0 / 2) = word;
    } else {
      for (int j = 0; 2 * j < end - e0; ++j) packed[e0 / 2 + j] = static_cast<uint8_t>(word >> (8 * j));
    }
  }
}

// One warp per 256 fp32 scales: absmax2 = max |absmax - offset|, then each scale's 8-bit dynamic code.
__global__ void __launch_bounds__(kThreads) nf4_quantize_absmax_kernel(const float* __restrict__ absmax,
                                                                       int64_t nblocks,
                                                                       const float* __restrict__ offset_ptr,
                                                                       const float* __restrict__ code2_global,
                                                                       uint8_t* __restrict__ q,
                                                                       float* __restrict__ absmax2) {
  __shared__ float code2[nf4::kCode2Size];
  for (int i = threadIdx.x; i < nf4::kCode2Size; i += blockDim.x) code2[i] = code2_global[i];
  __syncthreads();
  const float offset = __ldg(offset_ptr);
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t n2 = (nblocks + nf4::kNestedBlocksize - 1) / nf4::kNestedBlocksize;
  const bool valid = b < n2;
  const int64_t start = b * nf4::kNestedBlocksize;
  const int64_t end = valid ? min(nblocks, start + nf4::kNestedBlocksize) : start;
  const int64_t e0 = start + lane * 8;
  float v[8];
  float m = nf4::absmax_init(valid && end - start < nf4::kNestedBlocksize);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    v[j] = e0 + j < end ? nf4::add_rn(absmax[e0 + j], -offset) : 0.f;  // torch's IEEE absmax - offset
    m = nf4::absmax_step(m, v[j]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (!valid) return;
  if (lane == 0) absmax2[b] = m;
  const float recip = nf4::reciprocal(m);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (e0 + j < end) q[e0 + j] = static_cast<uint8_t>(nf4::encode_dynamic(code2, nf4::mul_ftz(v[j], recip)));
  }
}

template <typename T, int G>
void launch_quantize(const T* x, int64_t n, int64_t bs, uint8_t* packed, float* absmax, cudaStream_t stream) {
  const int64_t nblocks = ceil_div(n, bs);
  const int64_t grid = ceil_div(nblocks, kThreads / G);
  nf4_quantize_kernel<T, G><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      x, n, nf4::log2_exact(bs), packed, absmax, aligned_to(x, 16));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& x_in,
                                                                             int64_t blocksize,
                                                                             const std::optional<at::Tensor>& code2) {
  check_nf4_quantize_args(x_in, blocksize, code2);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel(), nblocks = ceil_div(n, blocksize);
  auto packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  auto absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = current_stream();
  SWIFTLORA_DISPATCH_FLOAT(x.scalar_type(), "nf4_quantize_cuda", [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    auto* pp = packed.mutable_data_ptr<uint8_t>();
    auto* ap = absmax.mutable_data_ptr<float>();
    switch (blocksize) {
      case 32: launch_quantize<scalar_t, 4>(xp, n, blocksize, pp, ap, stream); break;
      case 64: launch_quantize<scalar_t, 8>(xp, n, blocksize, pp, ap, stream); break;
      case 128: launch_quantize<scalar_t, 16>(xp, n, blocksize, pp, ap, stream); break;
      default: launch_quantize<scalar_t, 32>(xp, n, blocksize, pp, ap, stream); break;
    }
  });
  if (!code2.has_value()) {
    return {packed, absmax, at::empty({0}, absmax.options()), at::empty({0}, absmax.options())};
  }
  const at::Tensor offset = at::mean(absmax);  // bitsandbytes: _absmax.mean(), the same torch reduction
  const at::Tensor c2 = code2->contiguous();
  const int64_t n2 = ceil_div(nblocks, nf4::kNestedBlocksize);
  auto qabsmax = at::empty({nblocks}, absmax.options().dtype(at::kByte));
  auto absmax2 = at::empty({n2}, absmax.options());
  nf4_quantize_absmax_kernel<<<static_cast<unsigned>(ceil_div(n2, kThreads / 32)), kThreads, 0, stream>>>(
      absmax.const_data_ptr<float>(), nblocks, offset.const_data_ptr<float>(), c2.const_data_ptr<float>(),
      qabsmax.mutable_data_ptr<uint8_t>(), absmax2.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, qabsmax, absmax2, offset};
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                               const std::optional<at::Tensor>& offset, int64_t blocksize, at::IntArrayRef shape,
                               at::ScalarType dtype) {
  const Nf4Weight w = check_nf4_dequantize_args(packed, absmax, absmax2, code2, offset, blocksize, shape, dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty(shape, packed.options().dtype(dtype));
  const Nf4Args a = nf4::nf4_args(w);
  const Nf4Rect all{0, 1, w.n, w.n, w.n};
  SWIFTLORA_DISPATCH_FLOAT(dtype, "nf4_dequantize_cuda", [&] {
    launch_nf4_dequant<scalar_t>(a, all, out.mutable_data_ptr<scalar_t>(), current_stream());
  });
  return out;
}

}  // namespace
}  // namespace swiftlora::cuda

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) {
  m.impl("nf4_quantize", &swiftlora::cuda::nf4_quantize_cuda);
  m.impl("nf4_dequantize", &swiftlora::cuda::nf4_dequantize_cuda);
}
