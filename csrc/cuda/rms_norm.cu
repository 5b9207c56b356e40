// RMSNorm on CUDA. Forward y = x·rstd·(w + offset), rstd = rsqrt(mean(x²) + eps); backward
//   dx = rstd·(g·wn − x̂·mean(g·wn·x̂)),  dw = Σ_rows g·x̂   (x̂ = x·rstd, wn = w + offset).
// Floor: forward reads x and writes y (2·N·H elements); backward reads g and x and writes dx (3·N·H), plus a
// float32 dw partial per resident row slot, summed by a second small reduction.
// Launch: a row is owned by `tpr` threads (a power of two, 32..1024), each holding ITEMS 16-byte vectors of it
// in registers, so x and g are read from memory once. Blocks hold 256/tpr rows when tpr < 256. The backward is a
// persistent grid (one wave of resident blocks) so each thread keeps its columns' dw in registers across rows.
// Rows whose width or alignment rule out 16-byte vectors take a scalar loop kernel that reads twice (via L2).
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "ops.h"

namespace swiftlora::cuda {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kMaxRowsPerBlock = kBlockThreads / 32;

// ---------------------------------------------------------------------------------------------------- forward
// SMALL: 256-thread blocks, register budget for 8 resident blocks per SM (occupancy hides the reduction's
// barrier; measured 2.5% faster on the H100 at H = 4096); other widths take up to 1024 threads.
template <typename T, int VEC, int ITEMS, bool SMALL>
__global__ void __launch_bounds__(SMALL ? kBlockThreads : 1024, SMALL ? 8 : 1) rms_norm_fwd_kernel(const T* __restrict__ x, int64_t x_stride,
                                                            const T* __restrict__ w, T* __restrict__ y,
                                                            float* __restrict__ rstd, int64_t rows, int h, float eps,
                                                            float offset) {
  __shared__ float scratch[kMaxRowsPerBlock * 32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < rows;
  Vec<T, VEC> xv[ITEMS];
  float ss = 0.f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * blockDim.x + threadIdx.x) * VEC;
    if (active && col < h) {
      xv[it] = load_vec_stream<T, VEC>(x + row * x_stride + col);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += static_cast<float>(xv[it].v[j]) * static_cast<float>(xv[it].v[j]);
    }
  }
  ss = row_sum(ss, scratch);
  if (!active) return;
  const float rs = rsqrtf(ss / static_cast<float>(h) + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * blockDim.x + threadIdx.x) * VEC;
    if (col < h) {
      const Vec<T, VEC> wv = load_vec<T, VEC>(w + col);
      Vec<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        out.v[j] = static_cast<T>(static_cast<float>(xv[it].v[j]) * rs * (static_cast<float>(wv.v[j]) + offset));
      }
      store_vec<T, VEC>(y + row * static_cast<int64_t>(h) + col, out);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(1024) rms_norm_fwd_loop_kernel(const T* __restrict__ x, int64_t x_stride,
                                                                 const T* __restrict__ w, T* __restrict__ y,
                                                                 float* __restrict__ rstd, int64_t rows, int h,
                                                                 float eps, float offset) {
  __shared__ float scratch[kMaxRowsPerBlock * 32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < rows;
  const T* xr = x + row * x_stride;
  float ss = 0.f;
  for (int col = threadIdx.x; active && col < h; col += blockDim.x) {
    const float v = static_cast<float>(xr[col]);
    ss += v * v;
  }
  ss = row_sum(ss, scratch);
  if (!active) return;
  const float rs = rsqrtf(ss / static_cast<float>(h) + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  T* yr = y + row * static_cast<int64_t>(h);
  for (int col = threadIdx.x; col < h; col += blockDim.x) {
    yr[col] = static_cast<T>(static_cast<float>(xr[col]) * rs * (static_cast<float>(w[col]) + offset));
  }
}

// --------------------------------------------------------------------------------------------------- backward
// dx may alias g (in-place backward): each thread reads its elements before writing them.
// One row per thread row and step; w is re-read from L1 rather than held in registers. With PREFETCH (the
// persistent dw variant, 256-thread blocks) the next row's g and x are loaded before this row's reduction, so a
// block keeps loads in flight across its barriers.
template <typename T, int VEC, int ITEMS, bool PREFETCH, bool WGRAD>
__global__ void __launch_bounds__(PREFETCH ? kBlockThreads : 1024)
    rms_norm_bwd_kernel(const T* g, int64_t g_stride, const T* __restrict__ x, int64_t x_stride,
                        const T* __restrict__ w, const float* __restrict__ rstd, T* dx, int64_t dx_stride,
                        float* __restrict__ dw_partial, int64_t rows, int h, float offset) {
  __shared__ float scratch[kMaxRowsPerBlock * 32];
  float dw[ITEMS][VEC];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[it][j] = 0.f;
  }
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  auto load_row = [&](int64_t row, Vec<T, VEC> (&gv)[ITEMS], Vec<T, VEC> (&xv)[ITEMS]) {
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * blockDim.x + threadIdx.x) * VEC;
      if (row < rows && col < h) {
        gv[it] = load_vec<T, VEC>(g + row * g_stride + col);  // plain loads measured faster here
        xv[it] = load_vec<T, VEC>(x + row * x_stride + col);
      }
    }
  };
  Vec<T, VEC> gv[ITEMS], xv[ITEMS];
  int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y;
  if constexpr (PREFETCH) load_row(base + threadIdx.y, gv, xv);
  // The loop bound is uniform over the block (row_sum synchronises the whole block).
  for (; base < rows; base += row_step) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    if constexpr (!PREFETCH) load_row(row, gv, xv);
    Vec<T, VEC> gn[PREFETCH ? ITEMS : 1], xn[PREFETCH ? ITEMS : 1];
    if constexpr (PREFETCH) load_row(row + row_step, gn, xn);
    const float rs = active ? rstd[row] : 0.f;
    float dot = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * blockDim.x + threadIdx.x) * VEC;
      if (!active || col >= h) continue;
      const Vec<T, VEC> wv = load_vec<T, VEC>(w + col);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        dot += static_cast<float>(gv[it].v[j]) * (static_cast<float>(wv.v[j]) + offset) *
               static_cast<float>(xv[it].v[j]);
      }
    }
    const float mean = row_sum(dot, scratch) * rs / static_cast<float>(h);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * blockDim.x + threadIdx.x) * VEC;
      if (!active || col >= h) continue;
      const Vec<T, VEC> wv = load_vec<T, VEC>(w + col);
      Vec<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float gj = static_cast<float>(gv[it].v[j]);
        const float xhat = static_cast<float>(xv[it].v[j]) * rs;
        if constexpr (WGRAD) dw[it][j] += gj * xhat;
        out.v[j] = static_cast<T>(rs * (gj * (static_cast<float>(wv.v[j]) + offset) - xhat * mean));
      }
      store_vec<T, VEC>(dx + row * dx_stride + col, out);
    }
    if constexpr (PREFETCH) {
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        gv[it] = gn[it];
        xv[it] = xn[it];
      }
    }
  }
  if constexpr (!WGRAD) return;
  float* slot = dw_partial + (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * h;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * blockDim.x + threadIdx.x) * VEC;
    if (col < h) {
      if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int j = 0; j < VEC; j += 4) {
          store_vec<float, 4>(slot + col + j, Vec<float, 4>{{dw[it][j], dw[it][j + 1], dw[it][j + 2], dw[it][j + 3]}});
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) slot[col + j] = dw[it][j];
      }
    }
  }
}

// Scalar fallback; dw_partial (zero-initialised, one row per row slot) is accumulated in place.
template <typename T>
__global__ void __launch_bounds__(1024) rms_norm_bwd_loop_kernel(const T* g, int64_t g_stride,
                                                                 const T* __restrict__ x, int64_t x_stride,
                                                                 const T* __restrict__ w,
                                                                 const float* __restrict__ rstd, T* dx,
                                                                 int64_t dx_stride, float* __restrict__ dw_partial,
                                                                 int64_t rows, int h, float offset) {
  __shared__ float scratch[kMaxRowsPerBlock * 32];
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t slot_id = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  float* slot = dw_partial ? dw_partial + slot_id * h : nullptr;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += row_step) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    const float rs = active ? rstd[row] : 0.f;
    const T* gr = g + row * g_stride;
    const T* xr = x + row * x_stride;
    float dot = 0.f;
    for (int col = threadIdx.x; active && col < h; col += blockDim.x) {
      dot += static_cast<float>(gr[col]) * (static_cast<float>(w[col]) + offset) * static_cast<float>(xr[col]);
    }
    const float mean = row_sum(dot, scratch) * rs / static_cast<float>(h);
    if (!active) continue;
    T* dxr = dx + row * dx_stride;
    for (int col = threadIdx.x; col < h; col += blockDim.x) {
      const float gj = static_cast<float>(gr[col]);
      const float xhat = static_cast<float>(xr[col]) * rs;
      if (slot) slot[col] += gj * xhat;
      dxr[col] = static_cast<T>(rs * (gj * (static_cast<float>(w[col]) + offset) - xhat * mean));
    }
  }
}

// ------------------------------------------------------------------------------------------------ launch plan
struct RowPlan {
  bool vectorized;
  int vec, items, tpr, rows_per_block;
};

// tpr: the smallest power of two (>= 32) whose threads cover the row with at most 2 vectors each (8 scalars
// each in the loop kernel, which takes rows that are not 16-byte aligned or wider than 1024·8 vectors).
RowPlan plan_rows(int64_t h, int64_t elem_size, bool aligned, int max_vec_items) {
  const int vec = static_cast<int>(16 / elem_size);
  RowPlan p{aligned && h % vec == 0 && h / vec <= int64_t{1024} * max_vec_items, vec, 0, 32, 1};
  const int64_t units = p.vectorized ? h / vec : h;
  const int64_t per_thread = p.vectorized ? 2 : 8;
  while (p.tpr < 1024 && ceil_div(units, p.tpr) > per_thread) p.tpr *= 2;
  const int64_t items = ceil_div(units, p.tpr);
  p.items = items <= 1 ? 1 : items <= 2 ? 2 : items <= 4 ? 4 : 8;
  p.rows_per_block = std::max(1, kBlockThreads / p.tpr);
  return p;
}

template <typename Fn>
void dispatch_items(int items, Fn&& fn) {
  switch (items) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

bool rows_aligned(const at::Tensor& t2) {
  return aligned_to(t2.const_data_ptr(), 16) && (t2.stride(0) * t2.element_size()) % 16 == 0;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                 bool offset) {
  check_rms_norm_args(x, weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = as_rows(x);
  const at::Tensor w = weight.contiguous();
  auto y = at::empty(x.sizes(), x.options());
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const int64_t rows = x2.size(0), h = x2.size(1);
  TORCH_CHECK_VALUE(h <= INT32_MAX, "rms_norm: hidden size must be < 2^31, got ", h);
  const RowPlan p = plan_rows(h, x.element_size(), rows_aligned(x2) && aligned_to(w.const_data_ptr(), 16), 8);
  const dim3 block(p.tpr, p.rows_per_block);
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, p.rows_per_block)));
  const cudaStream_t stream = current_stream();
  const float off = offset ? 1.f : 0.f;
  SWIFTLORA_DISPATCH_FLOAT(x.scalar_type(), "rms_norm_cuda", [&] {
    const auto* xp = x2.const_data_ptr<scalar_t>();
    const auto* wp = w.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    auto* rp = rstd.mutable_data_ptr<float>();
    if (p.vectorized) {
      dispatch_items(p.items, [&](auto items) {
        constexpr int kVec = 16 / sizeof(scalar_t), kItems = decltype(items)::value;
        if (p.tpr * p.rows_per_block == kBlockThreads) {
          rms_norm_fwd_kernel<scalar_t, kVec, kItems, true><<<grid, block, 0, stream>>>(
              xp, x2.stride(0), wp, yp, rp, rows, static_cast<int>(h), static_cast<float>(eps), off);
        } else {
          rms_norm_fwd_kernel<scalar_t, kVec, kItems, false><<<grid, block, 0, stream>>>(
              xp, x2.stride(0), wp, yp, rp, rows, static_cast<int>(h), static_cast<float>(eps), off);
        }
      });
    } else {
      rms_norm_fwd_loop_kernel<scalar_t><<<grid, block, 0, stream>>>(xp, x2.stride(0), wp, yp, rp, rows,
                                                                     static_cast<int>(h), static_cast<float>(eps), off);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, rstd};
}

at::Tensor backward_into(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& rstd, bool offset, bool weight_grad, at::Tensor& dx2) {
  const at::Tensor g2 = as_rows(grad_y), x2 = as_rows(x), w = weight.contiguous(), r = rstd.contiguous();
  const int64_t rows = x2.size(0), h = x2.size(1);
  TORCH_CHECK_VALUE(h <= INT32_MAX, "rms_norm_backward: hidden size must be < 2^31, got ", h);
  const bool aligned = rows_aligned(g2) && rows_aligned(x2) && rows_aligned(dx2) && aligned_to(w.const_data_ptr(), 16);
  const RowPlan p = plan_rows(h, x.element_size(), aligned, 2);  // wider rows: loop kernel (registers)
  const dim3 block(p.tpr, p.rows_per_block);
  const cudaStream_t stream = current_stream();
  const float off = offset ? 1.f : 0.f;
  at::Tensor partial;
  SWIFTLORA_DISPATCH_FLOAT(x.scalar_type(), "rms_norm_backward_cuda", [&] {
    auto launch = [&](auto kernel, int rows_per_thread) {
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, p.tpr * p.rows_per_block, 0));
      const int64_t groups = ceil_div(rows, int64_t{p.rows_per_block} * rows_per_thread);
      // With dw, a persistent grid (one fp32 partial row per resident row slot); without, one block per group.
      const int64_t grid = weight_grad ? std::max<int64_t>(1, std::min<int64_t>(
                                             groups, int64_t{sm_count()} * std::max(per_sm, 1)))
                                       : groups;
      if (weight_grad) {
        partial = p.vectorized ? at::empty({grid * p.rows_per_block, h}, x.options().dtype(at::kFloat))
                               : at::zeros({grid * p.rows_per_block, h}, x.options().dtype(at::kFloat));
      }
      kernel<<<static_cast<unsigned>(grid), block, 0, stream>>>(
          g2.const_data_ptr<scalar_t>(), g2.stride(0), x2.const_data_ptr<scalar_t>(), x2.stride(0),
          w.const_data_ptr<scalar_t>(), r.const_data_ptr<float>(), dx2.mutable_data_ptr<scalar_t>(), dx2.stride(0),
          weight_grad ? partial.mutable_data_ptr<float>() : nullptr, rows, static_cast<int>(h), off);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (p.vectorized) {
      // One row per thread row (R = 1) with at most 2 vectors per thread (plan_rows): few registers, so many
      // blocks per SM keep enough loads in flight.
      auto pick = [&](auto items, auto wgrad) {
        constexpr int kVec = 16 / sizeof(scalar_t), kItems = decltype(items)::value;
        constexpr bool kWgrad = decltype(wgrad)::value;
        if (kWgrad && p.tpr * p.rows_per_block == kBlockThreads) {  // persistent: prefetch the next row
          launch(rms_norm_bwd_kernel<scalar_t, kVec, kItems, true, kWgrad>, 1);
        } else {  // (forcing 6 blocks per SM here spilled and cost 25%: measured)
          launch(rms_norm_bwd_kernel<scalar_t, kVec, kItems, false, kWgrad>, 1);
        }
      };
      auto with_items = [&](auto wgrad) {
        if (p.items == 1) {
          pick(std::integral_constant<int, 1>{}, wgrad);
        } else {
          pick(std::integral_constant<int, 2>{}, wgrad);
        }
      };
      if (weight_grad) {
        with_items(std::true_type{});
      } else {
        with_items(std::false_type{});
      }
    } else {
      launch(rms_norm_bwd_loop_kernel<scalar_t>, 1);
    }
  });
  // One kernel: fp32 accumulation over the partial rows, written in the weight's dtype.
  return weight_grad ? at::sum(partial, {0}, false, weight.scalar_type()) : at::empty({0}, weight.options());
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd,
                                                          bool offset, bool weight_grad) {
  check_rms_norm_backward_args(grad_y, x, weight, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty(x.sizes(), x.options());
  auto dx2 = dx.view({-1, x.size(-1)});
  auto dw = backward_into(grad_y, x, weight, rstd, offset, weight_grad, dx2);
  return {dx, dw};
}

at::Tensor rms_norm_backward_inplace_cuda(at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& rstd, bool offset, bool weight_grad) {
  check_rms_norm_backward_args(grad_y, x, weight, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor g2 = as_rows(grad_y);
  TORCH_CHECK_VALUE(g2.is_alias_of(grad_y), "rms_norm_backward_: grad_y must be viewable as rows [N, H] "
                    "(unit stride on the last dim) to be written in place");
  return backward_into(grad_y, x, weight, rstd, offset, weight_grad, g2);
}

}  // namespace
}  // namespace swiftlora::cuda

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) {
  m.impl("rms_norm", &swiftlora::cuda::rms_norm_cuda);
  m.impl("rms_norm_backward", &swiftlora::cuda::rms_norm_backward_cuda);
  m.impl("rms_norm_backward_", &swiftlora::cuda::rms_norm_backward_inplace_cuda);
}
