// What the CPU and CUDA implementations share: the list of ops and each op's argument validation (defined once,
// in csrc/cpu/<op>.cpp, so both backends reject bad input with the same message).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

// Every op in the `swiftlora` namespace; csrc/common/cuda_missing.cpp registers a clear error for each on CUDA
// tensors in a CPU-only build.
#define SWIFTLORA_FOR_EACH_OP(X) \
  X(rms_norm)                    \
  X(rms_norm_backward)           \
  X(rms_norm_backward_)          \
  X(rope)                        \
  X(rope_)                       \
  X(swiglu)                      \
  X(swiglu_backward)             \
  X(swiglu_backward_)            \
  X(geglu)                       \
  X(geglu_backward)              \
  X(geglu_backward_)

namespace swiftlora {

// rms_norm: x [..., H], weight [H]; rstd [...] float32.
void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps);
void check_rms_norm_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& rstd);

// rope: q [B, S, Hq, D], k [B, S, Hk, D] (any strides, unit stride on D); cos/sin [T, R/2] indexed by
// position_ids [B|1, S], or [B|1, S, R/2] per token.
void check_rope_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& position_ids);

// swiglu/geglu: gate, up [..., N] of one shape (grad too in the backward).
void check_glu_args(const char* op, const at::Tensor& gate, const at::Tensor& up);
void check_glu_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up);

}  // namespace swiftlora
