// GGUF block quantization, the arithmetic shared by the CPU and CUDA kernels (csrc/*/gguf_quant.*): the helpers
// of llama.cpp's reference quantizer (ggml-quants.c, the `quantize_row_*_ref` functions llama-quantize calls when
// it has no importance matrix), re-derived so that every float operation happens in the same order with the same
// rounding. That is what makes the output byte-identical to llama.cpp's, so both backends must compile this file
// without FMA contraction (CMakeLists: -ffp-contract=off for the .cpp, -fmad=false for the .cu).
//
// Block layouts (ggml-common.h; all scales IEEE fp16, little endian):
//   Q8_0  32 -> 34 B: d, qs[32] int8                Q4_0  32 -> 18 B: d, qs[16] (x_j low nibble, x_{j+16} high)
//   Q4_1  32 -> 20 B: d, m, qs[16]                  Q5_0  32 -> 22 B: d, qh u32 (5th bits), qs[16]
//   Q5_1  32 -> 24 B: d, m, qh u32, qs[16]
// The K-quants (256-element super-blocks) are in gguf_kquant_math.h.
#pragma once
#include <math.h>

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace swiftlora::gguf {

// ggml_type ids (GGMLQuantizationType in gguf-py) of the types we quantize, and their block geometry.
enum QType : int { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2_K = 10, kQ3_K = 11, kQ4_K = 12,
                   kQ5_K = 13, kQ6_K = 14 };
constexpr int kQK = 32;    // elements per block of the legacy types
constexpr int kQKK = 256;  // elements per K-quant super-block

inline int block_elems(int t) { return t >= kQ2_K ? kQKK : kQK; }
inline int block_bytes(int t) {
  switch (t) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ5_0: return 22;
    case kQ5_1: return 24;
    case kQ8_0: return 34;
    case kQ2_K: return 84;
    case kQ3_K: return 110;
    case kQ4_K: return 144;
    case kQ5_K: return 176;
    case kQ6_K: return 210;
    default: return 0;  // not a type we quantize
  }
}

SWIFTLORA_HOST_DEVICE uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

SWIFTLORA_HOST_DEVICE float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// fp32 -> fp16 bits, round to nearest even; overflow -> inf; NaN -> 0x7E00 with the sign (as ggml's software
// conversion, which the reference quantizer uses whatever the CPU).
SWIFTLORA_HOST_DEVICE uint16_t fp32_to_fp16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;           // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;          // >= 65520 rounds to inf (and inf itself)
  if (a >= 0x38800000u) {                               // normal in fp16 (>= 2^-14)
    const uint32_t mant = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits to nearest even
    return sign | static_cast<uint16_t>((mant - 0x38000000u) >> 13);
  }
  if (a < 0x33000000u) return sign;                     // < 2^-25: rounds to zero (2^-25 itself ties to 0)
  // Subnormal in fp16: value = m·2^-24 with m = round(a_value·2^24), a_value's exponent e in [-25, -15].
  const uint32_t e = a >> 23;                           // biased exponent, 102..112
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;       // 24-bit significand
  const uint32_t shift = 126u - e;                      // bits to drop: significand·2^(e-150) / 2^-24
  const uint32_t half = 1u << (shift - 1);
  const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u);
  return sign | static_cast<uint16_t>(q + (rem > half || (rem == half && (q & 1u))));
}

SWIFTLORA_HOST_DEVICE float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));
  if (e != 0) return bits_float(sign | ((e + 112u) << 23) | (m << 13));
  return bits_float(sign | float_bits(static_cast<float>(m) * 5.9604644775390625e-8f));  // m·2^-24, exact
}

SWIFTLORA_HOST_DEVICE void store_fp16(uint8_t* p, float f) {
  const uint16_t h = fp32_to_fp16(f);
  p[0] = static_cast<uint8_t>(h & 0xff);
  p[1] = static_cast<uint8_t>(h >> 8);
}

SWIFTLORA_HOST_DEVICE float load_fp16(const uint8_t* p) {
  return fp16_to_fp32(static_cast<uint16_t>(p[0] | (p[1] << 8)));
}

// Round half to even through the float adder (1.5·2^23 pushes the integer into the low mantissa bits), the
// reference's `nearest_int`, including what it returns for values beyond 2^22 (kept: it is what llama.cpp writes).
// A NaN (e.g. inf·0 on a super-block whose fp16 scale overflowed) is x86's default NaN 0xFFC00000 on the CPU,
// which gives 0; the GPU's canonical NaN has other payload bits, so the device returns that 0 explicitly.
SWIFTLORA_HOST_DEVICE int nearest_int(float f) {
#ifdef __CUDA_ARCH__
  if (f != f) return 0;
#endif
  const float v = f + 12582912.f;
  return static_cast<int>(float_bits(v) & 0x007fffffu) - 0x00400000;
}

// float -> int as an x86-64 build of the reference converts (cvttss2si): truncation, and INT_MIN for NaN and
// out-of-range values. The legacy types then keep the low byte (a C cast to int8/uint8).
SWIFTLORA_HOST_DEVICE int x86_trunc(float f) {
  return (f > -2147483904.f && f < 2147483648.f) ? static_cast<int>(f) : static_cast<int>(0x80000000u);
}
SWIFTLORA_HOST_DEVICE int low_byte_signed(int v) { return static_cast<int8_t>(static_cast<uint8_t>(v & 0xff)); }

// x86_trunc(roundf(f)): round half away from zero, without a libm call (x86-64's baseline has no roundss).
// Exact: f - trunc(f) is representable, and floats >= 2^23 are integers.
SWIFTLORA_HOST_DEVICE int x86_round(float f) {
  if (!(f > -2147483648.f && f < 2147483648.f)) return static_cast<int>(0x80000000u);
  int i = static_cast<int>(f);
  const float frac = f - static_cast<float>(i);
  if (frac >= 0.5f) ++i;
  else if (frac <= -0.5f) --i;
  return i;
}

SWIFTLORA_HOST_DEVICE int imin(int a, int b) { return a < b ? a : b; }
SWIFTLORA_HOST_DEVICE int imax(int a, int b) { return a > b ? a : b; }

// ------------------------------------------------------------------------------------------ legacy 32-blocks

// Q8_0: d = amax/127, q = round-half-away(x/d).
SWIFTLORA_HOST_DEVICE void quantize_block_q8_0(const float* x, uint8_t* out) {
  float amax = 0.f;
  for (int j = 0; j < kQK; ++j) amax = amax > fabsf(x[j]) ? amax : fabsf(x[j]);
  const float d = amax / 127;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  store_fp16(out, d);
  for (int j = 0; j < kQK; ++j) out[2 + j] = static_cast<uint8_t>(x86_round(x[j] * id) & 0xff);
}

// The element of largest magnitude (the first one on ties: a strict > from 0, as the reference loops), and its
// magnitude in *amax.
template <int N>
SWIFTLORA_HOST_DEVICE float first_absmax(const float* x, float* amax) {
  float a = 0.f, max = 0.f;
  SWIFTLORA_UNROLL
  for (int j = 0; j < N; ++j) {
    if (fabsf(x[j]) > a) {
      a = fabsf(x[j]);
      max = x[j];
    }
  }
  *amax = a;
  return max;
}

SWIFTLORA_HOST_DEVICE float signed_absmax(const float* x) {
  float amax;
  return first_absmax<kQK>(x, &amax);
}

// Q4_0: d = max/-8, q = min(15, trunc(x/d + 8.5)); byte j = q_j | q_{j+16} << 4.
SWIFTLORA_HOST_DEVICE void quantize_block_q4_0(const float* x, uint8_t* out) {
  const float d = signed_absmax(x) / -8;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  store_fp16(out, d);
  for (int j = 0; j < kQK / 2; ++j) {
    const uint8_t q0 = static_cast<uint8_t>(imin(15, low_byte_signed(x86_trunc(x[j] * id + 8.5f))));
    const uint8_t q1 = static_cast<uint8_t>(imin(15, low_byte_signed(x86_trunc(x[j + kQK / 2] * id + 8.5f))));
    out[2 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

// Q5_0: d = max/-16, q = min(31, trunc(x/d + 16.5)); low nibbles as Q4_0, 5th bits in qh (bit j <- element j).
SWIFTLORA_HOST_DEVICE void quantize_block_q5_0(const float* x, uint8_t* out) {
  const float d = signed_absmax(x) / -16;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  store_fp16(out, d);
  uint32_t qh = 0;
  for (int j = 0; j < kQK / 2; ++j) {
    const uint8_t q0 = static_cast<uint8_t>(imin(31, low_byte_signed(x86_trunc(x[j] * id + 16.5f))));
    const uint8_t q1 = static_cast<uint8_t>(imin(31, low_byte_signed(x86_trunc(x[j + kQK / 2] * id + 16.5f))));
    out[6 + j] = static_cast<uint8_t>((q0 & 0x0f) | ((q1 & 0x0f) << 4));
    qh |= static_cast<uint32_t>((q0 & 0x10u) >> 4) << j;
    qh |= static_cast<uint32_t>((q1 & 0x10u) >> 4) << (j + kQK / 2);
  }
  for (int b = 0; b < 4; ++b) out[2 + b] = static_cast<uint8_t>(qh >> (8 * b));
}

// Q4_1/Q5_1: d = (max - min)/levels and m = min into the block's first 4 bytes; returns 1/d (0 when d is 0).
SWIFTLORA_HOST_DEVICE float store_asym_scale(const float* x, int levels, uint8_t* out, float* mn) {
  float lo = 3.40282347e+38f, hi = -3.40282347e+38f;
  for (int j = 0; j < kQK; ++j) {
    if (x[j] < lo) lo = x[j];
    if (x[j] > hi) hi = x[j];
  }
  const float d = (hi - lo) / levels;
  store_fp16(out, d);
  store_fp16(out + 2, lo);
  *mn = lo;
  return d != 0.f ? 1.0f / d : 0.0f;
}

// Q4_1: d = (max-min)/15, m = min, q = min(15, trunc((x-min)/d + 0.5)).
SWIFTLORA_HOST_DEVICE void quantize_block_q4_1(const float* x, uint8_t* out) {
  float mn;
  const float id = store_asym_scale(x, 15, out, &mn);
  for (int j = 0; j < kQK / 2; ++j) {
    const uint8_t q0 = static_cast<uint8_t>(imin(15, low_byte_signed(x86_trunc((x[j] - mn) * id + 0.5f))));
    const uint8_t q1 = static_cast<uint8_t>(imin(15, low_byte_signed(x86_trunc((x[j + kQK / 2] - mn) * id + 0.5f))));
    out[4 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

// Q5_1: d = (max-min)/31, m = min, q = trunc((x-min)/d + 0.5) (no clamp in the reference).
SWIFTLORA_HOST_DEVICE void quantize_block_q5_1(const float* x, uint8_t* out) {
  float mn;
  const float id = store_asym_scale(x, 31, out, &mn);
  uint32_t qh = 0;
  for (int j = 0; j < kQK / 2; ++j) {
    const uint8_t q0 = static_cast<uint8_t>(x86_trunc((x[j] - mn) * id + 0.5f) & 0xff);
    const uint8_t q1 = static_cast<uint8_t>(x86_trunc((x[j + kQK / 2] - mn) * id + 0.5f) & 0xff);
    out[8 + j] = static_cast<uint8_t>((q0 & 0x0f) | ((q1 & 0x0f) << 4));
    qh |= static_cast<uint32_t>((q0 & 0x10u) >> 4) << j;
    qh |= static_cast<uint32_t>((q1 & 0x10u) >> 4) << (j + kQK / 2);
  }
  for (int b = 0; b < 4; ++b) out[4 + b] = static_cast<uint8_t>(qh >> (8 * b));
}

SWIFTLORA_HOST_DEVICE void quantize_block_legacy(int qtype, const float* x, uint8_t* out) {
  switch (qtype) {
    case kQ8_0: quantize_block_q8_0(x, out); break;
    case kQ4_0: quantize_block_q4_0(x, out); break;
    case kQ4_1: quantize_block_q4_1(x, out); break;
    case kQ5_0: quantize_block_q5_0(x, out); break;
    default: quantize_block_q5_1(x, out); break;
  }
}

}  // namespace swiftlora::gguf
