// A flat NF4 dequantization kernel (a contiguous run of elements into a contiguous output: nf4_dequantize's whole
// tensor, a qlora row chunk whose rows are dense), bit-identical to nf4_dequant.cu's word kernel: per element
// dtype(mul_ftz(table[code], scale)). Selected by SWIFTLORA_NF4_DEQUANT_VARIANT (nf4_dequant.cu).
//
// Why: the word kernel spends 16.6 thread-instructions per element (ncu: 30.4 M warp instructions at 51.4 µs,
// issue 0.62 per scheduler, no-eligible 38%): a nibble extract, a table load, a multiply and a conversion per
// element, 64-bit addressing per word. Here a packed byte becomes its two fp32 table values with ONE byte_perm and
// ONE 8-byte LDS: a 256-entry pair table in shared memory, replicated per lane (conflict-free), at a 64 KiB-aligned
// shared address, entry e of lane l at e·256 + 8l (the byte_perm takes byte 1 from the word and bytes 0, 2, 3 from
// table + 8l). Per word of 8 codes: 4 PRMT + 4 LDS.64 + 8 FMUL.FTZ + 4 F2FP + 1 STG.128 + the scale (3 loads,
// decode) and 32-bit addressing: ~5 instructions per element.
// The table takes 64 KiB + 64 KiB of alignment slack, so the grid is persistent: one 1024-thread CTA per SM, words
// dealt round-robin (thread i takes words i, i + stride, ...: every warp load 128 contiguous bytes, every warp
// store 512), a ring of `kAhead` words per thread (kAhead - 1 in flight while one is decoded), the table filled
// behind the first loads.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <map>
#include <mutex>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "cuda/nf4_dequant_table.h"

namespace swiftlora::cuda {
namespace {

using nf4::Nf4Args;

constexpr int kThreads = 1024;
constexpr int kAhead = 4;
constexpr uint32_t kTableBytes = 256 * 256;
constexpr int kCode2Offset = 0;  // float[256], then the table at the next 64 KiB-aligned shared address

// One word's raw loads: the 8 codes and its block's scale inputs.
struct WordLoad {
  uint32_t w, q;
  float v;  // nested: absmax2 of the block's group; plain: the block's absmax
};

template <bool Nested>
__device__ __forceinline__ WordLoad load_word(const Nf4Args& a, uint32_t e0) {
  WordLoad l;
  l.w = __ldcs(reinterpret_cast<const uint32_t*>(a.packed) + e0 / 8);
  const uint32_t b = e0 >> a.log2_blocksize;
  if constexpr (Nested) {
    l.q = __ldg(a.qabsmax + b);
    l.v = __ldg(a.absmax2 + (b >> nf4::kNestedBlocksizeLog2));
  } else {
    l.q = 0;
    l.v = __ldg(a.absmax + b);
  }
  return l;
}

template <typename T>
__device__ __forceinline__ uint32_t to_pair(float lo, float hi) {  // round each to T (RN), lo in bits 0..15
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&p);
  } else {
    const __half2 p = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&p);
  }
}

__device__ __forceinline__ uint32_t pinned(uint32_t v) {  // kept in a register, not recomputed in the loop
  asm volatile("" : "+r"(v));
  return v;
}

template <typename T, bool Nested, bool Stream>
__global__ void __launch_bounds__(kThreads, 1) nf4_dequant_table_kernel(Nf4Args a, uint32_t first, uint32_t nwords,
                                                                      T* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t tid = threadIdx.x, lane = tid & 31;
  const uint32_t stride = gridDim.x * kThreads;
  uint32_t i = blockIdx.x * kThreads + tid;
  WordLoad ring[kAhead];
#pragma unroll
  for (int d = 0; d < kAhead; ++d) {
    if (i + d * stride < nwords) ring[d] = load_word<Nested>(a, first + 8 * (i + d * stride));
  }
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t table = (smem_base + 256 * 4 + 0xFFFFu) & ~0xFFFFu;
  const uint32_t lane_base = pinned(table + 8 * lane);
  {  // the tables, behind the first loads
    float* code2 = reinterpret_cast<float*>(smem + kCode2Offset);
    if (Nested && tid < nf4::kCode2Size) code2[tid] = __ldg(a.code2 + tid);
    const float v[16] = {SWIFTLORA_NF4_CODE_VALUES};
    unsigned char* tab = smem + (table - smem_base);
    for (uint32_t p = tid; p < 256 * 16; p += kThreads) {  // row e = p / 16, lanes 2(p % 16), 2(p % 16) + 1
      const uint32_t e = p >> 4;
      float hi = 0.f, lo = 0.f;  // element 2j (high nibble), 2j + 1; selects, not a local-memory array
#pragma unroll
      for (int c = 0; c < 16; ++c) {
        hi = (e >> 4) == static_cast<uint32_t>(c) ? v[c] : hi;
        lo = (e & 15u) == static_cast<uint32_t>(c) ? v[c] : lo;
      }
      *reinterpret_cast<float4*>(tab + e * 256 + (p & 15) * 16) = make_float4(hi, lo, hi, lo);
    }
  }
  __syncthreads();
  const float offset = Nested ? __ldg(a.offset) : 0.f;
  const float* code2 = reinterpret_cast<const float*>(smem + kCode2Offset);

  for (; i < nwords; i += kAhead * stride) {
#pragma unroll
    for (int d = 0; d < kAhead; ++d) {
      const uint32_t word = i + d * stride;
      if (word < nwords) {
        const WordLoad& cur = ring[d];
        const float scale = Nested ? nf4::nested_absmax(code2[cur.q], cur.v, offset) : cur.v;
        float f[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // byte j: elements 2j (high nibble) and 2j + 1
          const uint32_t addr = __byte_perm(cur.w, lane_base, 0x7604u | (static_cast<uint32_t>(j) << 4));
          float2 pr;
          asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];" : "=f"(pr.x), "=f"(pr.y) : "r"(addr));
          f[2 * j] = nf4::dequant_value(pr.x, scale);
          f[2 * j + 1] = nf4::dequant_value(pr.y, scale);
        }
        // The slot is free: the word kAhead rounds on goes in flight behind the kAhead - 1 already there.
        if (word + kAhead * stride < nwords) ring[d] = load_word<Nested>(a, first + 8 * (word + kAhead * stride));
        T* dst = out + static_cast<int64_t>(word) * 8;
        if constexpr (std::is_same_v<T, float>) {
          const float4 lo = make_float4(f[0], f[1], f[2], f[3]), hi = make_float4(f[4], f[5], f[6], f[7]);
          if constexpr (Stream) {
            __stcs(reinterpret_cast<float4*>(dst), lo);
            __stcs(reinterpret_cast<float4*>(dst) + 1, hi);
          } else {
            reinterpret_cast<float4*>(dst)[0] = lo;
            reinterpret_cast<float4*>(dst)[1] = hi;
          }
        } else {
          const uint4 v = make_uint4(to_pair<T>(f[0], f[1]), to_pair<T>(f[2], f[3]), to_pair<T>(f[4], f[5]),
                                     to_pair<T>(f[6], f[7]));
          if constexpr (Stream) {
            __stcs(reinterpret_cast<uint4*>(dst), v);
          } else {
            *reinterpret_cast<uint4*>(dst) = v;
          }
        }
      }
    }
  }
}

template <typename T, bool Nested, bool Stream>
bool launch(const Nf4Args& a, uint32_t first, uint32_t nwords, T* out, int max_smem, cudaStream_t stream) {
  auto kernel = nf4_dequant_table_kernel<T, Nested, Stream>;
  const std::size_t smem = 256 * 4 + 2 * kTableBytes;
  if (smem > static_cast<std::size_t>(max_smem)) return false;
  static std::mutex mu;
  static std::map<int, int> ctas_per_sm;  // device -> resident CTAs per SM (1, or 0 if it cannot run)
  int per_sm = 0;
  {
    const std::lock_guard<std::mutex> lock(mu);
    const int dev = c10::cuda::current_device();
    auto it = ctas_per_sm.find(dev);
    if (it == ctas_per_sm.end()) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
      it = ctas_per_sm.emplace(dev, per_sm).first;
    }
    per_sm = it->second;
  }
  if (per_sm < 1) return false;
  const int64_t grid = std::min<int64_t>(sm_count(), ceil_div(nwords, kThreads));
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(a, first, nwords, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace

template <typename T>
bool launch_nf4_dequant_table(const Nf4Args& a, int64_t first, int64_t count, T* out, bool streaming, int max_smem,
                              cudaStream_t stream) {
  // 32-bit element indices; whole words of 8 codes; 4-byte packed words and 16-byte output stores.
  if (count <= 0 || first % 8 != 0 || count % 8 != 0 || first + count >= (int64_t{1} << 32) ||
      !aligned_to(a.packed, 4) || !aligned_to(out, 16)) {
    return false;
  }
  const auto f = static_cast<uint32_t>(first), nw = static_cast<uint32_t>(count / 8);
  if (a.nested) {
    return streaming ? launch<T, true, true>(a, f, nw, out, max_smem, stream)
                     : launch<T, true, false>(a, f, nw, out, max_smem, stream);
  }
  return streaming ? launch<T, false, true>(a, f, nw, out, max_smem, stream)
                   : launch<T, false, false>(a, f, nw, out, max_smem, stream);
}

template bool launch_nf4_dequant_table<float>(const Nf4Args&, int64_t, int64_t, float*, bool, int, cudaStream_t);
template bool launch_nf4_dequant_table<c10::Half>(const Nf4Args&, int64_t, int64_t, c10::Half*, bool, int,
                                                  cudaStream_t);
template bool launch_nf4_dequant_table<c10::BFloat16>(const Nf4Args&, int64_t, int64_t, c10::BFloat16*, bool, int,
                                                      cudaStream_t);

}  // namespace swiftlora::cuda
