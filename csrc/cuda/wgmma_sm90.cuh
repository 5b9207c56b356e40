// sm_90a PTX shared by the wgmma kernels (the qlora_gemm kernel and the standalone bench/micro programs): 2-D
// tensor-map TMA loads, the wgmma fence / commit / wait, and register pins. Callers use these only in code compiled
// for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL): wgmma exists nowhere else.
#pragma once
#include <cuda.h>  // CUtensorMap

#include <cstdint>

namespace swiftlora::cuda::wgmma {

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// A 2-D box of a tensor map (coordinates: inner element, row) into shared memory, completing its bytes on `bar`;
// rows and columns outside the tensor arrive as zeros (the box's full size is still counted).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Register "uses" the compiler cannot see through: accumulators and A fragments stay in their registers (and are
// not reused) while an asynchronous wgmma reads or writes them.
template <int N>
__device__ __forceinline__ void pin(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int MB>
__device__ __forceinline__ void pin(uint32_t (&a)[MB][4]) {
#pragma unroll
  for (int i = 0; i < MB; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
  }
}

}  // namespace swiftlora::cuda::wgmma
