// Rotary position embedding on the GPU: q and k of one token in one block row, 16-byte vectors of rotate-half
// pairs (x[i..i+V), x[i+R/2..i+R/2+V)) per thread, cos/sin read once per vector (they stay in L1/L2 across heads).
// Memory-bound: reads and writes q and k once.
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/rope_plan.h"
#include "ops.h"

namespace swiftlora {
namespace {

using cuda::load_vec;
using cuda::load_vec_stream;
using cuda::store_vec;
using cuda::Vec;

struct RopeOut {
  int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh;
};

// One token per (blockIdx.x, threadIdx.y); threadIdx.x walks the token's items: for every head of q then k,
// half/V rotation vectors, then (out of place only) (D - R)/V pass-through vectors.
template <typename T, typename TT, typename P, int V>
__global__ void rope_kernel(RopePlan p, RopeOut o, const T* q, const T* k, T* qo, T* ko,
                            const TT* __restrict__ cos, const TT* __restrict__ sin, const P* __restrict__ pos,
                            float sign, bool copy_rest) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (token >= p.batch * p.seq) return;
  const int64_t b = token / p.seq, s = token % p.seq;
  const int nvec = static_cast<int>(p.half / V);
  const int rest = copy_rest ? static_cast<int>((p.head_dim - 2 * p.half) / V) : 0;
  const int per_head = nvec + rest;
  const int items = static_cast<int>(p.q_heads + p.k_heads) * per_head;
  const int64_t row = pos ? static_cast<int64_t>(pos[b * p.pos_sb + s * p.pos_ss]) : s;
  // An out-of-range position cannot raise from here without a host sync: it poisons the output with NaN.
  const bool valid = row >= 0 && row < p.table_len;
  const TT* c_row = cos + b * p.tab_sb + (valid ? row : 0) * p.tab_ss;
  const TT* s_row = sin + b * p.tab_sb + (valid ? row : 0) * p.tab_ss;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int head = item / per_head, j = item % per_head;
    const bool is_q = head < p.q_heads;
    const int64_t h = is_q ? head : head - p.q_heads;
    const T* src = is_q ? q + b * p.q_sb + s * p.q_ss + h * p.q_sh : k + b * p.k_sb + s * p.k_ss + h * p.k_sh;
    T* dst = is_q ? qo + b * o.q_sb + s * o.q_ss + h * o.q_sh : ko + b * o.k_sb + s * o.k_ss + h * o.k_sh;
    if (j >= nvec) {  // pass-through dims
      const int64_t off = 2 * p.half + static_cast<int64_t>(j - nvec) * V;
      store_vec<T, V>(dst + off, load_vec_stream<T, V>(src + off));
      continue;
    }
    const int64_t i = static_cast<int64_t>(j) * V;
    const Vec<T, V> x1 = load_vec_stream<T, V>(src + i), x2 = load_vec_stream<T, V>(src + i + p.half);
    const Vec<TT, V> cv = load_vec<TT, V>(c_row + i), sv = load_vec<TT, V>(s_row + i);
    Vec<T, V> y1, y2;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float a = static_cast<float>(x1.v[e]), bb = static_cast<float>(x2.v[e]);
      const float ce = valid ? static_cast<float>(cv.v[e]) : std::numeric_limits<float>::quiet_NaN();
      const float se = sign * static_cast<float>(sv.v[e]);
      y1.v[e] = static_cast<T>(a * ce - bb * se);
      y2.v[e] = static_cast<T>(bb * ce + a * se);
    }
    store_vec<T, V>(dst + i, y1);
    store_vec<T, V>(dst + i + p.half, y2);
  }
}

bool strides_multiple_of(std::initializer_list<int64_t> strides, int64_t v) {
  for (int64_t s : strides) {
    if (s % v != 0) return false;
  }
  return true;
}

void rope_cuda_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_in, const at::Tensor& sin_in,
                    const std::optional<at::Tensor>& position_ids, bool inverse, at::Tensor& qo, at::Tensor& ko) {
  const c10::cuda::CUDAGuard guard(q.device());
  const auto [cos, sin] = kernel_tables(cos_in, sin_in);
  const RopePlan p = make_rope_plan(q, k, cos, position_ids);
  const RopeOut o{qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2)};
  const bool copy_rest = !qo.is_same(q) && 2 * p.half < p.head_dim;
  const int64_t tokens = p.batch * p.seq;

  SWIFTLORA_DISPATCH_FLOAT(q.scalar_type(), "rope_cuda", [&] {
    using T = scalar_t;
    constexpr int kVec = 16 / sizeof(T);
    // The wide path needs every row start, half offset and table row aligned to a whole vector.
    const bool wide =
        p.half % kVec == 0 && (!copy_rest || (p.head_dim - 2 * p.half) % kVec == 0) &&
        strides_multiple_of({p.q_sb, p.q_ss, p.q_sh, p.k_sb, p.k_ss, p.k_sh, o.q_sb, o.q_ss, o.q_sh, o.k_sb, o.k_ss,
                             o.k_sh, p.tab_sb, p.tab_ss},
                            kVec) &&
        cuda::aligned_to(q.const_data_ptr(), 16) && cuda::aligned_to(k.const_data_ptr(), 16) &&
        cuda::aligned_to(qo.const_data_ptr(), 16) && cuda::aligned_to(ko.const_data_ptr(), 16) &&
        cuda::aligned_to(cos.const_data_ptr(), kVec * cos.element_size()) &&
        cuda::aligned_to(sin.const_data_ptr(), kVec * sin.element_size());
    auto launch = [&](auto vec_tag, auto table_tag, auto pos_tag) {
      constexpr int V = decltype(vec_tag)::value;
      using TT = decltype(table_tag);
      using P = decltype(pos_tag);
      const int64_t per_head = p.half / V + (copy_rest ? (p.head_dim - 2 * p.half) / V : 0);
      const int64_t items = (p.q_heads + p.k_heads) * per_head;
      const int tx = static_cast<int>(std::min<int64_t>(512, cuda::ceil_div(items, 32) * 32));
      const int ty = std::max(1, 256 / tx);
      const dim3 block(tx, ty);
      const auto grid = static_cast<unsigned>(cuda::ceil_div(tokens, ty));
      const P* pos = position_ids.has_value() ? position_ids->const_data_ptr<P>() : nullptr;
      rope_kernel<T, TT, P, V><<<grid, block, 0, cuda::current_stream()>>>(
          p, o, q.const_data_ptr<T>(), k.const_data_ptr<T>(), qo.mutable_data_ptr<T>(), ko.mutable_data_ptr<T>(),
          cos.const_data_ptr<TT>(), sin.const_data_ptr<TT>(), pos, inverse ? -1.f : 1.f, copy_rest);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto with_pos = [&](auto vec_tag, auto table_tag) {
      if (position_ids.has_value() && position_ids->scalar_type() == at::kInt) {
        launch(vec_tag, table_tag, int32_t{});
      } else {
        launch(vec_tag, table_tag, int64_t{});
      }
    };
    auto with_table = [&](auto vec_tag) {
      if (cos.scalar_type() == at::kFloat) {
        with_pos(vec_tag, float{});
      } else {
        with_pos(vec_tag, T{});
      }
    };
    if (wide) {
      with_table(std::integral_constant<int, kVec>{});
    } else {
      with_table(std::integral_constant<int, 1>{});
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos,
                                             const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
                                             bool inverse) {
  check_rope_args(q_in, k_in, cos, sin, position_ids);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in);
  at::Tensor qo = at::empty_like(q), ko = at::empty_like(k);
  TORCH_INTERNAL_ASSERT(qo.stride(-1) == 1 && ko.stride(-1) == 1);
  rope_cuda_into(q, k, cos, sin, position_ids, inverse, qo, ko);
  return {qo, ko};
}

void rope_inplace_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                       const std::optional<at::Tensor>& position_ids, bool inverse) {
  check_rope_args(q, k, cos, sin, position_ids);
  check_rope_inplace_args(q, k);
  rope_cuda_into(q, k, cos, sin, position_ids, inverse, q, k);
}

}  // namespace
}  // namespace swiftlora

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) {
  m.impl("rope", &swiftlora::rope_cuda);
  m.impl("rope_", &swiftlora::rope_inplace_cuda);
}
