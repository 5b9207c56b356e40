// CK(call): the standalone programs' CUDA error check: print the error and where, then exit(1). A program that has
// more to say first (the dgrad program's watchdog report) defines MICRO_ON_CUDA_ERROR() before including this.
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#ifndef MICRO_ON_CUDA_ERROR
#define MICRO_ON_CUDA_ERROR() ((void)0)
#endif

#define CK(call)                                                                                  \
  do {                                                                                            \
    cudaError_t e_ = (call);                                                                      \
    if (e_ != cudaSuccess) {                                                                      \
      fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, __LINE__, \
              cudaGetErrorString(e_));                                                            \
      MICRO_ON_CUDA_ERROR();                                                                      \
      exit(1);                                                                                    \
    }                                                                                             \
  } while (0)
