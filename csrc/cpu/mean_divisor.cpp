// mean_divisor on the CPU: cross-entropy's mean divisor max(#labelled rows, 1) and its reciprocal, as float32 [2].
// The count is exact (int64), then rounded once to float32; the reciprocal is IEEE 1/x (as torch's reciprocal).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "ops.h"

namespace swiftlora {

void check_mean_divisor_args(const at::Tensor& labels) {
  TORCH_CHECK_VALUE(labels.dim() == 1, "mean_divisor: labels must be 1-D [N], got shape ", labels.sizes());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "mean_divisor: labels must be int64 or int32, got ", labels.scalar_type());
}

at::Tensor mean_divisor_cpu(const at::Tensor& labels_in, int64_t ignore_index) {
  check_mean_divisor_args(labels_in);
  const at::Tensor labels = labels_in.contiguous();
  int64_t count = 0;
  AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "mean_divisor", [&] {
    const index_t* l = labels.const_data_ptr<index_t>();
    for (int64_t i = 0; i < labels.numel(); ++i) count += static_cast<int64_t>(l[i]) != ignore_index;
  });
  at::Tensor out = at::empty({2}, labels.options().dtype(at::kFloat));
  const float d = static_cast<float>(std::max<int64_t>(count, 1));
  out.mutable_data_ptr<float>()[0] = d;
  out.mutable_data_ptr<float>()[1] = 1.0f / d;
  return out;
}

}  // namespace swiftlora

TORCH_LIBRARY_IMPL(swiftlora, CPU, m) { m.impl("mean_divisor", &swiftlora::mean_divisor_cpu); }
