// lm_head_blocks_ on CUDA: on sm_90a where lm_head_fused_supported says so, the fused loop (lm_head_fused_sm90.cu:
// the softmax inside the logits GEMM); else the host loop of csrc/cpu/lm_head_blocks.cpp (shared with the CPU) with
// cuBLAS's float32-output 16-bit GEMM for the accumulation where the device has it (sm80+, as
// _compat.addmm_fp32_ decides).
// No kernel of its own: it issues the logits GEMMs, online_softmax_block_ kernels (which also apply the previous
// block's rescale of G) and the accumulating GEMMs, 3 launches per vocabulary block plus one scale_rows_ per chunk,
// from C++ instead of Python.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/smem_optin.cuh"
#include "cuda/lm_head_fused.h"
#include "ops.h"

namespace swiftlora::cuda {
namespace {

void lm_head_blocks_cuda(const at::Tensor& hc, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& labels, at::Tensor& stats, at::Tensor& g,
                         const std::optional<at::Tensor>& gz, int64_t cols, int64_t ignore_index, double softcap,
                         double logit_scale, int64_t sums) {
  const c10::cuda::CUDAGuard guard(hc.device());  // device_major() reads the current device
  check_lm_head_sums(sums);
  if (lm_head_fused_supported(hc, weight, bias, gz, softcap, logit_scale)) {
    check_lm_head_blocks_args(hc, weight, bias, labels, stats, g, gz, cols);
    lm_head_blocks_fused(hc, weight, labels, stats, g, cols, ignore_index, logit_scale, sums);
    return;
  }
  lm_head_blocks_host(hc, weight, bias, labels, stats, g, gz, cols, ignore_index, softcap, logit_scale,
                      device_major() >= 8);
}

}  // namespace
}  // namespace swiftlora::cuda

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) { m.impl("lm_head_blocks_", &swiftlora::cuda::lm_head_blocks_cuda); }
