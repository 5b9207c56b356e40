// Rotary position embedding on the CPU, and the argument checks both backends share.
// For each head: out[i] = x[i]·cos - x[i+R/2]·sin, out[i+R/2] = x[i+R/2]·cos + x[i]·sin for i < R/2 (rotate-half
// convention of Llama and most HF models); inverse negates sin (the backward). Dims [R, D) pass through.
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/rope_plan.h"
#include "ops.h"

namespace swiftlora {

void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& position_ids) {
  constexpr const char* op = "rope";
  check_float_dtype(q, op, "q");
  check_same_dtype(q, k, op, "q", "k");
  check_same_device(q, k, op, "q", "k");
  check_same_device(q, cos, op, "q", "cos");
  check_same_device(q, sin, op, "q", "sin");
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D [batch, seq, heads, head_dim], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": k must be 4-D [batch, seq, heads, head_dim], got shape ", k.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), op,
                    ": k must match q in batch, seq and head_dim (heads may differ), got q ", q.sizes(), " and k ",
                    k.sizes());
  check_not_empty(q, op, "q");
  check_not_empty(k, op, "k");
  const auto tdt = cos.scalar_type();
  TORCH_CHECK_TYPE(tdt == at::kFloat || tdt == q.scalar_type(), op, ": cos must be float32 or q's dtype (",
                   q.scalar_type(), "), got ", tdt);
  check_same_dtype(cos, sin, op, "cos", "sin");
  check_same_shape(cos, sin, op, "cos", "sin");
  TORCH_CHECK_VALUE(cos.dim() == 2 || cos.dim() == 3, op,
                    ": cos must be a table [positions, rotary_dim/2] or per token [batch or 1, seq, rotary_dim/2], "
                    "got shape ", cos.sizes());
  const int64_t half = cos.size(-1);
  TORCH_CHECK_VALUE(half >= 1 && 2 * half <= q.size(3), op, ": cos's last dim (rotary_dim/2 = ", half,
                    ") must be in [1, head_dim/2 = ", q.size(3) / 2, "]");
  if (cos.dim() == 3) {
    TORCH_CHECK_VALUE((cos.size(0) == 1 || cos.size(0) == q.size(0)) && cos.size(1) == q.size(1), op,
                      ": per-token cos must have shape [", q.size(0), " or 1, ", q.size(1), ", ", half, "], got ",
                      cos.sizes());
    TORCH_CHECK_VALUE(!position_ids.has_value(), op,
                      ": position_ids must be None when cos/sin are per token [batch, seq, rotary_dim/2]");
  } else {
    check_not_empty(cos, op, "cos");
  }
  if (position_ids.has_value()) {
    const at::Tensor& pos = *position_ids;
    check_same_device(q, pos, op, "q", "position_ids");
    TORCH_CHECK_TYPE(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt, op,
                     ": position_ids must be int64 or int32, got ", pos.scalar_type());
    TORCH_CHECK_VALUE(pos.dim() == 2 && (pos.size(0) == 1 || pos.size(0) == q.size(0)) && pos.size(1) == q.size(1),
                      op, ": position_ids must have shape [", q.size(0), " or 1, ", q.size(1), "], got ",
                      pos.sizes());
  } else if (cos.dim() == 2) {
    TORCH_CHECK_VALUE(cos.size(0) >= q.size(1), op, ": without position_ids the table must cover seq = ",
                      q.size(1), " positions, got ", cos.size(0));
  }
}

namespace {

template <typename T, typename TT, typename P>
void rotate(const T* src, T* dst, const TT* c, const TT* s, int64_t half, int64_t head_dim, float sign) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(src[i]), x2 = static_cast<float>(src[i + half]);
    const float ci = static_cast<float>(c[i]), si = sign * static_cast<float>(s[i]);
    dst[i] = static_cast<T>(x1 * ci - x2 * si);
    dst[i + half] = static_cast<T>(x2 * ci + x1 * si);
  }
  if (dst != src) {
    for (int64_t i = 2 * half; i < head_dim; ++i) dst[i] = src[i];
  }
}

template <typename T, typename TT, typename P>
void rope_rows(const RopePlan& p, const T* q, const T* k, T* qo, T* ko, int64_t qo_sb, int64_t qo_ss,
               int64_t qo_sh, int64_t ko_sb, int64_t ko_ss, int64_t ko_sh, const TT* cos, const TT* sin,
               const P* pos, bool inverse) {
  const float sign = inverse ? -1.f : 1.f;
  at::parallel_for(0, p.batch * p.seq, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / p.seq, s = t % p.seq;
      const int64_t row = pos ? static_cast<int64_t>(pos[b * p.pos_sb + s * p.pos_ss]) : s;
      TORCH_CHECK_INDEX(row >= 0 && row < p.table_len, "rope: position_ids[", b, ", ", s, "] = ", row,
                        " is outside the cos/sin table [0, ", p.table_len, ")");
      const TT* c = cos + b * p.tab_sb + row * p.tab_ss;
      const TT* sn = sin + b * p.tab_sb + row * p.tab_ss;
      for (int64_t h = 0; h < p.q_heads; ++h) {
        rotate<T, TT, P>(q + b * p.q_sb + s * p.q_ss + h * p.q_sh, qo + b * qo_sb + s * qo_ss + h * qo_sh, c, sn,
                         p.half, p.head_dim, sign);
      }
      for (int64_t h = 0; h < p.k_heads; ++h) {
        rotate<T, TT, P>(k + b * p.k_sb + s * p.k_ss + h * p.k_sh, ko + b * ko_sb + s * ko_ss + h * ko_sh, c, sn,
                         p.half, p.head_dim, sign);
      }
    }
  });
}

// Runs the rotation from (q, k) into (qo, ko), which may be the same tensors (in place).
void rope_cpu_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_in, const at::Tensor& sin_in,
                   const std::optional<at::Tensor>& position_ids, bool inverse, at::Tensor& qo, at::Tensor& ko) {
  const auto [cos, sin] = kernel_tables(cos_in, sin_in);
  const RopePlan p = make_rope_plan(q, k, cos, position_ids);
  SWIFTLORA_DISPATCH_FLOAT(q.scalar_type(), "rope_cpu", [&] {
    using T = scalar_t;
    auto run = [&](auto table_tag, auto pos_tag) {
      using TT = decltype(table_tag);
      using P = decltype(pos_tag);
      const P* pos = position_ids.has_value() ? position_ids->const_data_ptr<P>() : nullptr;
      rope_rows<T, TT, P>(p, q.const_data_ptr<T>(), k.const_data_ptr<T>(), qo.mutable_data_ptr<T>(),
                          ko.mutable_data_ptr<T>(), qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0),
                          ko.stride(1), ko.stride(2), cos.const_data_ptr<TT>(), sin.const_data_ptr<TT>(), pos,
                          inverse);
    };
    auto with_pos = [&](auto table_tag) {
      if (position_ids.has_value() && position_ids->scalar_type() == at::kInt) {
        run(table_tag, int32_t{});
      } else {
        run(table_tag, int64_t{});
      }
    };
    if (cos.scalar_type() == at::kFloat) {
      with_pos(float{});
    } else {
      with_pos(T{});
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos,
                                            const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
                                            bool inverse) {
  check_rope_args(q_in, k_in, cos, sin, position_ids);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in);
  at::Tensor qo = at::empty_like(q), ko = at::empty_like(k);
  TORCH_INTERNAL_ASSERT(qo.stride(-1) == 1 && ko.stride(-1) == 1);
  rope_cpu_into(q, k, cos, sin, position_ids, inverse, qo, ko);
  return {qo, ko};
}

void rope_inplace_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                      const std::optional<at::Tensor>& position_ids, bool inverse) {
  check_rope_args(q, k, cos, sin, position_ids);
  check_rope_inplace_args(q, k);
  rope_cpu_into(q, k, cos, sin, position_ids, inverse, q, k);
}

}  // namespace
}  // namespace swiftlora

TORCH_LIBRARY_IMPL(swiftlora, CPU, m) {
  m.impl("rope", &swiftlora::rope_cpu);
  m.impl("rope_", &swiftlora::rope_inplace_cpu);
}
