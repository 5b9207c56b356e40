// Differences between the torch versions swiftlora builds against (2.11 on the device, 2.13 CPU, 2.14 CUDA), and
// only here: the C++ counterpart of python/swiftlora/_compat.py.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>

#include <optional>

namespace swiftlora::compat {

// aten::addmm.dtype_out (torch >= 2.8): a 16-bit GEMM accumulated into and written as float32. Looked up by name
// so that this compiles against any torch; nullopt where this torch has no such overload.
using AddmmDtypeOut = at::Tensor&(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType,
                                  const c10::Scalar&, const c10::Scalar&, at::Tensor&);
inline const std::optional<c10::TypedOperatorHandle<AddmmDtypeOut>>& addmm_dtype_out() {
  static const std::optional<c10::TypedOperatorHandle<AddmmDtypeOut>> op =
      []() -> std::optional<c10::TypedOperatorHandle<AddmmDtypeOut>> {
    auto h = c10::Dispatcher::singleton().findSchema({"aten::addmm", "dtype_out"});
    if (!h.has_value()) return std::nullopt;
    return h->typed<AddmmDtypeOut>();
  }();
  return op;
}

// acc += a @ b with acc float32 and a, b possibly 16-bit, accumulating in float32, deciding exactly as
// _compat.addmm_fp32_ does: one addmm when all are float32; the dtype_out GEMM when `fp32_out_gemm` (the backend
// says its GEMMs have it: CUDA sm80+) and the overload exists; else through float32 copies of a and b.
// beta = 0: acc's old contents are ignored (not read: NaN in them does not propagate), as addmm documents.
inline void addmm_fp32_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, bool fp32_out_gemm,
                        double beta = 1.0) {
  if (a.scalar_type() == acc.scalar_type() && b.scalar_type() == acc.scalar_type()) {
    acc.addmm_(a, b, beta);
  } else if (fp32_out_gemm && a.scalar_type() == b.scalar_type() && addmm_dtype_out().has_value()) {
    addmm_dtype_out()->call(acc, a, b, at::kFloat, beta, 1, acc);
  } else {
    acc.addmm_(a.to(acc.scalar_type()), b.to(acc.scalar_type()), beta);
  }
}

}  // namespace swiftlora::compat
