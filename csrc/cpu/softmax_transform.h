// The logit transform of the CPU softmax kernels (cross_entropy.cpp, online_softmax.cpp): z = softcap·tanh(scale·x/
// softcap) (softcap > 0) or scale·x, and dz/dx.
#pragma once
#include <cmath>

namespace swiftlora::cpu {

// z and dz/dx of one logit.
struct Transform {
  float scale, softcap, inner;  // inner = scale / softcap
  bool capped;

  Transform(double softcap_, double scale_)
      : scale(static_cast<float>(scale_)),
        softcap(static_cast<float>(softcap_)),
        inner(softcap_ > 0 ? static_cast<float>(scale_ / softcap_) : 0.f),
        capped(softcap_ > 0) {}

  float z(float x) const { return capped ? softcap * std::tanh(x * inner) : x * scale; }
  // z and dz/dx = scale·(1 − tanh² u) (capped, u = x·scale/softcap) or scale. 1 − tanh² u is computed as
  // 4e/(1+e)² with e = exp(−2|u|), not from tanh: near saturation 1 − t·t cancels (at 1 − t² = 1e-3 float32 keeps
  // 4 digits), the exp form keeps full precision for every u.
  void z_dz(float x, float& z, float& dz) const {
    if (capped) {
      const float u = x * inner, e = std::exp(-2.f * std::fabs(u));
      z = softcap * std::tanh(u);
      dz = scale * (4.f * e / ((1.f + e) * (1.f + e)));
    } else {
      z = x * scale;
      dz = scale;
    }
  }
};

}  // namespace swiftlora::cpu
