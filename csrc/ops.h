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
  X(mean_divisor)                \
  X(online_softmax_block_)       \
  X(lm_head_blocks_)             \
  X(nf4_quantize)                \
  X(nf4_dequantize)              \
  X(nf4_gemv)                    \
  X(qlora_linear)                \
  X(qlora_linear_backward)       \
  X(gguf_quantize)               \
  X(qlora_gemm)

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
// mean_divisor: labels [N] int64/int32 (N >= 0).
void check_mean_divisor_args(const at::Tensor& labels);
// online_softmax_block_: block [N, B] as logits above; stats float32 [N, kOnlineStats] contiguous; pz like block;
// g and gz float32 [N, H] contiguous, given with g_rescale float32 [N] contiguous (g required, gz optional); the
// written tensors share no memory.
constexpr int64_t kOnlineStats = 6;
void check_online_softmax_block_args(const at::Tensor& block, const at::Tensor& stats,
                                     const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& pz,
                                     int64_t col0, double softcap, double logit_scale,
                                     const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& gz,
                                     const std::optional<at::Tensor>& g_rescale);
// lm_head_blocks_: hc [C, H] float, weight [V, H] and bias [V] of hc's dtype, labels [C] int64/int32, stats float32
// [C, kOnlineStats] contiguous, g and gz float32 [C, H] contiguous, cols >= 1.
void check_lm_head_blocks_args(const at::Tensor& hc, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& labels, const at::Tensor& stats, const at::Tensor& g,
                               const std::optional<at::Tensor>& gz, int64_t cols);
// online_softmax_block_ through the dispatcher (the backend's kernel), and the statistics it starts from (m = −inf,
// the rest 0): the block-0 steps of every lm_head_blocks_ loop (csrc/cpu/lm_head_blocks.cpp).
at::Tensor online_softmax_block_call(at::Tensor& block, at::Tensor& stats, const std::optional<at::Tensor>& labels,
                                     const std::optional<at::Tensor>& pz, int64_t col0, int64_t ignore_index,
                                     double softcap, double logit_scale, const std::optional<at::Tensor>& g,
                                     const std::optional<at::Tensor>& gz, const std::optional<at::Tensor>& g_rescale);
void reset_online_stats(at::Tensor& stats);
// lm_head_blocks_'s `sums`: 0..3 (bit 1: Σz, bit 2: Σe·z).
void check_lm_head_sums(int64_t sums);
// The op's host loop (csrc/cpu/lm_head_blocks.cpp), for both backends; fp32_out_gemm: the backend's GEMMs take
// 16-bit operands with a float32 output (CUDA sm80+), else 16-bit P and W are upcast for the accumulation.
void lm_head_blocks_host(const at::Tensor& hc, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& labels, at::Tensor& stats, at::Tensor& g,
                         const std::optional<at::Tensor>& gz, int64_t cols, int64_t ignore_index, double softcap,
                         double logit_scale, bool fp32_out_gemm);

// nf4_*: an NF4 tensor of n elements in bitsandbytes' layout (csrc/common/nf4.h) as the kernels take it, checked and
// made contiguous. packed: uint8, (n + 1) / 2 bytes (any shape, e.g. bnb's [(n+1)/2, 1]). Plain: absmax float32
// [nblocks]. Double-quantized (nested): absmax uint8 [nblocks], absmax2 float32 [ceil(nblocks / 256)], code2 float32
// [256] (the 8-bit dynamic map), offset float32 with one element. nblocks = ceil(n / blocksize).
struct Nf4Weight {
  at::Tensor packed, absmax, absmax2, code2, offset;  // the last three undefined unless nested
  bool nested = false;
  int64_t n = 0, blocksize = 0, nblocks = 0;
};
Nf4Weight check_nf4_weight(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                           const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t n);
// The fp32 scale of every block [nblocks] of a CPU NF4 tensor: absmax itself, or decoded from the double quantization.
at::Tensor nf4_block_scales_cpu(const Nf4Weight& w);
// x: float32/float16/bfloat16, not empty; blocksize a power of two in [32, 4096]; code2 (double quantization)
// float32 [256] on x's device.
void check_nf4_quantize_args(const at::Tensor& x, int64_t blocksize, const std::optional<at::Tensor>& code2);
// nf4_dequantize: dtype float32/float16/bfloat16, shape non-negative; returns the checked weight of prod(shape).
Nf4Weight check_nf4_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax,
                                    const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                                    const std::optional<at::Tensor>& offset, int64_t blocksize, at::IntArrayRef shape,
                                    at::ScalarType dtype);
// nf4_gemv: x [..., K] float16/bfloat16 with 1..16 rows; the weight is [out_features, K]. Returns it checked.
Nf4Weight check_nf4_gemv_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                              const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features);

// gguf_quantize: x [..., n] float, n a positive multiple of the type's block (32 or 256); qtype a ggml type id.
void check_gguf_quantize_args(const at::Tensor& x, int64_t qtype);
// The uint8 [..., n/block·block_bytes] output tensor on x's device.
at::Tensor gguf_quantize_output(const at::Tensor& x, int64_t qtype);

}  // namespace swiftlora
