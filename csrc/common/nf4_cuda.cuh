// CUDA side of the NF4 format shared by the NF4 kernels (dequantize, gemv, and the qlora GEMMs): the device side
// (common/nf4_device.cuh: raw pointers, shared-memory tables, block-scale decode) and its raw pointers taken from a
// checked Nf4Weight. Bit rules: common/nf4.h.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common/nf4.h"
#include "common/nf4_device.cuh"
#include "ops.h"

namespace swiftlora::nf4 {

inline Nf4Args nf4_args(const Nf4Weight& w) {
  Nf4Args a;
  a.packed = w.packed.const_data_ptr<uint8_t>();
  a.n = w.n;
  a.log2_blocksize = log2_exact(w.blocksize);
  a.nested = w.nested;
  if (w.nested) {
    a.qabsmax = w.absmax.const_data_ptr<uint8_t>();
    a.absmax2 = w.absmax2.const_data_ptr<float>();
    a.code2 = w.code2.const_data_ptr<float>();
    a.offset = w.offset.const_data_ptr<float>();
  } else {
    a.absmax = w.absmax.const_data_ptr<float>();
  }
  return a;
}

}  // namespace swiftlora::nf4
