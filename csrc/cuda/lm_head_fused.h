// lm_head_blocks_ on sm_90a with the online softmax inside the logits GEMM (csrc/cuda/logits_softmax_sm90.cuh):
// per vocabulary block after the first, one launch writes P and per-tile statistics, cuBLAS accumulates G += P·W_b,
// and a small merge launch folds the statistics into the rows (and corrects the rare rows whose reference max had
// to move). Block 0 (`cols` columns) keeps the cuBLAS + online_softmax_block_ path: it sets the reference max the
// others use; the blocks after it are 2·cols wide, in the memory of the host loop's two block buffers.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace swiftlora::cuda {

// Whether the fused path takes this call: an sm_90a build on an sm_90 device, bf16 hc and weight with 16-byte
// rows, no bias, no gz, no soft-cap, logit_scale > 0, hidden size > 896 (the epilogue rides 14 k-tiles), and
// SWIFTLORA_LM_HEAD_FUSED not "0".
bool lm_head_fused_supported(const at::Tensor& hc, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& gz, double softcap, double logit_scale);

// The whole vocabulary loop of one token chunk (the arguments as lm_head_blocks_'s, already checked). `sums`: the
// optional row sums the caller reads (logits_sm90::kSumZ: stats[:, 2] = Σz; kSumEz: stats[:, 3] = Σe^{z−m}·z); the
// others are left unspecified.
void lm_head_blocks_fused(const at::Tensor& hc, const at::Tensor& weight, const std::optional<at::Tensor>& labels,
                          at::Tensor& stats, at::Tensor& g, int64_t cols, int64_t ignore_index, double logit_scale,
                          int64_t sums);

}  // namespace swiftlora::cuda
