// GGUF block quantization on the CPU: rows of x (float32/float16/bfloat16) -> the GGUF bytes of one ggml type,
// byte-identical to llama.cpp's reference quantizer (csrc/common/gguf_quant_math.h, gguf_kquant_math.h).
// Blocks are independent: at::parallel_for over all blocks of all rows, each converted to float32 in a small
// stack buffer. Also the argument checks both backends share.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/gguf_kquant_math.h"
#include "ops.h"

namespace swiftlora {

void check_gguf_quantize_args(const at::Tensor& x, int64_t qtype) {
  constexpr const char* op = "gguf_quantize";
  TORCH_CHECK_VALUE(qtype >= 0 && qtype < 64 && gguf::block_bytes(static_cast<int>(qtype)) > 0, op,
                    ": qtype must be a ggml type id among Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8, Q2_K=10, Q3_K=11, "
                    "Q4_K=12, Q5_K=13, Q6_K=14, got ", qtype);
  check_float_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dim [..., n], got a scalar");
  const int64_t block = gguf::block_elems(static_cast<int>(qtype));
  TORCH_CHECK_VALUE(x.size(-1) > 0 && x.size(-1) % block == 0, op, ": x's last dim must be a positive multiple of ",
                    block, " for ggml type ", qtype, ", got shape ", x.sizes());
}

at::Tensor gguf_quantize_output(const at::Tensor& x, int64_t qtype) {
  const int t = static_cast<int>(qtype);
  auto sizes = x.sizes().vec();
  sizes.back() = x.size(-1) / gguf::block_elems(t) * gguf::block_bytes(t);
  return at::empty(sizes, x.options().dtype(at::kByte));
}

namespace gguf {
namespace {

// Q4_K (NMAX 15) / Q5_K (NMAX 31) super-block.
template <int NMAX>
void quantize_q45k(const float* x, uint8_t* y) {
  uint8_t L[kQKK], ls[8], lm[8];
  float scales[8], mins[8];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    scales[j] = q45k_fit<NMAX>(x + 32 * j, L + 32 * j, &mins[j]);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  for (int j = 0; j < 8; ++j) q45k_codes(max_scale, max_min, scales[j], mins[j], &ls[j], &lm[j]);
  store_fp16(y, max_scale / 63.f);
  store_fp16(y + 2, max_min / 63.f);
  const float d = load_fp16(y), dmin = load_fp16(y + 2);
  for (int j = 0; j < 8; ++j) requant_min<32>(x + 32 * j, L + 32 * j, NMAX, d, ls[j], dmin, lm[j]);
  for (int k = 0; k < 12; ++k) y[4 + k] = q45k_scales_byte(ls, lm, k);
  uint8_t* qs = y + 16;
  if (NMAX == 31) {
    for (int l = 0; l < 32; ++l) y[16 + l] = q5k_qh_byte(L, l);
    qs = y + 48;
  }
  for (int b = 0; b < 128; ++b) qs[b] = q45k_qs_byte(L, b);
}

void quantize_q6k(const float* x, uint8_t* y) {
  int8_t L[kQKK], codes[16];
  float scales[16], max_abs;
  for (int j = 0; j < 16; ++j) scales[j] = fit_scale_symmetric<16>(32, x + 16 * j, L + 16 * j);
  const float max_scale = first_absmax<16>(scales, &max_abs);
  if (max_abs < kGroupMaxEps) {  // all zero: the reference writes a zeroed block
    std::memset(y, 0, 210);
    return;
  }
  const float iscale = -128.f / max_scale;
  store_fp16(y + 208, 1 / iscale);
  const float d = load_fp16(y + 208);
  for (int j = 0; j < 16; ++j) {
    codes[j] = q6k_code(iscale, scales[j]);
    requant_sym<16>(x + 16 * j, L + 16 * j, 32, d, codes[j]);
    y[192 + j] = static_cast<uint8_t>(codes[j]);
  }
  for (int b = 0; b < 128; ++b) y[b] = q6k_ql_byte(L, b);
  for (int b = 0; b < 64; ++b) y[128 + b] = q6k_qh_byte(L, b);
}

void quantize_q3k(const float* x, uint8_t* y) {
  int8_t L[kQKK];
  int codes[16] = {0};
  float scales[16], amax;
  for (int j = 0; j < 16; ++j) scales[j] = fit_scale_q3<16>(4, x + 16 * j, L + 16 * j);
  const float max_scale = first_absmax<16>(scales, &amax);
  store_fp16(y + 108, max_scale ? 1 / (-32.f / max_scale) : 0.f);
  if (max_scale) {
    for (int j = 0; j < 16; ++j) codes[j] = q3k_code(max_scale, scales[j]);
  }
  const float d = load_fp16(y + 108);
  for (int j = 0; j < 16; ++j) requant_sym<16>(x + 16 * j, L + 16 * j, 4, d, codes[j] - 32);
  for (int m = 0; m < 32; ++m) y[m] = q3k_hmask_byte(L, m);
  for (int b = 0; b < 64; ++b) y[32 + b] = q23k_qs_byte(L, b);
  for (int k = 0; k < 12; ++k) y[96 + k] = q3k_scales_byte(codes, k);
}

void quantize_q2k(const float* x, uint8_t* y) {
  uint8_t L[kQKK];
  float scales[16], mins[16];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 16; ++j) {
    scales[j] = q2k_fit(x + 16 * j, L + 16 * j, &mins[j]);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  for (int j = 0; j < 16; ++j) y[j] = q2k_code(max_scale, max_min, scales[j], mins[j]);
  store_fp16(y + 80, max_scale > 0 ? max_scale / 15.f : 0.f);
  store_fp16(y + 82, max_min > 0 ? max_min / 15.f : 0.f);
  const float d = load_fp16(y + 80), dmin = load_fp16(y + 82);
  for (int j = 0; j < 16; ++j) requant_min<16>(x + 16 * j, L + 16 * j, 3, d, y[j] & 0xf, dmin, y[j] >> 4);
  for (int b = 0; b < 64; ++b) y[16 + b] = q23k_qs_byte(L, b);
}

void quantize_block(int qtype, const float* x, uint8_t* y) {
  switch (qtype) {
    case kQ2_K: quantize_q2k(x, y); break;
    case kQ3_K: quantize_q3k(x, y); break;
    case kQ4_K: quantize_q45k<15>(x, y); break;
    case kQ5_K: quantize_q45k<31>(x, y); break;
    case kQ6_K: quantize_q6k(x, y); break;
    default: quantize_block_legacy(qtype, x, y); break;
  }
}

template <typename T>
void quantize_rows(const at::Tensor& x2, at::Tensor& out2, int qtype) {
  const int be = block_elems(qtype), bb = block_bytes(qtype);
  const int64_t rows = x2.size(0), n = x2.size(1), xs = x2.stride(0), per_row = n / be;
  const T* xp = x2.const_data_ptr<T>();
  uint8_t* yp = out2.mutable_data_ptr<uint8_t>();
  const int64_t grain = qtype >= kQ2_K ? 16 : 256;  // blocks per task: K-quants cost ~30x more per element
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, rows * per_row, grain, [&](int64_t begin, int64_t end) {
    float buf[kQKK];
    bool finite = true;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r = b / per_row, c = b % per_row;
      const T* src = xp + r * xs + c * be;
      for (int i = 0; i < be; ++i) {
        buf[i] = static_cast<float>(src[i]);
        finite &= std::isfinite(buf[i]);
      }
      quantize_block(qtype, buf, yp + b * bb);
    }
    if (!finite) nonfinite.store(true, std::memory_order_relaxed);
  });
  // Checked here, where it costs nothing (the CUDA kernel does not check; the Python entry does it there).
  TORCH_CHECK_VALUE(!nonfinite.load(), "gguf_quantize: x has NaN or infinite values; GGUF blocks need finite weights");
}

}  // namespace
}  // namespace gguf

namespace {

at::Tensor gguf_quantize_cpu(const at::Tensor& x, int64_t qtype) {
  check_gguf_quantize_args(x, qtype);
  const at::Tensor x2 = as_rows(x);
  at::Tensor out = gguf_quantize_output(x, qtype);
  at::Tensor out2 = out.view({x2.size(0), -1});
  SWIFTLORA_DISPATCH_FLOAT(x.scalar_type(), "gguf_quantize_cpu",
                           [&] { gguf::quantize_rows<scalar_t>(x2, out2, static_cast<int>(qtype)); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(swiftlora, CPU, m) { m.impl("gguf_quantize", &gguf_quantize_cpu); }

}  // namespace swiftlora
