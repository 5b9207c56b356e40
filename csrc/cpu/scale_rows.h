// scale_rows_ on the CPU (csrc/cpu/cross_entropy.cpp), for other CPU ops that apply the same row scaling in place.
#pragma once
#include <ATen/core/Tensor.h>

namespace swiftlora {

// t *= scale per row (scale float32 [] or [t.size(0)]); rows whose factor is exactly 1 untouched.
void scale_rows_inplace_cpu(at::Tensor& t, const at::Tensor& scale);

}  // namespace swiftlora
