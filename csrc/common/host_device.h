// Function qualifiers for arithmetic shared by the CPU (.cpp) and CUDA (.cu) kernels.
#pragma once

#ifdef __CUDACC__
#define SWIFTLORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SWIFTLORA_HOST_DEVICE inline
#endif

// Full unrolling in device code (keeps small per-thread arrays in registers); nothing for host compilers, which
// would warn on the pragma when they compile a .cu file's host side.
#ifdef __CUDA_ARCH__
#define SWIFTLORA_UNROLL _Pragma("unroll")
#else
#define SWIFTLORA_UNROLL
#endif
