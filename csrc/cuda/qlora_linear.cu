// qlora_linear on CUDA, version 1: the shared host code (csrc/common/qlora_host.h) with each NF4 weight dequantized
// into a row view of a scratch buffer in the compute dtype (the weight panel [W | s·B] or a plain [N, K] buffer),
// which cuBLAS (through ATen) then reads.
// Dequantization floor: read N·K/2 packed bytes + N·K/blocksize scales, write N·K·E bytes; for W [14336, 4096] bf16
// that is 29 MB + 117 MB, ~0.05 ms at 3 TB/s (bench/NOTES.md, "qlora_linear").
// Launch: a grid-stride loop over 16-element chunks of the weight's rows, 256 threads a block; each thread reads 8
// packed bytes (one 8-byte load) and one scale and writes 16 values with 16-byte stores (every chunk lies inside one
// row and one quant block when K % 16 == 0, since blocksize >= 32). Other shapes/alignments: one element a thread.
// The 16-entry NF4 table (and with double quantization the 256-entry dynamic map) sit in shared memory.
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/nf4.h"
#include "common/qlora_host.h"

namespace swiftlora::cuda {
namespace {

using qlora::BaseWeight;

constexpr int kThreads = 256;
constexpr int kChunk = 16;  // elements per thread per step in the vectorised kernel

// The device view of one NF4 weight.
struct Nf4View {
  const uint8_t* packed;
  const float* absmax_f;    // plain: fp32 scales
  const uint8_t* absmax_q;  // double quantization: uint8 indices into code2
  const float* code2;
  const float* absmax2;
  float offset;
  int shift;  // log2(blocksize)
};

// Shared tables: the NF4 values, and code2 with double quantization.
template <bool kNested>
__device__ __forceinline__ void load_tables(const Nf4View& w, float* table, float* code2) {
  if (threadIdx.x == 0) nf4::fill_code_table(table);
  if constexpr (kNested) {
    for (int i = threadIdx.x; i < nf4::kCode2Size; i += blockDim.x) code2[i] = w.code2[i];
  }
  __syncthreads();
}

template <bool kNested>
__device__ __forceinline__ float block_scale(const Nf4View& w, const float* code2, int64_t block) {
  if constexpr (kNested) {
    return nf4::nested_absmax(code2[w.absmax_q[block]], w.absmax2[block >> nf4::kNestedBlocksizeLog2], w.offset);
  } else {
    return w.absmax_f[block];
  }
}

template <typename T, bool kNested>
__global__ void __launch_bounds__(kThreads)
    dequant_rows_vec(const Nf4View w, T* __restrict__ out, int64_t ld, int64_t rows, int64_t k) {
  __shared__ float table[16];
  __shared__ float code2[kNested ? nf4::kCode2Size : 1];
  load_tables<kNested>(w, table, code2);
  constexpr int kVec = 16 / sizeof(T);
  const int64_t chunks_per_row = k / kChunk;
  const int64_t total = rows * chunks_per_row;
  for (int64_t c = blockIdx.x * int64_t{kThreads} + threadIdx.x; c < total; c += int64_t{gridDim.x} * kThreads) {
    const int64_t row = c / chunks_per_row;
    const int64_t col = (c - row * chunks_per_row) * kChunk;
    const int64_t first = c * kChunk;  // flattened element index (= row·k + col)
    const uint2 raw = *reinterpret_cast<const uint2*>(w.packed + first / 2);
    const float scale = block_scale<kNested>(w, code2, first >> w.shift);
    const uint32_t words[2] = {raw.x, raw.y};
    Vec<T, kVec> v[kChunk / kVec];
#pragma unroll
    for (int j = 0; j < kChunk / 2; ++j) {
      const uint32_t byte = (words[j / 4] >> (8 * (j % 4))) & 0xFFu;  // little-endian: byte j of the 8
      const int e = 2 * j;
      v[e / kVec].v[e % kVec] = static_cast<T>(nf4::dequant_value(table[nf4::high_nibble(byte)], scale));
      v[(e + 1) / kVec].v[(e + 1) % kVec] = static_cast<T>(nf4::dequant_value(table[nf4::low_nibble(byte)], scale));
    }
    T* dst = out + row * ld + col;
#pragma unroll
    for (int q = 0; q < kChunk / kVec; ++q) store_vec<T, kVec>(dst + q * kVec, v[q]);
  }
}

template <typename T, bool kNested>
__global__ void __launch_bounds__(kThreads)
    dequant_rows_scalar(const Nf4View w, T* __restrict__ out, int64_t ld, int64_t rows, int64_t k) {
  __shared__ float table[16];
  __shared__ float code2[kNested ? nf4::kCode2Size : 1];
  load_tables<kNested>(w, table, code2);
  const int64_t total = rows * k;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < total; i += int64_t{gridDim.x} * kThreads) {
    const int64_t row = i / k, col = i - row * k;
    const float scale = block_scale<kNested>(w, code2, i >> w.shift);
    out[row * ld + col] = static_cast<T>(nf4::dequant_value(table[nf4::code_at(w.packed, i)], scale));
  }
}

Nf4View make_view(const BaseWeight& b) {
  const bool nested = b.nested();
  return {b.weight.const_data_ptr<uint8_t>(),
          nested ? nullptr : b.absmax.const_data_ptr<float>(),
          nested ? b.absmax.const_data_ptr<uint8_t>() : nullptr,
          nested ? b.nested_code.const_data_ptr<float>() : nullptr,
          nested ? b.nested_absmax.const_data_ptr<float>() : nullptr,
          b.offset,
          nf4::log2_exact(b.blocksize)};
}

template <typename T, bool kNested>
void launch_dequant(const Nf4View& w, at::Tensor& out, int64_t rows, int64_t k) {
  T* dst = out.mutable_data_ptr<T>();
  const int64_t ld = out.stride(0);
  const bool vec = k % kChunk == 0 && aligned_to(w.packed, 8) && aligned_to(dst, 16) &&
                   (rows == 1 || (ld * static_cast<int64_t>(sizeof(T))) % 16 == 0);
  const int64_t work = vec ? rows * (k / kChunk) : rows * k;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(work, kThreads), int64_t{sm_count()} * 16));
  if (vec) {
    dequant_rows_vec<T, kNested><<<blocks, kThreads, 0, current_stream()>>>(w, dst, ld, rows, k);
  } else {
    dequant_rows_scalar<T, kNested><<<blocks, kThreads, 0, current_stream()>>>(w, dst, ld, rows, k);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaBackend {
  // out: [n, k] in the compute dtype, unit column stride, any row stride (a slice of the weight panel).
  static void dequantize(const BaseWeight& b, at::Tensor out) {
    const Nf4View w = make_view(b);
    SWIFTLORA_DISPATCH_FLOAT(out.scalar_type(), "qlora_dequantize_rows", [&] {
      if (b.nested()) {
        launch_dequant<scalar_t, true>(w, out, b.n, b.k);
      } else {
        launch_dequant<scalar_t, false>(w, out, b.n, b.k);
      }
    });
  }
};

}  // namespace
}  // namespace swiftlora::cuda

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) { swiftlora::qlora::register_ops<swiftlora::cuda::CudaBackend>(m); }
