// The running-max rule of online_softmax_block_, shared by the CPU and CUDA kernels.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>

namespace swiftlora {

// How far a block's max may exceed the running reference max m before m moves (and sums over earlier blocks need
// rescaling): the block's P = e^{z−m}·dz stays below e^slack·dz, inside float16's range at 8 and bfloat16's and
// float32's at 16, while after the first blocks almost no row needs a rescale (a pass over its accumulator).
inline float online_max_slack(c10::ScalarType block_dtype) { return block_dtype == c10::kHalf ? 8.f : 16.f; }

C10_HOST_DEVICE inline float online_reference_max(float m_old, float block_max, float slack) {
  return block_max > m_old + slack ? block_max : m_old;  // m_old = −inf: the block's max
}

}  // namespace swiftlora
