// The sm_90a kernel of qlora_gemm (csrc/cuda/qlora_gemm_sm90.cu): NF4 dequantized into the registers of a
// warp-specialized wgmma GEMM. csrc/cuda/qlora_linear.cu registers qlora_gemm and calls run() when supported(), else
// the dequantize + cuBLAS path.
#pragma once
#include <ATen/core/Tensor.h>

#include "common/qlora_host.h"

namespace swiftlora::cuda::sm90 {

// Built with 90a, running on a compute-capability 9.0 device, 16-bit x, K % 64 == 0, blocksize >= 64, LoRA rank
// <= 64 and % 8 == 0, 16-byte aligned rows of x / xa / lora_b and of the packed weight.
bool supported(const qlora::GemmArgs& a);

// y [M, N] (unit column stride, any row stride: e.g. a projection's columns of a wider output) = x · dequant(W)ᵀ +
// xa · lora_bᵀ (+ bias). scale16: the block scale applied in 16 bits (one HMUL2 a pair: two more roundings than
// bitsandbytes' fp32 product, an error still below a 16-bit GEMM's on the dequantized weight); wide: the
// 128-feature × 256-token tile (half the dequantization per MAC), else 256 × 128.
void run(const qlora::GemmArgs& a, at::Tensor& y, bool scale16, bool wide);

}  // namespace swiftlora::cuda::sm90
