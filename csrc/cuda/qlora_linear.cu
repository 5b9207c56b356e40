// qlora_linear on CUDA, version 1: the shared host code (csrc/common/qlora_host.h) with each NF4 weight dequantized
// into a row view of a scratch buffer in the compute dtype (the weight panel [W | s·B] or a plain [N, K] buffer),
// which cuBLAS (through ATen) then reads. Also qlora_gemm, dispatched to its sm_90a kernel (version 2:
// csrc/cuda/qlora_gemm_sm90.cu) where that applies.
// Dequantization floor: read N·K/2 packed bytes + N·K/blocksize scales, write N·K·E bytes; for W [14336, 4096] bf16
// that is 29 MB + 117 MB, ~0.05 ms at 3 TB/s (bench/NOTES.md, "QLoRA ops").
// Launch: like nf4_dequantize's kernel (csrc/cuda/nf4.cu) but writing rows with a row stride: 256-thread CTAs, each
// thread kWords packed 32-bit words (8 elements each, one scale: blocksize >= 32) at a stride of one CTA width, all
// loads issued before any decode, one 16-byte store per word. A word never straddles a row when K % 8 == 0 (then
// element 8g sits at row 8g / K); other K, unaligned packed data or unaligned rows: one element per thread.
// Tables (NF4 values, the 8-bit map when double-quantized) in shared memory (csrc/common/nf4_cuda.cuh).
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/nf4_cuda.cuh"
#include "common/qlora_host.h"
#include "cuda/qlora_gemm_sm90.h"

namespace swiftlora::cuda {
namespace {

using nf4::Nf4Args;
using nf4::Nf4Tables;
using qlora::BaseWeight;

constexpr int kThreads = 256;
constexpr int kWords = 4;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequant_rows_words(Nf4Args a, T* __restrict__ out, int64_t ld, int64_t k, int64_t nwords) {
  __shared__ Nf4Tables tables;
  nf4::load_tables(tables, a);
  __syncthreads();
  const float offset = a.nested ? __ldg(a.offset) : 0.f;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(a.packed);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * (kThreads * kWords) + threadIdx.x;
  uint32_t w[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    const int64_t g = first + i * kThreads;
    w[i] = g < nwords ? __ldcs(words + g) : 0u;
  }
#pragma unroll
  for (int i = 0; i < kWords; ++i) {
    const int64_t g = first + i * kThreads;
    if (g >= nwords) break;
    const int64_t e = g * 8, row = e / k, col = e - row * k;
    const float scale = nf4::block_scale(a, tables, e >> a.log2_blocksize, offset);
    Vec<T, 8> v;
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // byte j holds elements 2j (high nibble) and 2j + 1 (low nibble)
      const uint32_t byte = (w[i] >> (8 * j)) & 0xFFu;
      v.v[2 * j] = static_cast<T>(nf4::dequant_value(tables.code[nf4::high_nibble(byte)], scale));
      v.v[2 * j + 1] = static_cast<T>(nf4::dequant_value(tables.code[nf4::low_nibble(byte)], scale));
    }
    if constexpr (sizeof(T) == 2) {
      store_vec<T, 8>(out + row * ld + col, v);
    } else {
      T* dst = out + row * ld + col;
      store_vec<T, 4>(dst, *reinterpret_cast<const Vec<T, 4>*>(&v.v[0]));
      store_vec<T, 4>(dst + 4, *reinterpret_cast<const Vec<T, 4>*>(&v.v[4]));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dequant_rows_scalar(Nf4Args a, T* __restrict__ out, int64_t ld, int64_t k) {
  __shared__ Nf4Tables tables;
  nf4::load_tables(tables, a);
  __syncthreads();
  const float offset = a.nested ? __ldg(a.offset) : 0.f;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < a.n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = i / k, col = i - row * k;
    const float scale = nf4::block_scale(a, tables, i >> a.log2_blocksize, offset);
    out[row * ld + col] = static_cast<T>(nf4::dequant_value(tables.code[nf4::code_at(a.packed, i)], scale));
  }
}

template <typename T>
void launch_dequant(const Nf4Args& a, T* out, int64_t ld, int64_t k, cudaStream_t stream) {
  const bool words = k % 8 == 0 && aligned_to(a.packed, 4) && aligned_to(out, 16) &&
                     (ld * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  if (words) {
    const int64_t nwords = a.n / 8;
    const int64_t grid = ceil_div(nwords, kThreads * kWords);
    dequant_rows_words<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, out, ld, k, nwords);
  } else {
    const int64_t grid = std::min<int64_t>(ceil_div(a.n, kThreads), 8 * sm_count());
    dequant_rows_scalar<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, out, ld, k);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaBackend {
  // out: [n, k] in the compute dtype, unit column stride, any row stride (a slice of the weight panel).
  static void dequantize(const BaseWeight& b, at::Tensor out) {
    const Nf4Args a = nf4::nf4_args(b.nf4);
    SWIFTLORA_DISPATCH_FLOAT(out.scalar_type(), "qlora_dequantize_rows", [&] {
      launch_dequant<scalar_t>(a, out.mutable_data_ptr<scalar_t>(), out.stride(0), b.k, current_stream());
    });
  }
  // Version 2 where it applies (sm_90a: dequantization inside the wgmma GEMM), else dequantize + cuBLAS.
  static at::Tensor qlora_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                               const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                               const std::optional<at::Tensor>& xa, const std::optional<at::Tensor>& lora_b,
                               const std::optional<at::Tensor>& bias) {
    const qlora::GemmArgs a = qlora::make_gemm_args(x, packed, absmax, absmax2, code2, offset, blocksize,
                                                    out_features, xa, lora_b, bias);
    const c10::cuda::CUDAGuard guard(x.device());
    if (!sm90::supported(a)) return qlora::gemm_output_shape(x, qlora::gemm_unfused<CudaBackend>(a));
    at::Tensor y = at::empty({a.m, a.n}, x.options());
    sm90::run(a, y);
    return qlora::gemm_output_shape(x, y);
  }
};

}  // namespace
}  // namespace swiftlora::cuda

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) { swiftlora::qlora::register_ops<swiftlora::cuda::CudaBackend>(m); }
