// nf4_gemv on the CPU: y [M, N] = x [M, K] @ dequant(W [N, K])ᵀ with the fp32 dequantized weight (value · block
// scale, csrc/common/nf4.h) and fp32 accumulation; output rows in parallel. The fallback and test oracle of the
// CUDA kernel, not a fast path. Also the argument check both backends share.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/nf4.h"
#include "ops.h"

namespace swiftlora {

constexpr int64_t kNf4GemvMaxRows = 16;

Nf4Weight check_nf4_gemv_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                              const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features) {
  constexpr const char* op = "nf4_gemv";
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
                   ": x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have shape [..., K] with K > 0, got ",
                    x.sizes());
  TORCH_CHECK_VALUE(out_features > 0, op, ": out_features must be positive, got ", out_features);
  const int64_t k = x.size(-1), rows = x.numel() / k;
  TORCH_CHECK_VALUE(rows >= 1 && rows <= kNf4GemvMaxRows, op, ": x must have 1..16 rows (decode), got ", rows,
                    " (shape ", x.sizes(), "); dequantize and use a matmul for more");
  check_same_device(x, packed, op, "x", "packed");
  // The weight is [out_features, K]: packed/absmax sizes are checked against out_features * K elements.
  return check_nf4_weight(op, packed, absmax, absmax2, code2, offset, blocksize, out_features * k);
}

namespace {

template <typename T>
void gemv_rows(const T* x, int64_t m, int64_t k, const Nf4Weight& w, const float* scales, int64_t n_out, T* y) {
  const uint8_t* packed = w.packed.const_data_ptr<uint8_t>();
  const int64_t bs = w.blocksize;
  at::parallel_for(0, n_out, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(static_cast<std::size_t>(m));
    for (int64_t r = r0; r < r1; ++r) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = r * k + j;
        const float wv = nf4::dequant_value(nf4::code_value(nf4::code_at(packed, i)), scales[i / bs]);
        for (int64_t row = 0; row < m; ++row) acc[row] += static_cast<float>(x[row * k + j]) * wv;
      }
      for (int64_t row = 0; row < m; ++row) y[row * n_out + r] = static_cast<T>(acc[row]);
    }
  });
}

at::Tensor nf4_gemv_cpu(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& absmax,
                        const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                        const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features) {
  const Nf4Weight w = check_nf4_gemv_args(x_in, packed, absmax, absmax2, code2, offset, blocksize, out_features);
  const at::Tensor x = x_in.contiguous();
  const int64_t k = x.size(-1), m = x.numel() / k;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  auto y = at::empty(out_shape, x.options());
  const at::Tensor scales = nf4_block_scales_cpu(w);
  SWIFTLORA_DISPATCH_HALF(x.scalar_type(), "nf4_gemv_cpu", [&] {
    gemv_rows<scalar_t>(x.const_data_ptr<scalar_t>(), m, k, w, scales.const_data_ptr<float>(), out_features,
                        y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

}  // namespace
}  // namespace swiftlora

TORCH_LIBRARY_IMPL(swiftlora, CPU, m) { m.impl("nf4_gemv", &swiftlora::nf4_gemv_cpu); }
