// Host side of TMA: 2-D tensor maps encoded through the runtime's driver entry point (no libcuda link), for the
// sm_90a kernels (qlora_gemm, the fused logits GEMM of lm_head_blocks_).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda.h>  // CUtensorMap and its enums
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace swiftlora::cuda {

// cuTensorMapEncodeTiled through the runtime (the driver's entry point, looked up once).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
    TORCH_CHECK(q == cudaDriverEntryPointSuccess && f != nullptr,
                "swiftlora: the CUDA driver does not provide cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A row-major [rows, inner] tensor (row pitch in bytes, a multiple of 16) read in [box_rows, box_inner] boxes;
// out-of-range rows and columns read as zeros.
inline CUtensorMap tensor_map_2d(const void* ptr, CUtensorMapDataType type, int64_t inner, int64_t rows,
                                 int64_t pitch, uint32_t box_inner, uint32_t box_rows, CUtensorMapSwizzle swizzle) {
  CUtensorMap m;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(pitch)};
  const cuuint32_t box[2] = {box_inner, box_rows};
  const cuuint32_t unit[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(&m, type, 2, const_cast<void*>(ptr), dims, strides, box, unit,
                                          CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "swiftlora: cuTensorMapEncodeTiled failed with error ", static_cast<int>(r));
  return m;
}

}  // namespace swiftlora::cuda
