// Gated activations shared by the CPU and CUDA kernels: silu and gelu (exact and tanh) with their derivatives, and
// the per-element forward/backward of h = act(gate)·up. Everything is computed in float32 whatever the storage
// dtype. Header-only and free of ATen so nvcc compiles it for the device as it is.
#pragma once
#include <math.h>

#include <cstdint>

#include "common/host_device.h"

namespace swiftlora::glu {

constexpr float kInvSqrt2 = 0.70710678118654752f;    // 1/√2
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1/√(2π)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // √(2/π)
constexpr float kGeluTanhCoeff = 0.044715f;

// 1/x for x >= 1. On the device __fdividef (2 ulp): IEEE division's slow path is a call that spills registers.
SWIFTLORA_HOST_DEVICE float reciprocal(float x) {
#ifdef __CUDA_ARCH__
  return __fdividef(1.f, x);
#else
  return 1.f / x;
#endif
}

// silu(g) = g·σ(g);  silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
struct Silu {
  static SWIFTLORA_HOST_DEVICE float sigmoid(float g) { return reciprocal(1.f + expf(-g)); }
  static SWIFTLORA_HOST_DEVICE float value(float g) { return g * sigmoid(g); }
  static SWIFTLORA_HOST_DEVICE float grad(float g) {
    const float s = sigmoid(g);
    return s * (1.f + g * (1.f - s));
  }
};

// gelu(g) = g·Φ(g), Φ(g) = ½(1 + erf(g/√2)) = ½·erfc(−g/√2) (no cancellation for g < 0);
// gelu'(g) = Φ(g) + g·φ(g), φ(g) = exp(−g²/2)/√(2π).
struct GeluExact {
  static SWIFTLORA_HOST_DEVICE float cdf(float g) { return 0.5f * erfcf(-g * kInvSqrt2); }
  static SWIFTLORA_HOST_DEVICE float value(float g) { return g * cdf(g); }
  static SWIFTLORA_HOST_DEVICE float grad(float g) { return cdf(g) + g * kInvSqrt2Pi * expf(-0.5f * g * g); }
};

// The same through erf: Φ(g) = ½ + ½·erf(g/√2). Cheaper; loses relative precision where Φ is tiny (g ≪ 0),
// which only 16-bit outputs may afford (see dispatch_activation).
struct GeluExactErf {
  static SWIFTLORA_HOST_DEVICE float cdf(float g) { return 0.5f + 0.5f * erff(g * kInvSqrt2); }
  static SWIFTLORA_HOST_DEVICE float value(float g) { return g * cdf(g); }
  static SWIFTLORA_HOST_DEVICE float grad(float g) { return cdf(g) + g * kInvSqrt2Pi * expf(-0.5f * g * g); }
};

// gelu_tanh(g) = ½g(1 + t), t = tanh(u), u = √(2/π)(g + 0.044715g³); evaluated as g·σ(2u) (½(1 + tanh u) = σ(2u),
// no cancellation for g < 0). gelu_tanh'(g) = ½(1 + t) + ½g(1 − t²)·u' = σ(2u) + 2g·σ(2u)(1 − σ(2u))·u',
// u' = √(2/π)(1 + 3·0.044715g²).
struct GeluTanh {
  static SWIFTLORA_HOST_DEVICE float half_one_plus_tanh(float g) {
    return Silu::sigmoid(2.f * kSqrt2OverPi * (g + kGeluTanhCoeff * g * g * g));
  }
  static SWIFTLORA_HOST_DEVICE float value(float g) { return g * half_one_plus_tanh(g); }
  static SWIFTLORA_HOST_DEVICE float grad(float g) {
    const float s = half_one_plus_tanh(g);
    return s + 2.f * g * s * (1.f - s) * kSqrt2OverPi * (1.f + 3.f * kGeluTanhCoeff * g * g);
  }
};

// Forward. in: {gate, up}; out: {h = act(gate)·up}.
template <typename Act>
struct GluForward {
  static constexpr int kIn = 2, kOut = 1;
  SWIFTLORA_HOST_DEVICE void operator()(const float* in, float* out) const { out[0] = Act::value(in[0]) * in[1]; }
};

// Backward. in: {grad, gate, up}; out: {d gate = grad·up·act'(gate), d up = grad·act(gate)} and, with kRecompute,
// h = act(gate)·up (the forward output, for the down projection's weight gradient), computed as GluForward does.
template <typename Act, bool kRecompute>
struct GluBackward {
  static constexpr int kIn = 3, kOut = kRecompute ? 3 : 2;
  SWIFTLORA_HOST_DEVICE void operator()(const float* in, float* out) const {
    const float a = Act::value(in[1]);  // shares cdf/sigmoid with grad() after inlining
    out[0] = in[0] * in[2] * Act::grad(in[1]);
    out[1] = in[0] * a;
    if constexpr (kRecompute) out[2] = a * in[2];
  }
};

// The operands of one call, each a [rows, n] matrix with unit column stride and its own row stride. Outputs may
// alias inputs element for element (in-place backward): kernels read an element of every input before writing it.
template <typename T, int kIn, int kOut>
struct GluOperands {
  const T* in[kIn];
  int64_t in_stride[kIn];
  T* out[kOut];
  int64_t out_stride[kOut];
  int64_t rows, n;
};

}  // namespace swiftlora::glu
