// qlora_gemm on sm_90a (H100/H200), version 2 of qlora_linear's forward: y = x · dequant(W)ᵀ + xa · (s·B)ᵀ
// (+ bias) with the NF4 dequantization inside the GEMM main loop: no bf16 copy of W is written to global memory.
//
// CTA tile 128 (rows of x) × 128 (rows of W) × 64 (k), 256 threads = two warpgroups, each computing 64 × 128 with
// wgmma.mma_async m64n128k16 (fp32 accumulators, 64 registers a thread). Per k-tile:
//   - cp.async (16-byte chunks, zero-filled past M/N) brings the x tile (16 KB, bf16/fp16) and the packed W tile
//     (128 rows × 32 bytes = 4 KB: 4.5 bits a weight with the scales, the point of the fusion) into a 2-stage ring,
//     the next tile's loads in flight while this one is computed;
//   - every thread expands 32 codes (16 bytes of one W row, one block scale: blocksize >= 32) into bf16/fp16 in the
//     shared B tile (NF4 table and the 8-bit absmax map in shared memory, csrc/common/nf4_cuda.cuh);
//   - fence.proxy.async + barrier, then 4 wgmma k16 steps per warpgroup from K-major, non-swizzled shared layouts
//     (8-row × 16-byte core matrices: rows 16 B apart, the two k-halves LBO = 128 B apart, 8-row groups SBO = 256 B).
// The LoRA term is one extra k-tile: A from xa [M, R], B from s·B [N, R] (R <= 64, zero-filled to 64), loaded once.
// Epilogue: + bias in fp32, one rounding to the output dtype.
// Floor (x [4096, 4096], W [14336, 4096]): 481 GFLOP, 0.645 ms at 746 TFLOP/s; W read as 29 MB (+ scales).
// This first version serialises dequantization and MMA within a CTA (no producer/consumer warp specialisation,
// no swizzle, no TMA): correct, and the baseline for those steps (bench/NOTES.md, "QLoRA ops").
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_utils.cuh"
#include "common/nf4_cuda.cuh"
#include "cuda/qlora_gemm_sm90.h"

namespace swiftlora::cuda::sm90 {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64, kThreads = 256;
constexpr int kStages = 2;
constexpr int kTileA = kBM * kBK * 2;   // bytes of one x tile
constexpr int kTileB = kBN * kBK * 2;   // bytes of one dequantized W tile (and of the LoRA B tile)
constexpr int kTileP = kBN * kBK / 2;   // bytes of one packed W tile
constexpr int kOffP = kStages * kTileA;
constexpr int kOffB = kOffP + kStages * kTileP;
constexpr int kOffLB = kOffB + kTileB;
constexpr int kOffTables = kOffLB + kTileB;
constexpr int kSmemBytes = kOffTables + static_cast<int>(sizeof(nf4::Nf4Tables));

struct Params {
  const uint16_t* x;
  int64_t ldx;
  nf4::Nf4Args w;
  const uint16_t* xa;  // [M, R] (R = 0: none)
  int64_t ldxa;
  const uint16_t* lb;  // [N, R], already scaled
  int64_t ldlb;
  const uint16_t* bias;  // [N] or null
  uint16_t* y;
  int64_t ldy;
  int64_t m, n, k;
  int r;
  bool y_pairs;  // y rows 4-byte aligned: two outputs per store
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Byte offset of 8 elements (row, k 8·kc .. 8·kc + 7) in a [rows × 64] K-major tile: 4 k16 blocks of rows·32 bytes;
// in one, 8-row groups 256 B apart (SBO), the two k-halves 128 B apart (LBO), rows 16 B apart.
__device__ __forceinline__ int tile_offset(int rows, int row, int kc) {
  return (kc >> 1) * (rows * 32) + (row >> 3) * 256 + (kc & 1) * 128 + (row & 7) * 16;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// wgmma shared-memory matrix descriptor, no swizzle: start address, LBO and SBO in 16-byte units.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator reads/writes across the asynchronous MMA.
__device__ __forceinline__ void pin(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D[64 x 128] += A[64 x 16] · B[128 x 16]ᵀ for element type TY ("bf16" or "f16"), both operands K-major in shared
// memory (descriptors desc_a, desc_b), fp32 accumulators d[64] (d[4j + 2h + c] = row 16·warp + lane/4 + 8h,
// column 8j + 2·(lane % 4) + c).
#define SWIFTLORA_WGMMA_M64N128K16(TY)                                                                          \
  asm volatile(                                                                                                 \
      "{\n"                                                                                                     \
      ".reg .pred p;\n"                                                                                         \
      "setp.ne.b32 p, %66, 0;\n"                                                                                \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                                              \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                 \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                        \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                        \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                       \
      "%64, %65, p, 1, 1, 0, 0;\n"                                                                              \
      "}\n"                                                                                                     \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),         \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])  \
      : "l"(desc_a), "l"(desc_b), "r"(1))

template <bool kBf16>
__device__ __forceinline__ void wgmma_k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (kBf16) {
    SWIFTLORA_WGMMA_M64N128K16("bf16");
  } else {
    SWIFTLORA_WGMMA_M64N128K16("f16");
  }
}

template <bool kBf16>
__device__ __forceinline__ uint16_t to_bits(float v) {
  if constexpr (kBf16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

template <bool kBf16>
__device__ __forceinline__ float from_bits(uint16_t b) {
  if constexpr (kBf16) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  } else {
    return __half2float(__ushort_as_half(b));
  }
}

// cp.async of k-tile t into ring stage `stage`: the x (or, for the LoRA tile, xa) rows and, for a weight tile, the
// packed codes. Consecutive threads take consecutive 16-byte chunks of a row (coalesced global reads).
__device__ __forceinline__ void load_tile(const Params& p, uint8_t* smem, int t, int stage, int kt_base, int64_t m0,
                                          int64_t n0) {
  const bool lora = t >= kt_base;
  uint8_t* a = smem + stage * kTileA;
#pragma unroll
  for (int i = 0; i < kBM * 8 / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads, kc = c & 7, row = c >> 3;
    const int64_t gm = m0 + row;
    const bool valid = gm < p.m && (!lora || kc * 8 < p.r);
    const uint16_t* src = !valid ? p.x : lora ? p.xa + gm * p.ldxa + kc * 8 : p.x + gm * p.ldx + t * kBK + kc * 8;
    cp_async16(a + tile_offset(kBM, row, kc), src, valid);
  }
  if (!lora) {
    const int row = threadIdx.x >> 1, h = threadIdx.x & 1;
    const int64_t gn = n0 + row;
    const bool valid = gn < p.n;
    const uint8_t* src = valid ? p.w.packed + (gn * p.k + t * kBK) / 2 + h * 16 : p.w.packed;
    cp_async16(smem + kOffP + stage * kTileP + row * 32 + h * 16, src, valid);
  }
}

// The packed tile of `stage` -> bf16/fp16 B tile: thread = (row, half of the 64 k), 32 codes, one block scale.
template <bool kBf16>
__device__ __forceinline__ void dequant_tile(const Params& p, uint8_t* smem, const nf4::Nf4Tables& tables, int t,
                                             int stage, int64_t n0, float offset) {
  const int row = threadIdx.x & (kBN - 1), h = threadIdx.x >> 7;
  const int64_t gn = n0 + row;
  const uint4 raw = *reinterpret_cast<const uint4*>(smem + kOffP + stage * kTileP + row * 32 + h * 16);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  const float scale = gn < p.n ? nf4::block_scale(p.w, tables, (gn * p.k + t * kBK + h * 32) >> p.w.log2_blocksize,
                                                  offset)
                               : 0.f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {  // word q: elements 8q .. 8q + 7 of this half
    uint16_t v[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t byte = (words[q] >> (8 * j)) & 0xFFu;
      v[2 * j] = to_bits<kBf16>(nf4::dequant_value(tables.code[nf4::high_nibble(byte)], scale));
      v[2 * j + 1] = to_bits<kBf16>(nf4::dequant_value(tables.code[nf4::low_nibble(byte)], scale));
    }
    uint4 out;
    out.x = v[0] | (uint32_t{v[1]} << 16);
    out.y = v[2] | (uint32_t{v[3]} << 16);
    out.z = v[4] | (uint32_t{v[5]} << 16);
    out.w = v[6] | (uint32_t{v[7]} << 16);
    *reinterpret_cast<uint4*>(smem + kOffB + tile_offset(kBN, row, h * 4 + q)) = out;
  }
}

template <bool kBf16>
__device__ __forceinline__ void store_output(const Params& p, const float (&acc)[64], int64_t m0, int64_t n0) {
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int64_t col = n0 + j * 8 + (lane & 3) * 2;
    if (col >= p.n) continue;
    const bool two = col + 1 < p.n;
    const float b0 = p.bias ? from_bits<kBf16>(p.bias[col]) : 0.f;
    const float b1 = p.bias && two ? from_bits<kBf16>(p.bias[col + 1]) : 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + wg * 64 + warp * 16 + (lane >> 2) + h * 8;
      if (row >= p.m) continue;
      uint16_t* dst = p.y + row * p.ldy + col;
      const uint16_t v0 = to_bits<kBf16>(acc[4 * j + 2 * h] + b0);
      if (two && p.y_pairs) {
        *reinterpret_cast<uint32_t*>(dst) = v0 | (uint32_t{to_bits<kBf16>(acc[4 * j + 2 * h + 1] + b1)} << 16);
      } else {
        dst[0] = v0;
        if (two) dst[1] = to_bits<kBf16>(acc[4 * j + 2 * h + 1] + b1);
      }
    }
  }
}

#undef SWIFTLORA_WGMMA_M64N128K16

#endif  // sm_90a

template <bool kBf16>
__global__ void __launch_bounds__(kThreads, 1) qlora_gemm_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) uint8_t smem[];
  nf4::Nf4Tables& tables = *reinterpret_cast<nf4::Nf4Tables*>(smem + kOffTables);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int kt_base = static_cast<int>(p.k / kBK);
  const int kt_total = kt_base + (p.r > 0 ? 1 : 0);
  nf4::load_tables(tables, p.w);  // visible after the first barrier below
  const float offset = p.w.nested ? __ldg(p.w.offset) : 0.f;
  if (p.r > 0) {  // the LoRA B tile [128 rows of s·B, R <= 64 zero-filled], once
#pragma unroll
    for (int i = 0; i < kBN * 8 / kThreads; ++i) {
      const int c = threadIdx.x + i * kThreads, kc = c & 7, row = c >> 3;
      const int64_t gn = n0 + row;
      const bool valid = gn < p.n && kc * 8 < p.r;
      cp_async16(smem + kOffLB + tile_offset(kBN, row, kc), valid ? p.lb + gn * p.ldlb + kc * 8 : p.lb, valid);
    }
  }
  load_tile(p, smem, 0, 0, kt_base, m0, n0);
  cp_async_commit();

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  const uint32_t a_wg = smem_addr(smem) + (threadIdx.x >> 7) * (64 / 8) * 256;  // this warpgroup's 64 rows
  for (int t = 0; t < kt_total; ++t) {
    const int stage = t & 1;
    if (t + 1 < kt_total) load_tile(p, smem, t + 1, stage ^ 1, kt_base, m0, n0);
    cp_async_commit();
    cp_async_wait<1>();  // tile t (and the LoRA B tile) has landed for this thread
    __syncthreads();     // ... for every thread
    const bool lora = t >= kt_base;
    if (!lora) dequant_tile<kBf16>(p, smem, tables, t, stage, n0, offset);
    fence_proxy_async();  // generic-proxy shared writes (cp.async, st.shared) -> visible to wgmma
    __syncthreads();
    const uint32_t a_base = a_wg + stage * kTileA;
    const uint32_t b_base = smem_addr(smem + (lora ? kOffLB : kOffB));
    pin(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      wgmma_k16<kBf16>(acc, make_desc(a_base + kk * kBM * 32, 128, 256), make_desc(b_base + kk * kBN * 32, 128, 256));
    }
    wgmma_commit();
    wgmma_wait0();
    pin(acc);
    __syncthreads();  // the stage and B buffers are free for the next iteration's writes
  }
  store_output<kBf16>(p, acc, m0, n0);
#endif
}

}  // namespace

bool supported(const qlora::GemmArgs& a) {
#ifdef SWIFTLORA_WITH_SM90A
  if (!a.x.is_cuda()) return false;
  const auto dt = a.x.scalar_type();
  if (dt != at::kBFloat16 && dt != at::kHalf) return false;
  int major = 0, minor = 0;
  const int dev = a.x.get_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  if (major != 9 || minor != 0) return false;
  auto rows16 = [](const at::Tensor& t) {  // 16-byte aligned rows of 16-bit elements
    return aligned_to(t.const_data_ptr(), 16) && (t.size(0) == 1 || t.stride(0) % 8 == 0);
  };
  if (a.k % kBK != 0 || !rows16(a.x) || !aligned_to(a.w.nf4.packed.const_data_ptr(), 16)) return false;
  if (a.r > 0 && (a.r > 64 || a.r % 8 != 0 || !rows16(a.xa) || !rows16(a.lora_b))) return false;
  return true;
#else
  return false;
#endif
}

void run(const qlora::GemmArgs& a, at::Tensor& y) {
  Params p{};
  p.x = static_cast<const uint16_t*>(a.x.const_data_ptr());
  p.ldx = a.x.stride(0);
  p.w = nf4::nf4_args(a.w.nf4);
  if (a.r > 0) {
    p.xa = static_cast<const uint16_t*>(a.xa.const_data_ptr());
    p.ldxa = a.xa.stride(0);
    p.lb = static_cast<const uint16_t*>(a.lora_b.const_data_ptr());
    p.ldlb = a.lora_b.stride(0);
  }
  p.bias = a.bias.defined() ? static_cast<const uint16_t*>(a.bias.const_data_ptr()) : nullptr;
  p.y = static_cast<uint16_t*>(y.mutable_data_ptr());
  p.ldy = y.stride(0);
  p.m = a.m;
  p.n = a.n;
  p.k = a.k;
  p.r = static_cast<int>(a.r);
  p.y_pairs = aligned_to(p.y, 4) && p.ldy % 2 == 0;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.n, kBN)), static_cast<unsigned>(ceil_div(a.m, kBM)));
  auto launch = [&](auto kernel) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    kernel<<<grid, kThreads, kSmemBytes, current_stream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (a.x.scalar_type() == at::kBFloat16) {
    launch(qlora_gemm_kernel<true>);
  } else {
    launch(qlora_gemm_kernel<false>);
  }
}

}  // namespace swiftlora::cuda::sm90
