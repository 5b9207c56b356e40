// What both rope backends need to walk q, k and the cos/sin tables: sizes and element strides, with every
// broadcast (batch of 1 in the tables or position ids) turned into a zero stride. Built after check_rope_args.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>

namespace swiftlora {

struct RopePlan {
  int64_t batch, seq, q_heads, k_heads, head_dim, half;  // half = R/2: dims [0, R) rotate, [R, D) pass through
  int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh;              // q/k strides over (batch, seq, head); dim stride 1
  int64_t tab_sb, tab_ss;   // table strides: per (batch, seq) for [B|1, S, R/2] tables, or (0, row) for [T, R/2]
  int64_t table_len;        // T for [T, R/2] tables (positions must lie in [0, T)), else seq
  bool has_pos;             // position_ids given: table row = position_ids[b, s]
  int64_t pos_sb, pos_ss;   // position_ids strides (batch stride 0 when it has one row)
};

inline RopePlan make_rope_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                               const std::optional<at::Tensor>& position_ids) {
  RopePlan p{};
  p.batch = q.size(0);
  p.seq = q.size(1);
  p.q_heads = q.size(2);
  p.k_heads = k.size(2);
  p.head_dim = q.size(3);
  p.half = cos.size(-1);
  p.q_sb = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_ss = k.stride(1), p.k_sh = k.stride(2);
  if (cos.dim() == 3) {
    p.tab_sb = cos.size(0) == 1 ? 0 : cos.stride(0);
    p.tab_ss = cos.stride(1);
    p.table_len = p.seq;
  } else {
    p.tab_sb = 0;
    p.tab_ss = cos.stride(0);
    p.table_len = cos.size(0);
  }
  p.has_pos = position_ids.has_value();
  if (p.has_pos) {
    p.pos_sb = position_ids->size(0) == 1 ? 0 : position_ids->stride(0);
    p.pos_ss = position_ids->stride(1);
  }
  return p;
}

// q/k as the out-of-place kernels read them: unit stride on head_dim (a copy only when that is missing).
inline at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// cos/sin as the kernels read them: unit stride on the last dim, one set of strides for both.
inline std::pair<at::Tensor, at::Tensor> kernel_tables(const at::Tensor& cos, const at::Tensor& sin) {
  if (cos.stride(-1) == 1 && cos.strides() == sin.strides()) return {cos, sin};
  return {cos.contiguous(), sin.contiguous()};
}

// rope_: q and k are written in place, so each must be writable element for element and apart from the other.
inline void check_rope_inplace_args(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK_VALUE(q.stride(-1) == 1 && k.stride(-1) == 1,
                    "rope_: q and k must have unit stride on head_dim to be rotated in place");
  at::assert_no_internal_overlap(q);
  at::assert_no_internal_overlap(k);
  at::assert_no_overlap(q, k);
}

}  // namespace swiftlora
