// K-quant (256-element super-block) arithmetic shared by the CPU and CUDA kernels, in the reference quantizer's
// exact operation order (see gguf_quant_math.h for why). Each type is split in the same stages on both backends:
//   1. fit:     per sub-block, an iterative search for its scale (and min) and first codes L   (independent)
//   2. combine: the super-block's largest scale/min -> 6- or 4-bit scale codes, fp16 d (dmin)  (a max: any order)
//   3. requant: per sub-block, the codes again from the *stored* (fp16-rounded) d·sc, dmin·m     (independent)
//   4. pack:    codes -> bytes; every output byte is a function of a few codes
// The CPU runs the stages in a loop per super-block; the CUDA kernel gives each sub-block a thread.
// Layouts (ggml-common.h):
//   Q2_K 84 B:  scales[16] (low nibble scale, high nibble min), qs[64], d, dmin      16 sub-blocks of 16
//   Q3_K 110 B: hmask[32], qs[64], scales[12] (6-bit, signed by -32), d                16 sub-blocks of 16
//   Q4_K 144 B: d, dmin, scales[12] (6-bit scale and min codes), qs[128]              8 sub-blocks of 32
//   Q5_K 176 B: d, dmin, scales[12], qh[32], qs[128]                                  8 sub-blocks of 32
//   Q6_K 210 B: ql[128], qh[64], scales[16] int8, d                                   16 sub-blocks of 16
#pragma once
#include "common/gguf_quant_math.h"

namespace swiftlora::gguf {

constexpr float kGroupMaxEps = 1e-15f;  // below this the reference treats a group as all zero

// ------------------------------------------------------------------------------------------- the searches

// Scale s (and min m <= 0) minimising Σ w·(s·L + m − x)² (or |·| with use_mad) over a grid of inverse scales;
// L in [0, nmax]. Returns s, writes −m to *neg_min. The reference's make_qkx2_quants.
template <int N>
SWIFTLORA_HOST_DEVICE float fit_scale_min(int nmax, const float* x, const float* w, uint8_t* L, float* neg_min,
                                          float rmin, float rdelta, int nstep, bool use_mad) {
  float min = x[0], max = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  SWIFTLORA_UNROLL
  for (int i = 1; i < N; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    SWIFTLORA_UNROLL
    for (int i = 0; i < N; ++i) L[i] = 0;
    *neg_min = -min;
    return 0.f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  SWIFTLORA_UNROLL
  for (int i = 0; i < N; ++i) {
    L[i] = static_cast<uint8_t>(imax(0, imin(nmax, nearest_int(iscale * (x[i] - min)))));
    float diff = scale * L[i] + min - x[i];
    diff = use_mad ? fabsf(diff) : diff * diff;
    best_error += w[i] * diff;
  }
  uint8_t Laux[N];
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    SWIFTLORA_UNROLL
    for (int i = 0; i < N; ++i) {
      const int l = imax(0, imin(nmax, nearest_int(iscale * (x[i] - min))));
      Laux[i] = static_cast<uint8_t>(l);
      sum_l += w[i] * l;
      sum_l2 += w[i] * l * l;
      sum_xl += w[i] * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      SWIFTLORA_UNROLL
      for (int i = 0; i < N; ++i) {
        float diff = this_scale * Laux[i] + this_min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        cur_error += w[i] * diff;
      }
      if (cur_error < best_error) {
        SWIFTLORA_UNROLL
        for (int i = 0; i < N; ++i) L[i] = Laux[i];
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *neg_min = -min;
  return scale;
}

SWIFTLORA_HOST_DEVICE int clamp_signed(int l, int nmax) { return imax(-nmax, imin(nmax - 1, l)); }

// The symmetric searches' start: *max = the element of largest magnitude; a group below kGroupMaxEps is all zero
// (codes 0, scale 0) and returns true.
template <int N>
SWIFTLORA_HOST_DEVICE bool is_zero_group(const float* x, int8_t* L, float* max) {
  float amax;
  *max = first_absmax<N>(x, &amax);
  if (amax >= kGroupMaxEps) return false;
  SWIFTLORA_UNROLL
  for (int i = 0; i < N; ++i) L[i] = 0;
  return true;
}

// Symmetric scale for codes L in [0, 2·nmax) (value = scale·(L − nmax)), weights x² (the reference's
// make_qx_quants with rmse_type 1 and no importance weights): a first guess, then 18 nudged inverse scales.
template <int N>
SWIFTLORA_HOST_DEVICE float fit_scale_symmetric(int nmax, const float* x, int8_t* L) {
  float max;
  if (is_zero_group<N>(x, L, &max)) return 0.f;
  float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  SWIFTLORA_UNROLL
  for (int i = 0; i < N; ++i) {
    const int l = clamp_signed(nearest_int(iscale * x[i]), nmax);
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / max;
    sumlx = suml2 = 0;
    SWIFTLORA_UNROLL
    for (int i = 0; i < N; ++i) {
      const int l = clamp_signed(nearest_int(iscale * x[i]), nmax);
      const float w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      SWIFTLORA_UNROLL
      for (int i = 0; i < N; ++i) L[i] = static_cast<int8_t>(nmax + clamp_signed(nearest_int(iscale * x[i]), nmax));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// Q3_K's search (make_q3_quants with do_rmse): a first guess, then up to 5 sweeps moving one code at a time when
// that improves the weighted fit. Codes in [0, 2·nmax).
template <int N>
SWIFTLORA_HOST_DEVICE float fit_scale_q3(int nmax, const float* x, int8_t* L) {
  float max;
  if (is_zero_group<N>(x, L, &max)) return 0.f;
  const float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  SWIFTLORA_UNROLL
  for (int i = 0; i < N; ++i) {
    const int l = clamp_signed(nearest_int(iscale * x[i]), nmax);
    L[i] = static_cast<int8_t>(l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    SWIFTLORA_UNROLL
    for (int i = 0; i < N; ++i) {
      const float w = x[i] * x[i];
      float slx = sumlx - w * x[i] * L[i];
      if (slx > 0) {
        float sl2 = suml2 - w * L[i] * L[i];
        const int new_l = clamp_signed(nearest_int(x[i] * sl2 / slx), nmax);
        if (new_l != L[i]) {
          slx += w * x[i] * new_l;
          sl2 += w * new_l * new_l;
          if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<int8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++n_changed;
          }
        }
      }
    }
    if (!n_changed) break;
  }
  SWIFTLORA_UNROLL
  for (int i = 0; i < N; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// -------------------------------------------------------------------------------- stage 1: sub-block fits

// Q4_K (NMAX 15) / Q5_K (NMAX 31), 32 elements: weights = rms(x) + |x|.
template <int NMAX>
SWIFTLORA_HOST_DEVICE float q45k_fit(const float* x, uint8_t* L, float* neg_min) {
  float sum_x2 = 0;
  SWIFTLORA_UNROLL
  for (int l = 0; l < 32; ++l) sum_x2 += x[l] * x[l];
  const float av_x = sqrtf(sum_x2 / 32);
  float w[32];
  SWIFTLORA_UNROLL
  for (int l = 0; l < 32; ++l) w[l] = av_x + fabsf(x[l]);
  return NMAX == 15 ? fit_scale_min<32>(15, x, w, L, neg_min, -1.f, 0.1f, 20, false)
                    : fit_scale_min<32>(31, x, w, L, neg_min, -0.5f, 0.1f, 15, false);
}

// Q2_K, 16 elements: weights = |x|, absolute-error criterion.
SWIFTLORA_HOST_DEVICE float q2k_fit(const float* x, uint8_t* L, float* neg_min) {
  float w[16];
  SWIFTLORA_UNROLL
  for (int l = 0; l < 16; ++l) w[l] = fabsf(x[l]);
  return fit_scale_min<16>(3, x, w, L, neg_min, -0.5f, 0.1f, 15, true);
}

// ----------------------------------------------------------------------- stage 2: scale codes from maxima

// Q4_K/Q5_K: 6-bit codes of a sub-block's scale and min, given the super-block maxima (both >= 0).
SWIFTLORA_HOST_DEVICE void q45k_codes(float max_scale, float max_min, float scale, float neg_min, uint8_t* ls,
                                      uint8_t* lm) {
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  const uint8_t s = static_cast<uint8_t>(nearest_int(inv_scale * scale));
  const uint8_t m = static_cast<uint8_t>(nearest_int(inv_min * neg_min));
  *ls = s < 63 ? s : 63;
  *lm = m < 63 ? m : 63;
}

// Q2_K: one byte per sub-block, scale code low nibble, min code high nibble (C's truncations kept).
SWIFTLORA_HOST_DEVICE uint8_t q2k_code(float max_scale, float max_min, float scale, float neg_min) {
  uint8_t b = 0;
  if (max_scale > 0) b = static_cast<uint8_t>(nearest_int((15.f / max_scale) * scale));
  if (max_min > 0) b = static_cast<uint8_t>(b | (nearest_int((15.f / max_min) * neg_min) << 4));
  return b;
}

// Q3_K: 6-bit code (value + 32) of a sub-block scale, given the signed scale of largest magnitude (nonzero).
SWIFTLORA_HOST_DEVICE int q3k_code(float max_scale, float scale) {
  const float iscale = -32.f / max_scale;
  const int8_t l = static_cast<int8_t>(nearest_int(iscale * scale));
  return imax(-32, imin(31, l)) + 32;
}

// Q6_K: int8 code of a sub-block scale, given iscale = -128/(signed scale of largest magnitude).
SWIFTLORA_HOST_DEVICE int8_t q6k_code(float iscale, float scale) {
  return static_cast<int8_t>(imin(127, nearest_int(iscale * scale)));
}

// ---------------------------------------------------------------- stage 3: codes from the stored scales

// Asymmetric (Q2_K/Q4_K/Q5_K): L = clamp(round((x + dmin·m)/(d·sc)), 0, nmax); untouched when d·sc is 0.
template <int N>
SWIFTLORA_HOST_DEVICE void requant_min(const float* x, uint8_t* L, int nmax, float d_all, int sc, float dmin_all,
                                       int m) {
  const float d = d_all * sc;
  if (!d) return;
  const float dm = dmin_all * m;
  SWIFTLORA_UNROLL
  for (int i = 0; i < N; ++i) L[i] = static_cast<uint8_t>(imax(0, imin(nmax, nearest_int((x[i] + dm) / d))));
}

// Symmetric (Q3_K: nmax 4, Q6_K: nmax 32): L = clamp(round(x/(d·sc)), -nmax, nmax-1) + nmax.
template <int N>
SWIFTLORA_HOST_DEVICE void requant_sym(const float* x, int8_t* L, int nmax, float d_all, int sc) {
  const float d = d_all * sc;
  if (!d) return;
  SWIFTLORA_UNROLL
  for (int i = 0; i < N; ++i) L[i] = static_cast<int8_t>(clamp_signed(nearest_int(x[i] / d), nmax) + nmax);
}

// ------------------------------------------------------------------------------------ stage 4: packing
// Each returns one output byte from the super-block's 256 codes (uint8 or int8 storage, values >= 0).

// Q4_K/Q5_K qs byte b (of 128): low nibble element 64g+l, high nibble 64g+32+l (g = b/32, l = b%32).
template <typename C>
SWIFTLORA_HOST_DEVICE uint8_t q45k_qs_byte(const C* L, int b) {
  const int g = b >> 5, l = b & 31;
  return static_cast<uint8_t>((L[64 * g + l] & 0xf) | ((L[64 * g + 32 + l] & 0xf) << 4));
}

// Q5_K qh byte l (of 32): bit 2g = 5th bit of element 64g+l, bit 2g+1 of element 64g+32+l.
SWIFTLORA_HOST_DEVICE uint8_t q5k_qh_byte(const uint8_t* L, int l) {
  uint8_t b = 0;
  for (int g = 0; g < 4; ++g) {
    if (L[64 * g + l] > 15) b |= static_cast<uint8_t>(1u << (2 * g));
    if (L[64 * g + 32 + l] > 15) b |= static_cast<uint8_t>(2u << (2 * g));
  }
  return b;
}

// Q4_K/Q5_K scales byte k (of 12) from the 8 scale codes ls and 8 min codes lm (6 bits each).
SWIFTLORA_HOST_DEVICE uint8_t q45k_scales_byte(const uint8_t* ls, const uint8_t* lm, int k) {
  if (k < 4) return static_cast<uint8_t>(ls[k] | ((ls[k + 4] >> 4) << 6));
  if (k < 8) return static_cast<uint8_t>(lm[k - 4] | ((lm[k] >> 4) << 6));
  return static_cast<uint8_t>((ls[k - 4] & 0xf) | ((lm[k - 4] & 0xf) << 4));
}

// Q2_K/Q3_K qs byte b (of 64): four 2-bit codes, elements 128h+l, +32, +64, +96 (h = b/32, l = b%32).
template <typename C>
SWIFTLORA_HOST_DEVICE uint8_t q23k_qs_byte(const C* L, int b) {
  const C* p = L + 128 * (b >> 5) + (b & 31);
  return static_cast<uint8_t>((p[0] & 3) | ((p[32] & 3) << 2) | ((p[64] & 3) << 4) | ((p[96] & 3) << 6));
}

// Q3_K hmask byte m (of 32): bit k = the code's 3rd bit (code > 3) of element 32k+m.
SWIFTLORA_HOST_DEVICE uint8_t q3k_hmask_byte(const int8_t* L, int m) {
  uint8_t b = 0;
  for (int k = 0; k < 8; ++k) {
    if (L[32 * k + m] > 3) b |= static_cast<uint8_t>(1u << k);
  }
  return b;
}

// Q3_K scales byte k (of 12) from the 16 6-bit codes: low nibbles of codes k and k+8 in bytes 0..7, the top two
// bits of code j at bits 2·(j/4) of byte 8 + j%4.
SWIFTLORA_HOST_DEVICE uint8_t q3k_scales_byte(const int* codes, int k) {
  if (k < 8) return static_cast<uint8_t>((codes[k] & 0xf) | ((codes[k + 8] & 0xf) << 4));
  uint8_t b = 0;
  for (int q = 0; q < 4; ++q) b |= static_cast<uint8_t>((codes[k - 8 + 4 * q] >> 4) << (2 * q));
  return b;
}

// Q6_K ql byte b (of 128) and qh byte b (of 64): per 128-element half h, ql[64h + l] holds elements l / l+64,
// ql[64h + 32 + l] elements l+32 / l+96 (low 4 bits), qh[32h + l] the top 2 bits of l, l+32, l+64, l+96.
SWIFTLORA_HOST_DEVICE uint8_t q6k_ql_byte(const int8_t* L, int b) {
  const int h = b >> 6, r = b & 63;
  const int8_t* p = L + 128 * h + (r & 31) + (r >> 5) * 32;
  return static_cast<uint8_t>((p[0] & 0xf) | ((p[64] & 0xf) << 4));
}
SWIFTLORA_HOST_DEVICE uint8_t q6k_qh_byte(const int8_t* L, int b) {
  const int8_t* p = L + 128 * (b >> 5) + (b & 31);
  return static_cast<uint8_t>((p[0] >> 4) | ((p[32] >> 4) << 2) | ((p[64] >> 4) << 4) | ((p[96] >> 4) << 6));
}

}  // namespace swiftlora::gguf
