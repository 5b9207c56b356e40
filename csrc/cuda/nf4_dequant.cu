// The NF4 dequantization kernel behind nf4_dequantize (a whole tensor) and the qlora ops (a row or column chunk of
// a weight into a strided slice of a scratch panel): bit-identical to bitsandbytes' dequantize_4bit (common/nf4.h).
//
// Floor: read n/2 packed bytes (+ n/blocksize scales), write n outputs: 2.5 bytes per element in bf16/fp16
// (W[14336, 4096]: 29 MB read + 117 MB written, 0.049 ms at 3.0 TB/s). Being memory-bound, what matters is bytes
// in flight and no idle gaps, so:
//   - each thread owns kWords packed 32-bit words (8 elements each) of a kThreads·kWords-word tile, at a stride of
//     one CTA width: every warp load is 128 contiguous bytes and every warp store 32 × 16 contiguous bytes (bf16).
//     (A 16-byte load per thread would make the thread's 4 stores 64 bytes apart: 4× the L2 store requests.)
//   - a word's scale inputs (qabsmax, absmax2, or absmax) depend only on its position, so they are loaded together
//     with the words: one memory latency per tile, not three dependent ones;
//   - the grid covers the work once with short CTAs (one kThreads·kWords-word tile each: 7,168 at the shape
//     above; 40 registers, 6 CTAs per SM), as the flat kernel this one replaced: a persistent grid with a tile
//     loop and prefetch of tile t+1 measured 9% slower (bench/NOTES.md). Each thread issues all its loads before
//     the shared-memory tables are loaded, so the table fill hides behind them; CTAs that finish make room for
//     new ones with no tail imbalance.
// Outputs use plain stores: the qlora GEMM reads a chunk right after, ideally from L2.
// The rectangle (Nf4Rect) is walked word by word with an incremental (row, word-in-row) position: no division per
// word. Elements a word path cannot take (packed data not 4-byte aligned, rows not multiples of 8 elements, output
// rows not 16-byte aligned, the tail of a single row) go through a one-element-per-thread loop.
// A flat kernel with a per-lane 256-entry byte → value-pair table (6 instructions a value instead of ~16, one
// 1024-thread CTA per SM) measured slower on the H100: 62.6 µs against 53.7 (bench/NOTES.md; in the history).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "cuda/nf4_dequant.h"

namespace swiftlora::cuda {
namespace {

using nf4::Nf4Args;
using nf4::Nf4Tables;
using nf4::ScaleParts;

constexpr int kThreads = 256;
constexpr int kWords = 4;
constexpr int64_t kTile = int64_t{kThreads} * kWords;  // words per CTA

// A word's place in the rectangle, and a step of s words as (s / words_per_row rows, s % words_per_row words).
struct Pos {
  int64_t row, word;
};
struct Step {
  int64_t rows, words;
};

__device__ __forceinline__ Pos advance(Pos p, Step s, int64_t wpr) {
  p.row += s.rows;
  p.word += s.words;
  if (p.word >= wpr) {  // both terms < wpr: one wrap at most
    p.word -= wpr;
    ++p.row;
  }
  return p;
}

struct WalkArgs {
  int64_t wpr = 0, nwords = 0;  // words per row, words in the rectangle
  Step in_tile{};               // kThreads words
};

struct Stage {
  uint32_t w[kWords];
  ScaleParts s[kWords];
};

__device__ __forceinline__ void load_stage(Stage& st, const Nf4Args& a, const Nf4Rect& r, const WalkArgs& wa,
                                           int64_t g, Pos p) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(a.packed);
#pragma unroll
  for (int i = 0; i < kWords; ++i, p = advance(p, wa.in_tile, wa.wpr)) {
    if (g + i * kThreads >= wa.nwords) break;
    const int64_t e = r.first + p.row * r.src_ld + p.word * 8;
    st.w[i] = __ldcs(words + e / 8);  // read once: evict-first
    st.s[i] = nf4::load_scale_parts(a, e >> a.log2_blocksize);
  }
}

template <typename T>
__device__ __forceinline__ void store_stage(const Stage& st, const Nf4Args& a, const Nf4Tables& t, float offset,
                                            const Nf4Rect& r, const WalkArgs& wa, T* __restrict__ out, int64_t g,
                                            Pos p) {
#pragma unroll
  for (int i = 0; i < kWords; ++i, p = advance(p, wa.in_tile, wa.wpr)) {
    if (g + i * kThreads >= wa.nwords) break;
    const float scale = nf4::scale_from_parts(a, t, st.s[i], offset);
    Vec<T, 8> v;
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // byte j holds elements 2j (high nibble) and 2j + 1 (low nibble)
      const uint32_t byte = (st.w[i] >> (8 * j)) & 0xFFu;
      v.v[2 * j] = static_cast<T>(nf4::dequant_value(t.code[nf4::high_nibble(byte)], scale));
      v.v[2 * j + 1] = static_cast<T>(nf4::dequant_value(t.code[nf4::low_nibble(byte)], scale));
    }
    T* dst = out + p.row * r.ld + p.word * 8;
    if constexpr (sizeof(T) == 2) {
      store_vec<T, 8>(dst, v);
    } else {  // rows are only known to be 16-byte aligned
      store_vec<T, 4>(dst, *reinterpret_cast<const Vec<T, 4>*>(&v.v[0]));
      store_vec<T, 4>(dst + 4, *reinterpret_cast<const Vec<T, 4>*>(&v.v[4]));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_dequant_words(Nf4Args a, Nf4Rect r, WalkArgs wa, T* __restrict__ out) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const Pos p{g / wa.wpr, g % wa.wpr};
  Stage st;
  load_stage(st, a, r, wa, g, p);  // in flight while the tables load
  __shared__ Nf4Tables tables;
  nf4::load_tables(tables, a);
  __syncthreads();
  const float offset = a.nested ? __ldg(a.offset) : 0.f;
  store_stage<T>(st, a, tables, offset, r, wa, out, g, p);
}

// Every element of the rectangle, one per thread (the rare layouts the word kernel cannot take).
template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_dequant_elements(Nf4Args a, Nf4Rect r, T* __restrict__ out) {
  __shared__ Nf4Tables tables;
  nf4::load_tables(tables, a);
  __syncthreads();
  const float offset = a.nested ? __ldg(a.offset) : 0.f;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < r.rows * r.cols;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = i / r.cols, col = i - row * r.cols, e = r.first + row * r.src_ld + col;
    const float scale = nf4::block_scale(a, tables, e >> a.log2_blocksize, offset);
    out[row * r.ld + col] = static_cast<T>(nf4::dequant_value(tables.code[nf4::code_at(a.packed, e)], scale));
  }
}

template <typename T>
void launch_words(const Nf4Args& a, const Nf4Rect& r, T* out, cudaStream_t stream) {
  WalkArgs wa;
  wa.wpr = r.cols / 8;
  wa.nwords = r.rows * wa.wpr;
  const int64_t grid = ceil_div(wa.nwords, kTile);  // one tile per CTA (< 2^31 CTAs for any tensor that fits)
  wa.in_tile = {kThreads / wa.wpr, kThreads % wa.wpr};
  nf4_dequant_words<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, r, wa, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_elements(const Nf4Args& a, const Nf4Rect& r, T* out, cudaStream_t stream) {
  const int64_t grid = std::min<int64_t>(ceil_div(r.rows * r.cols, kThreads), 8 * sm_count());
  nf4_dequant_elements<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, r, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void launch_nf4_dequant(const Nf4Args& a, const Nf4Rect& rect, T* out, cudaStream_t stream) {
  if (rect.rows <= 0 || rect.cols <= 0) return;
  const bool one_row = rect.rows == 1;
  const bool words = rect.cols >= 8 && aligned_to(a.packed, 4) && rect.first % 8 == 0 && aligned_to(out, 16) &&
                     (one_row || (rect.cols % 8 == 0 && rect.src_ld % 8 == 0 &&
                                  (rect.ld * static_cast<int64_t>(sizeof(T))) % 16 == 0));
  if (!words) {
    launch_elements<T>(a, rect, out, stream);
    return;
  }
  launch_words<T>(a, rect, out, stream);
  const int64_t done = rect.cols / 8 * 8;
  if (one_row && done < rect.cols) {  // the last cols % 8 elements of a single row
    const Nf4Rect tail{rect.first + done, 1, rect.cols - done, rect.cols - done, rect.cols - done};
    launch_elements<T>(a, tail, out + done, stream);
  }
}

template void launch_nf4_dequant<float>(const Nf4Args&, const Nf4Rect&, float*, cudaStream_t);
template void launch_nf4_dequant<c10::Half>(const Nf4Args&, const Nf4Rect&, c10::Half*, cudaStream_t);
template void launch_nf4_dequant<c10::BFloat16>(const Nf4Args&, const Nf4Rect&, c10::BFloat16*, cudaStream_t);

}  // namespace swiftlora::cuda
