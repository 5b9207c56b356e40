// SwiGLU / GeGLU on CUDA: h = act(gate)·up; backward d gate = grad·up·act'(gate), d up = grad·act(gate) (in place
// also h, into grad's buffer). float32 math from csrc/common/glu_math.h; checks and dispatch in glu_host.h.
// Floor: pure streaming, no reuse. Forward moves 3 elements per element (read gate, up; write h), backward 5, the
// in-place backward 6: the target is device-to-device copy bandwidth.
// Launch: one elementwise kernel for all six ops. Operands are [rows, n], each with its own row stride (e.g. the two
// halves of a fused gate/up projection); when every operand is contiguous they become one row of rows·n elements.
// Plain (default-cached) loads: 3% faster than streaming __ldcs loads in the backward on the H100.
// A block is 256 threads shaped [threads per row] x [rows per block]; a thread moves kItems 16-byte vectors of
// every operand per step (all loads issued before the math), the vectors of one item adjacent across the threads
// of a warp. The grid is (column chunks, row groups) with grid-stride loops on both, so any size fits. Rows that
// do not start 16-byte aligned take the same kernel with one element per vector; a row's last partial vector is
// done element by element.
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_utils.cuh"
#include "common/glu_host.h"

namespace swiftlora::cuda {
namespace {

using glu::GluOperands;

constexpr int kBlockThreads = 256;
constexpr int kItems = 2;            // vectors per operand per thread per step
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y
constexpr int64_t kMaxGridX = INT32_MAX;

// Converts VEC elements of every input to float, applies f, stores VEC elements of every output at col.
template <typename T, int VEC, typename F>
__device__ __forceinline__ void apply_vec(const F& f, const Vec<T, VEC> (&x)[F::kIn], T* const (&out)[F::kOut],
                                          int64_t col) {
  Vec<T, VEC> y[F::kOut];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float xf[F::kIn], yf[F::kOut];
#pragma unroll
    for (int k = 0; k < F::kIn; ++k) xf[k] = static_cast<float>(x[k].v[j]);
    f(xf, yf);
#pragma unroll
    for (int k = 0; k < F::kOut; ++k) y[k].v[j] = static_cast<T>(yf[k]);
  }
#pragma unroll
  for (int k = 0; k < F::kOut; ++k) store_vec<T, VEC>(out[k] + col, y[k]);
}

template <typename T, typename F>
__device__ __forceinline__ void apply_one(const F& f, const T* const (&in)[F::kIn], T* const (&out)[F::kOut],
                                          int64_t col) {
  float xf[F::kIn], yf[F::kOut];
#pragma unroll
  for (int k = 0; k < F::kIn; ++k) xf[k] = static_cast<float>(in[k][col]);
  f(xf, yf);
#pragma unroll
  for (int k = 0; k < F::kOut; ++k) out[k][col] = static_cast<T>(yf[k]);
}

// Outputs may alias inputs element for element (in-place backward), so no __restrict__: each thread reads all
// its elements of a step before writing any of them.
template <typename T, int VEC, typename F>
__global__ void __launch_bounds__(kBlockThreads) glu_kernel(const GluOperands<T, F::kIn, F::kOut> o, const F f) {
  constexpr int kIn = F::kIn, kOut = F::kOut;
  const int64_t item_step = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * item_step * kItems;
  const int64_t col_first = static_cast<int64_t>(blockIdx.x) * item_step * kItems + threadIdx.x * VEC;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < o.rows; row += row_step) {
    const T* in[kIn];
    T* out[kOut];
#pragma unroll
    for (int k = 0; k < kIn; ++k) in[k] = o.in[k] + row * o.in_stride[k];
#pragma unroll
    for (int k = 0; k < kOut; ++k) out[k] = o.out[k] + row * o.out_stride[k];
    for (int64_t col = col_first; col < o.n; col += col_step) {
      if (col + (kItems - 1) * item_step + VEC <= o.n) {  // every item a whole vector: loads first, then math
        Vec<T, VEC> x[kItems][kIn];
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
#pragma unroll
          for (int k = 0; k < kIn; ++k) x[i][k] = load_vec<T, VEC>(in[k] + col + i * item_step);
        }
#pragma unroll
        for (int i = 0; i < kItems; ++i) apply_vec<T, VEC>(f, x[i], out, col + i * item_step);
      } else {  // the row's end: whole vectors, then single elements
        for (int i = 0; i < kItems; ++i) {
          const int64_t c = col + i * item_step;
          if (c + VEC <= o.n) {
            Vec<T, VEC> x[kIn];
#pragma unroll
            for (int k = 0; k < kIn; ++k) x[k] = load_vec<T, VEC>(in[k] + c);
            apply_vec<T, VEC>(f, x, out, c);
          } else {
            for (int64_t e = c; e < o.n; ++e) apply_one<T>(f, in, out, e);
          }
        }
      }
    }
  }
}

// All operands contiguous ([rows, n] with row stride n): one row of rows·n elements, so rows narrower than a
// block's columns still fill whole vectors and warps.
template <typename T, int kIn, int kOut>
void flatten_if_contiguous(GluOperands<T, kIn, kOut>& o) {
  bool contiguous = true;
  for (int k = 0; k < kIn; ++k) contiguous = contiguous && o.in_stride[k] == o.n;
  for (int k = 0; k < kOut; ++k) contiguous = contiguous && o.out_stride[k] == o.n;
  if (!contiguous || o.rows == 1) return;
  o.n *= o.rows;
  o.rows = 1;
  for (int k = 0; k < kIn; ++k) o.in_stride[k] = o.n;
  for (int k = 0; k < kOut; ++k) o.out_stride[k] = o.n;
}

// Every row of every operand starts 16-byte aligned.
template <typename T, int kIn, int kOut>
bool rows_aligned(const GluOperands<T, kIn, kOut>& o) {
  auto ok = [&](const void* p, int64_t stride) {
    return aligned_to(p, 16) && (o.rows == 1 || (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0);
  };
  bool aligned = true;
  for (int k = 0; k < kIn; ++k) aligned = aligned && ok(o.in[k], o.in_stride[k]);
  for (int k = 0; k < kOut; ++k) aligned = aligned && ok(o.out[k], o.out_stride[k]);
  return aligned;
}

template <typename T, int VEC, typename F>
void launch(const F& f, const GluOperands<T, F::kIn, F::kOut>& o) {
  // Threads per row: the smallest power of two >= 32 whose kItems vectors each cover the row, at most a block.
  const int64_t vectors = ceil_div(o.n, VEC);
  int tpr = 32;
  while (tpr < kBlockThreads && int64_t{tpr} * kItems < vectors) tpr *= 2;
  const int rows_per_block = kBlockThreads / tpr;
  const dim3 block(tpr, rows_per_block);
  const dim3 grid(static_cast<unsigned>(std::min(ceil_div(o.n, int64_t{tpr} * kItems * VEC), kMaxGridX)),
                  static_cast<unsigned>(std::min(ceil_div(o.rows, rows_per_block), kMaxGridY)));
  glu_kernel<T, VEC, F><<<grid, block, 0, current_stream()>>>(o, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct RunCuda {
  template <typename F, typename T, int kIn, int kOut>
  void operator()(const F& f, GluOperands<T, kIn, kOut> o) const {
    flatten_if_contiguous(o);
    if (rows_aligned(o)) {
      launch<T, 16 / sizeof(T)>(f, o);
    } else {
      launch<T, 1>(f, o);
    }
  }
};

}  // namespace
}  // namespace swiftlora::cuda

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) {
  swiftlora::glu::register_ops<swiftlora::cuda::RunCuda>(m);  // swiglu, swiglu_backward(_), geglu, geglu_backward(_)
}
