// NF4 (bitsandbytes' 4-bit NormalFloat) helpers shared by the CPU and CUDA kernels: the code table, nibble
// decode, the encode rule of bitsandbytes' CUDA quantizer, and the double-quantized absmax (decode and the 8-bit
// dynamic-map encode that produces it). Header-only and free of ATen so nvcc compiles it for the device as it is.
//
// Layout (bitsandbytes, /work/shared/reference/formats-and-peers.md §1): a weight is flattened in row-major order
// and cut into blocks of `blocksize` consecutive elements (the last block may be short); element i has the 4-bit
// code c_i and its block the scale absmax[i / blocksize]; two codes per byte, element 2j in the HIGH nibble:
// packed[j] = c_{2j} << 4 | c_{2j+1}. Value: float(kNF4Code[c_i]) * absmax (fp32), rounded once to the output dtype.
// With double quantization the fp32 scale itself is stored as a uint8 index q into a 256-entry dynamic map
// (code2) with one fp32 absmax2 per 256 scales and one fp32 offset:
//   absmax[b] = fp32(code2[q_b] * absmax2[b / 256]) + offset     (a rounded multiply, then a rounded add).
// Every rounding step below is bitsandbytes' CUDA one (its fast-math kernels: see "bitsandbytes' fp32 ops"), so
// the CUDA kernels reproduce bitsandbytes' CUDA output bit for bit; the host differs only where the GPU's
// approximate reciprocal does (quantization only; dequantization is identical everywhere).
#pragma once
#include <math.h>

#include <cfloat>
#include <cstdint>

#ifndef SWIFTLORA_HOST_DEVICE
#ifdef __CUDACC__
#define SWIFTLORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SWIFTLORA_HOST_DEVICE inline
#endif
#endif

namespace swiftlora::nf4 {

constexpr int kMinBlocksize = 32;       // bitsandbytes >= 0.50 (earlier releases: 64)
constexpr int kMaxBlocksize = 4096;
constexpr int kDefaultBlocksize = 64;
constexpr int kNestedBlocksize = 256;   // compress_statistics always quantizes the absmax in blocks of 256
constexpr int kNestedBlocksizeLog2 = 8;
constexpr int kCode2Size = 256;         // the signed 8-bit dynamic map

// get_4bit_type("nf4"): index = the 4-bit code; sorted; index 7 is exactly 0. Hex literals are the exact fp32
// values (-1.0, -0.6961928009986877, ..., 0.7229568362236023, 1.0; bit patterns BF800000 .. 3F800000), checked
// against bitsandbytes' table by tests/ops/test_nf4.py.
// Lists as macros: nvcc lets device code read a namespace-scope constexpr array only at constant indices inside
// constant expressions, so the device helpers below copy them into local arrays that unrolled loops index.
#define SWIFTLORA_NF4_CODE_VALUES                                                                          \
  -0x1p+0f, -0x1.647362p-1f, -0x1.0cd66p-1f, -0x1.94654p-2f, -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, \
      0x0p+0f, 0x1.45f5fep-4f, 0x1.4995c6p-3f, 0x1.f809bap-3f, 0x1.5a0674p-2f, 0x1.c3497p-2f, 0x1.200f56p-1f,   \
      0x1.722766p-1f, 0x1p+0f

// The 15 thresholds of bitsandbytes' dQuantizeNF4 decision tree (csrc/kernels.cu), ascending, as nvcc compiles
// them: the source spells each as a 16-17 digit decimal of the double midpoint of two table values, and nvcc rounds
// that decimal straight to fp32 (seen in the PTX: e.g. 0fBF591CD9 for -0.8480964004993439f). 11 of them equal the
// fp32 midpoint (code[i] + code[i+1]) / 2; 4 (i = 0, 8, 12, 14) are one ulp from it, because those double midpoints
// lie exactly halfway between two floats and the 17-digit decimal falls on one side. bitsandbytes' PyTorch/CPU
// quantizer bucketizes on the fp32 midpoints, so it disagrees with CUDA for a value exactly at one of those 4
// midpoints; we follow CUDA. Hex literals make the bits independent of any compiler's decimal rounding.
#define SWIFTLORA_NF4_THRESHOLDS                                                                           \
  -0x1.b239b2p-1f, -0x1.38a4ep-1f, -0x1.d709p-2f, -0x1.5bd4ecp-2f, -0x1.e079d8p-3f, -0x1.1a7178p-3f,           \
      -0x1.74f0e2p-5f, 0x1.45f5fep-5f, 0x1.ec90c6p-4f, 0x1.a0cfcp-3f, 0x1.2b05a8p-2f, 0x1.8ea7f2p-2f,           \
      0x1.00da06p-1f, 0x1.491b5ep-1f, 0x1.b913b2p-1f

constexpr float kNF4Code[16] = {SWIFTLORA_NF4_CODE_VALUES};
constexpr float kNF4Threshold[15] = {SWIFTLORA_NF4_THRESHOLDS};

// Writes the 16 table values to dst[0..15] (e.g. a kernel's shared-memory table; one thread, or all of them).
SWIFTLORA_HOST_DEVICE void fill_code_table(float* dst) {
  const float v[16] = {SWIFTLORA_NF4_CODE_VALUES};
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int i = 0; i < 16; ++i) dst[i] = v[i];
}

// ---------------------------------------------------------------------------------------- bitsandbytes' fp32 ops
// bitsandbytes builds its CUDA kernels with --use_fast_math (seen in its shipped SASS: FMNMX.FTZ, FMUL.FTZ,
// FADD.FTZ, MUFU.RCP): fp32 subnormal inputs and results flush to (signed) zero, and 1.0f / absmax is the
// hardware's approximate reciprocal. These helpers reproduce that: on the device with the same PTX instructions
// (rounded separately, so nvcc cannot contract a product into an FMA); on the host with IEEE ops plus explicit
// flushing. The one thing the host cannot reproduce is MUFU.RCP's rounding (within 1 ulp of 1/a, not always the
// nearest float): the host takes the correctly rounded 1/a, as bitsandbytes' own CPU backend does.
SWIFTLORA_HOST_DEVICE float ftz(float x) { return fabsf(x) < FLT_MIN ? copysignf(0.0f, x) : x; }  // NaN stays

SWIFTLORA_HOST_DEVICE float mul_ftz(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return ftz(ftz(a) * ftz(b));
#endif
}

SWIFTLORA_HOST_DEVICE float add_ftz(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("add.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return ftz(ftz(a) + ftz(b));
#endif
}

// IEEE add without flushing (torch's `absmax += offset` and `absmax - offset`, outside bitsandbytes' kernels).
SWIFTLORA_HOST_DEVICE float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// max(m, |x|) with subnormals flushed; a NaN x leaves m (fmaxf semantics).
SWIFTLORA_HOST_DEVICE float max_abs_ftz(float m, float x) {
#ifdef __CUDA_ARCH__
  float r;
  asm("max.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(m), "f"(fabsf(x)));
  return r;
#else
  return fmaxf(ftz(m), ftz(fabsf(x)));
#endif
}

// 1/absmax: rcp.approx.ftz.f32 on the device (what `1.0f / x` compiles to under fast math), the correctly rounded
// reciprocal (flushed) on the host. 1/0 = +inf.
SWIFTLORA_HOST_DEVICE float reciprocal(float a) {
#ifdef __CUDA_ARCH__
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
#else
  return ftz(1.0f / ftz(a));
#endif
}

// ------------------------------------------------------------------------------------------------------ decode
SWIFTLORA_HOST_DEVICE uint32_t high_nibble(uint32_t byte) { return (byte >> 4) & 0xFu; }  // element 2j
SWIFTLORA_HOST_DEVICE uint32_t low_nibble(uint32_t byte) { return byte & 0xFu; }          // element 2j + 1

// The code of element i (0-based, flattened) from the packed bytes.
SWIFTLORA_HOST_DEVICE uint32_t code_at(const uint8_t* packed, int64_t i) {
  const uint32_t byte = packed[i >> 1];
  return (i & 1) ? low_nibble(byte) : high_nibble(byte);
}

// Host-side table lookup. Device kernels keep the table in shared memory or registers (a __constant__ table
// serialises when lanes index different entries), so there is deliberately no device overload here.
inline float code_value(uint32_t code) { return kNF4Code[code & 0xFu]; }

// One dequantized element in fp32: table value times the block's fp32 scale (one rounded, flushed multiply). Cast
// the result to the output dtype with round-to-nearest-even (static_cast / __float2bfloat16_rn / __float2half_rn).
SWIFTLORA_HOST_DEVICE float dequant_value(float table_value, float absmax) { return mul_ftz(table_value, absmax); }

// ------------------------------------------------------------------------------------------------------ encode
// The code of a normalised value xn = x * (1/absmax): the number of thresholds strictly below xn. This is exactly
// bitsandbytes' dQuantizeNF4 decision tree (a binary search over the same sorted thresholds with strict `>`), so
//   - a value exactly on a midpoint goes to the LOWER code (e.g. xn = 0.03979015f -> 7);
//   - NaN compares false everywhere -> code 0 (the tree's all-false leaf). NaN arises from 0 * inf when a whole
//     block is zero or subnormal (absmax = 0, 1/absmax = inf): bitsandbytes' CUDA kernel then stores code 0 for
//     every element (dequantizing to -1 * 0 = -0.0), while its pure-PyTorch/CPU quantizer clamps absmax and
//     stores 7. We follow CUDA, the implementation checkpoints are made with.
// Branch-free: 15 compares, no divergence on the GPU.
SWIFTLORA_HOST_DEVICE uint32_t encode_normalized(float xn) {
  const float thresholds[15] = {SWIFTLORA_NF4_THRESHOLDS};
  uint32_t c = 0;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int t = 0; t < 15; ++t) c += xn > thresholds[t] ? 1u : 0u;
  return c;
}

// The code of x in a block whose reciprocal scale is recip = reciprocal(absmax). The product is rounded on its
// own, as in bitsandbytes (`(float)vals[j] * local_abs_max`).
SWIFTLORA_HOST_DEVICE uint32_t encode(float x, float recip) { return encode_normalized(mul_ftz(x, recip)); }

// Two codes into one byte, the first element in the high nibble.
SWIFTLORA_HOST_DEVICE uint8_t pack(uint32_t first, uint32_t second) {
  return static_cast<uint8_t>((first << 4) | (second & 0xFu));
}

// Block absmax the way bitsandbytes' CUDA quantizer reduces it: max over |x| (NaN ignored, subnormals flushed),
// starting from -FLT_MAX; a short last block also sees the zero padding of its load, so it starts from 0.
SWIFTLORA_HOST_DEVICE float absmax_init(bool short_block) { return short_block ? 0.0f : -FLT_MAX; }
SWIFTLORA_HOST_DEVICE float absmax_step(float m, float x) { return max_abs_ftz(m, x); }

// ----------------------------------------------------------------------------------- double-quantized absmax
// The fp32 scale of NF4 block b from its uint8 index: code2[q] * absmax2[b / 256] + offset, rounded after the
// multiply (bitsandbytes' fast-math dequantize_blockwise kernel, flushed) and after the add (torch's separate
// `absmax += offset`, IEEE).
SWIFTLORA_HOST_DEVICE float nested_absmax(float code2_value, float absmax2_value, float offset) {
  return add_rn(mul_ftz(code2_value, absmax2_value), offset);
}

SWIFTLORA_HOST_DEVICE float nested_absmax(uint32_t q, const float* code2, const float* absmax2, int64_t block,
                                          float offset) {
  return nested_absmax(code2[q], absmax2[block >> kNestedBlocksizeLog2], offset);
}

// bitsandbytes' 8-bit quantizer dQuantize<0> (csrc/kernels.cu) on a sorted 256-entry map `code` and a normalised
// value xn: a 7-step binary search from index 127, then round to the nearer neighbour by the fp32 midpoint
// ((a + b) * 0.5f): above the last probe, go up iff xn > midpoint; otherwise go down iff xn < midpoint. NaN -> 0.
// (bitsandbytes' CPU backend uses a 65536-bin lookup table instead, which can pick a different neighbour for
// values near a midpoint; we follow CUDA.)
SWIFTLORA_HOST_DEVICE uint32_t encode_dynamic(const float* code, float xn) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (xn > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (xn > val) {
    const float midpoint = mul_ftz(add_ftz(upper, val), 0.5f);
    return static_cast<uint32_t>(xn > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = mul_ftz(add_ftz(lower, val), 0.5f);
  return static_cast<uint32_t>(xn < midpoint ? lower_pivot : pivot);
}

// Whether b is an allowed NF4 blocksize: a power of two in [32, 4096].
SWIFTLORA_HOST_DEVICE bool valid_blocksize(int64_t b) {
  return b >= kMinBlocksize && b <= kMaxBlocksize && (b & (b - 1)) == 0;
}

SWIFTLORA_HOST_DEVICE int log2_exact(int64_t b) {  // b a power of two
  int l = 0;
  while ((int64_t{1} << l) < b) ++l;
  return l;
}

}  // namespace swiftlora::nf4
