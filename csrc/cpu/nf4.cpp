// NF4 quantize / dequantize on the CPU, bit-identical to bitsandbytes' CUDA kernels (the rules live in
// csrc/common/nf4.h), blocks in parallel. Also the argument checks both backends share (check_nf4_weight is what
// the qlora ops use too).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mean.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/nf4.h"
#include "ops.h"

namespace swiftlora {

namespace {

void check_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK_VALUE(nf4::valid_blocksize(blocksize), op,
                    ": blocksize must be a power of two in [32, 4096] (bitsandbytes' NF4 blocksizes), got ",
                    blocksize);
}

void check_code2(const char* op, const at::Tensor& code2, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_TYPE(code2.scalar_type() == at::kFloat, op, ": code2 (the 8-bit dynamic map) must be float32, got ",
                   code2.scalar_type());
  TORCH_CHECK_VALUE(code2.dim() == 1 && code2.size(0) == nf4::kCode2Size, op,
                    ": code2 (the 8-bit dynamic map) must have shape [256], got ", code2.sizes());
  check_same_device(like, code2, op, like_name, "code2");
}

}  // namespace

void check_nf4_quantize_args(const at::Tensor& x, int64_t blocksize, const std::optional<at::Tensor>& code2) {
  constexpr const char* op = "nf4_quantize";
  check_float_dtype(x, op, "x");
  check_not_empty(x, op, "x");
  check_blocksize(op, blocksize);
  if (code2.has_value()) check_code2(op, *code2, x, "x");
}

Nf4Weight check_nf4_weight(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                           const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t n) {
  check_blocksize(op, blocksize);
  TORCH_CHECK_VALUE(n > 0, op, ": the quantized tensor must have at least one element, got ", n);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8 (view other quant_storage "
                   "dtypes as uint8), got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.numel() == (n + 1) / 2, op, ": packed must hold (n + 1) / 2 = ", (n + 1) / 2,
                    " bytes for n = ", n, " elements, got ", packed.numel(), " (shape ", packed.sizes(), ")");
  Nf4Weight w;
  w.n = n;
  w.blocksize = blocksize;
  w.nblocks = (n + blocksize - 1) / blocksize;
  check_same_device(packed, absmax, op, "packed", "absmax");
  TORCH_CHECK_VALUE(absmax.dim() == 1 && absmax.size(0) == w.nblocks, op, ": absmax must have shape [",
                    w.nblocks, "] (ceil(n / blocksize) for n = ", n, ", blocksize = ", blocksize, "), got ",
                    absmax.sizes());
  w.nested = absmax.scalar_type() == at::kByte;
  const bool any_nested = absmax2.has_value() || code2.has_value() || offset.has_value();
  if (!w.nested) {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32 (or uint8 when double-"
                     "quantized), got ", absmax.scalar_type());
    TORCH_CHECK_VALUE(!any_nested, op, ": absmax2, code2 and offset are for a double-quantized absmax (uint8); "
                      "absmax is float32, so pass None for all three");
  } else {
    TORCH_CHECK_VALUE(absmax2.has_value() && code2.has_value() && offset.has_value(), op,
                      ": absmax is uint8 (double-quantized), so absmax2, code2 and offset are all required");
    const int64_t n2 = (w.nblocks + nf4::kNestedBlocksize - 1) / nf4::kNestedBlocksize;
    TORCH_CHECK_TYPE(absmax2->scalar_type() == at::kFloat, op, ": absmax2 must be float32, got ",
                     absmax2->scalar_type());
    TORCH_CHECK_VALUE(absmax2->dim() == 1 && absmax2->size(0) == n2, op, ": absmax2 must have shape [", n2,
                      "] (ceil(nblocks / 256)), got ", absmax2->sizes());
    check_same_device(packed, *absmax2, op, "packed", "absmax2");
    check_code2(op, *code2, packed, "packed");
    TORCH_CHECK_TYPE(offset->scalar_type() == at::kFloat, op, ": offset must be float32, got ",
                     offset->scalar_type());
    TORCH_CHECK_VALUE(offset->numel() == 1, op, ": offset must hold one value, got shape ", offset->sizes());
    check_same_device(packed, *offset, op, "packed", "offset");
    w.absmax2 = absmax2->contiguous();
    w.code2 = code2->contiguous();
    w.offset = offset->contiguous();
  }
  w.packed = packed.contiguous();
  w.absmax = absmax.contiguous();
  return w;
}

Nf4Weight check_nf4_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax,
                                    const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                                    const std::optional<at::Tensor>& offset, int64_t blocksize, at::IntArrayRef shape,
                                    at::ScalarType dtype) {
  constexpr const char* op = "nf4_dequantize";
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": dtype must be float32, float16 or bfloat16, got ", dtype);
  int64_t n = 1;
  for (const int64_t d : shape) {
    TORCH_CHECK_VALUE(d >= 0, op, ": shape must not have negative sizes, got ", shape);
    n *= d;
  }
  return check_nf4_weight(op, packed, absmax, absmax2, code2, offset, blocksize, n);
}

namespace {

constexpr int64_t kGrainElements = 1 << 16;

// Per NF4 block: absmax by bitsandbytes' rule, then two codes per byte. Every block starts on an even element
// (blocksize >= 32), so a byte never mixes blocks; the odd element past the end of an odd-length tensor is a zero
// quantized with the last block's scale, as bitsandbytes' zero-padded load does.
template <typename T>
void quantize_blocks(const T* x, int64_t n, int64_t bs, uint8_t* packed, float* absmax) {
  const int64_t nblocks = (n + bs - 1) / bs;
  at::parallel_for(0, nblocks, std::max<int64_t>(1, kGrainElements / bs), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * bs, end = std::min(n, start + bs);
      float m = nf4::absmax_init(end - start < bs);
      for (int64_t i = start; i < end; ++i) m = nf4::absmax_step(m, static_cast<float>(x[i]));
      absmax[b] = m;
      const float recip = nf4::reciprocal(m);
      for (int64_t i = start; i < end; i += 2) {
        const uint32_t hi = nf4::encode(static_cast<float>(x[i]), recip);
        const uint32_t lo = nf4::encode(i + 1 < end ? static_cast<float>(x[i + 1]) : 0.0f, recip);
        packed[i / 2] = nf4::pack(hi, lo);
      }
    }
  });
}

// Double quantization of the fp32 absmax (bitsandbytes: quantize_blockwise(absmax - offset, blocksize=256)): per
// 256 scales, absmax2 = max |absmax - offset| (same reduction rule), then the 8-bit dynamic code of each.
void quantize_absmax(const float* absmax, int64_t nblocks, float offset, const float* code2, uint8_t* q,
                     float* absmax2) {
  constexpr int64_t bs = nf4::kNestedBlocksize;
  const int64_t n2 = (nblocks + bs - 1) / bs;
  at::parallel_for(0, n2, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * bs, end = std::min(nblocks, start + bs);
      float m = nf4::absmax_init(end - start < bs);
      // absmax - offset is torch's IEEE subtraction in bitsandbytes (a - b == a + (-b) exactly).
      for (int64_t i = start; i < end; ++i) m = nf4::absmax_step(m, nf4::add_rn(absmax[i], -offset));
      absmax2[b] = m;
      const float recip = nf4::reciprocal(m);
      for (int64_t i = start; i < end; ++i) {
        const float xn = nf4::mul_ftz(nf4::add_rn(absmax[i], -offset), recip);
        q[i] = static_cast<uint8_t>(nf4::encode_dynamic(code2, xn));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& x_in,
                                                                            int64_t blocksize,
                                                                            const std::optional<at::Tensor>& code2) {
  check_nf4_quantize_args(x_in, blocksize, code2);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel(), nblocks = (n + blocksize - 1) / blocksize;
  auto packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  auto absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  SWIFTLORA_DISPATCH_FLOAT(x.scalar_type(), "nf4_quantize_cpu", [&] {
    quantize_blocks<scalar_t>(x.const_data_ptr<scalar_t>(), n, blocksize, packed.mutable_data_ptr<uint8_t>(),
                              absmax.mutable_data_ptr<float>());
  });
  if (!code2.has_value()) {
    return {packed, absmax, at::empty({0}, absmax.options()), at::empty({0}, absmax.options())};
  }
  // The offset is torch's own mean of the fp32 absmax, as bitsandbytes computes it (same reduction, same bits).
  at::Tensor offset = at::mean(absmax);
  const at::Tensor c2 = code2->contiguous();
  auto qabsmax = at::empty({nblocks}, absmax.options().dtype(at::kByte));
  auto absmax2 = at::empty({(nblocks + nf4::kNestedBlocksize - 1) / nf4::kNestedBlocksize}, absmax.options());
  quantize_absmax(absmax.const_data_ptr<float>(), nblocks, offset.item<float>(), c2.const_data_ptr<float>(),
                  qabsmax.mutable_data_ptr<uint8_t>(), absmax2.mutable_data_ptr<float>());
  return {packed, qabsmax, absmax2, offset};
}

}  // namespace

at::Tensor nf4_block_scales_cpu(const Nf4Weight& w) {
  if (!w.nested) return w.absmax;
  auto scales = at::empty({w.nblocks}, w.absmax.options().dtype(at::kFloat));
  const uint8_t* q = w.absmax.const_data_ptr<uint8_t>();
  const float* code2 = w.code2.const_data_ptr<float>();
  const float* absmax2 = w.absmax2.const_data_ptr<float>();
  const float offset = w.offset.item<float>();
  float* s = scales.mutable_data_ptr<float>();
  at::parallel_for(0, w.nblocks, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) s[b] = nf4::nested_absmax(q[b], code2, absmax2, b, offset);
  });
  return scales;
}

namespace {

template <typename T>
void dequantize_blocks(const uint8_t* packed, const float* scales, int64_t n, int64_t bs, T* out) {
  const int64_t nblocks = (n + bs - 1) / bs;
  at::parallel_for(0, nblocks, std::max<int64_t>(1, kGrainElements / bs), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float s = scales[b];
      const int64_t end = std::min(n, (b + 1) * bs);
      for (int64_t i = b * bs; i < end; ++i) {
        out[i] = static_cast<T>(nf4::dequant_value(nf4::code_value(nf4::code_at(packed, i)), s));
      }
    }
  });
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                              const std::optional<at::Tensor>& offset, int64_t blocksize, at::IntArrayRef shape,
                              at::ScalarType dtype) {
  const Nf4Weight w = check_nf4_dequantize_args(packed, absmax, absmax2, code2, offset, blocksize, shape, dtype);
  auto out = at::empty(shape, packed.options().dtype(dtype));
  const at::Tensor scales = nf4_block_scales_cpu(w);
  SWIFTLORA_DISPATCH_FLOAT(dtype, "nf4_dequantize_cpu", [&] {
    dequantize_blocks<scalar_t>(w.packed.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(), w.n, blocksize,
                                out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace swiftlora

TORCH_LIBRARY_IMPL(swiftlora, CPU, m) {
  m.impl("nf4_quantize", &swiftlora::nf4_quantize_cpu);
  m.impl("nf4_dequantize", &swiftlora::nf4_dequantize_cpu);
}
