// Input checks shared by the CPU and CUDA implementations. Every failure is a TORCH_CHECK, which Python sees as
// a RuntimeError/ValueError naming the argument and what was expected.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace swiftlora {

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", dt);
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                             const char* nb) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", nb, " must have the dtype of ", na, " (",
                   a.scalar_type(), "), got ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                              const char* nb) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", nb, " must be on the device of ", na, " (", a.device(),
              "), got ", b.device());
}

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                             const char* nb) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), op, ": ", nb, " must have the shape of ", na, " ", a.sizes(),
                    ", got ", b.sizes());
}

inline void check_not_empty(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.numel() > 0, op, ": ", name, " must not be empty, got shape ", t.sizes());
}

// A view of t as [rows, t.size(-1)] with unit stride along the last dim and one row stride, without copying
// when t's strides allow it (e.g. the gate half of a fused gate/up projection); otherwise a contiguous copy.
inline at::Tensor as_rows(const at::Tensor& t) {
  const int64_t n = t.size(-1);
  if (t.stride(-1) != 1 && n > 1) return t.contiguous().view({-1, n});
  // Leading dims of size > 1 must nest (outer stride = inner stride * inner size) to merge into one row dim.
  int64_t row_stride = n, inner_stride = -1, inner_size = 1;
  for (int64_t d = t.dim() - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (inner_stride < 0) {
      row_stride = t.stride(d);
    } else if (t.stride(d) != inner_stride * inner_size) {
      return t.contiguous().view({-1, n});
    }
    inner_stride = t.stride(d);
    inner_size = t.size(d);
  }
  if (row_stride < n) return t.contiguous().view({-1, n});  // overlapping rows (e.g. expand): copy
  const int64_t rows = n == 0 ? 0 : t.numel() / n;
  return t.as_strided({rows, n}, {row_stride, 1});
}

// as_rows(t) for an op that writes t in place: an error naming t when that view would need a copy.
inline at::Tensor writable_rows(const at::Tensor& t, const char* op, const char* name) {
  at::Tensor rows = as_rows(t);
  TORCH_CHECK_VALUE(rows.is_alias_of(t), op, ": ", name, " is written in place, so it must be viewable as rows "
                    "[R, N] (unit stride on the last dim, rows that do not overlap), got shape ", t.sizes(),
                    " strides ", t.strides());
  return rows;
}

// Two tensors an op writes must not share elements (views of disjoint parts of one buffer are fine).
inline void check_no_overlap(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                             const char* nb, bool a_written = true) {
  const at::MemOverlapStatus s = at::get_overlap_status(a, b);
  TORCH_CHECK_VALUE(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial, op, ": ", na, " and ",
                    nb, " share memory, but ", a_written ? "both are" : std::string(nb) + " is",
                    " written in place; pass separate buffers");
}

}  // namespace swiftlora
