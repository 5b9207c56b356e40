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
  X(geglu_backward_)             \
  X(softmax_stats)               \
  X(softmax_grad)                \
  X(softmax_grad_)               \
  X(cross_entropy_fused_)        \
  X(scale_rows_)                 \
  X(gguf_quantize)

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

// softmax_* / cross_entropy_fused_: logits [N, V] (row stride free, unit column stride), labels [N] int64/int32.
void check_softmax_args(const char* op, const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                        double softcap, double logit_scale);
// lse [N] float32, coef [N, 4] float32.
void check_softmax_grad_args(const char* op, const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                             const at::Tensor& lse, const at::Tensor& coef, double softcap, double logit_scale);
// grad_scale float32 [] or [N]; label_smoothing in [0, 1]; z_loss >= 0.
void check_cross_entropy_fused_args(const at::Tensor& logits, const at::Tensor& labels, double label_smoothing,
                                    double z_loss, double softcap, double logit_scale, const at::Tensor& grad_scale);
// t [N, ...] float, scale float32 [] or [N].
void check_scale_rows_args(const at::Tensor& t, const at::Tensor& scale);

// gguf_quantize: x [..., n] float, n a positive multiple of the type's block (32 or 256); qtype a ggml type id.
void check_gguf_quantize_args(const at::Tensor& x, int64_t qtype);
// The uint8 [..., n/block·block_bytes] output tensor on x's device.
at::Tensor gguf_quantize_output(const at::Tensor& x, int64_t qtype);

}  // namespace swiftlora
