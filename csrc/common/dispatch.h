// dtype dispatch for the three floating types every op accepts (no float64: fewer instantiations to compile).
#pragma once
#include <ATen/Dispatch.h>

#define SWIFTLORA_DISPATCH_FLOAT(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The two 16-bit types only (ops whose inputs are activations in a compute dtype, e.g. nf4_gemv).
#define SWIFTLORA_DISPATCH_HALF(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
