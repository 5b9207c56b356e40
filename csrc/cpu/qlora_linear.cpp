// qlora_linear (and qlora_gemm) on the CPU: the shared host code (csrc/common/qlora_host.h) with NF4 weights
// dequantized row by row into a scratch buffer, then ATen's matmuls. Also the argument checks both backends share.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/nf4.h"
#include "common/qlora_host.h"

namespace swiftlora::qlora {
namespace {

std::optional<at::Tensor> at_or_none(const OptionalTensorList& list, size_t i) {
  return i < list.size() ? list.get(i) : std::nullopt;
}

std::string arg(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// Checks projection i's base weight W_i [n, k] and returns it.
BaseWeight make_base(const char* op, size_t i, const at::Tensor& x_like, const at::Tensor& weight,
                     const std::optional<at::Tensor>& absmax, const std::optional<at::Tensor>& absmax2,
                     const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                     int64_t blocksize, int64_t n, int64_t k, at::ScalarType compute) {
  BaseWeight b;
  b.n = n;
  b.k = k;
  check_same_device(x_like, weight, op, "x", arg("weight", i).c_str());
  if (absmax.has_value()) {  // NF4: the same checks (and messages) as nf4_dequantize, for n·k elements
    const std::string where = std::string(op) + " (projection " + std::to_string(i) + ")";
    b.nf4 = check_nf4_weight(where.c_str(), weight, *absmax, absmax2, code2, offset, blocksize, n * k);
    return b;
  }
  TORCH_CHECK_VALUE(!absmax2.has_value() && !code2.has_value() && !offset.has_value(), op, ": weight[", i,
                    "] has no absmax (a dense weight), so absmax2, code2 and offset must be None too");
  TORCH_CHECK_TYPE(weight.scalar_type() == compute, op, ": weight[", i, "] is dense (no absmax given), so it must "
                   "have the compute dtype ", compute, ", got ", weight.scalar_type(),
                   " (an NF4 weight is uint8 with its absmax)");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == n && weight.size(1) == k, op, ": weight[", i,
                    "] must have shape [", n, ", ", k, "] (lora_b[", i, "] rows, x's last dim), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.stride(1) == 1 || weight.size(1) == 1, op, ": weight[", i,
                    "] must have unit stride along its last dim, got strides ", weight.strides());
  b.dense = weight;
  return b;
}

void check_lists(const char* op, size_t p, at::TensorList weight, const OptionalTensorList& absmax,
                 const OptionalTensorList& absmax2, const OptionalTensorList& code2, const OptionalTensorList& offset,
                 at::IntArrayRef blocksize, at::TensorList lora_b, at::ArrayRef<double> scale,
                 const OptionalTensorList& dropout_mask) {
  TORCH_CHECK_VALUE(p >= 1, op, ": lora_a must hold at least one projection's A, got an empty list");
  const std::pair<const char*, size_t> sizes[] = {
      {"weight", weight.size()}, {"absmax", absmax.size()}, {"absmax2", absmax2.size()},
      {"code2", code2.size()},   {"offset", offset.size()}, {"blocksize", blocksize.size()},
      {"lora_b", lora_b.size()}, {"scale", scale.size()}};
  for (const auto& [name, size] : sizes)
    TORCH_CHECK_VALUE(size == p, op, ": ", name, " must hold one entry per projection (", p,
                      ", the length of lora_a), got ", size);
  TORCH_CHECK_VALUE(dropout_mask.size() == 0 || dropout_mask.size() == p, op,
                    ": dropout_mask must be empty or hold one entry (a mask or None) per projection (", p, "), got ",
                    dropout_mask.size());
}

}  // namespace

Projections make_projections(const char* op, const at::Tensor& x_like, bool is_grad, at::TensorList weight,
                             const OptionalTensorList& absmax, const OptionalTensorList& absmax2,
                             const OptionalTensorList& code2, const OptionalTensorList& offset,
                             at::IntArrayRef blocksize, at::TensorList lora_a, at::TensorList lora_b,
                             at::ArrayRef<double> scale, const OptionalTensorList& dropout_mask,
                             double dropout_scale) {
  const char* xname = is_grad ? "grad_y" : "x";
  const size_t np = lora_a.size();
  check_lists(op, np, weight, absmax, absmax2, code2, offset, blocksize, lora_b, scale, dropout_mask);
  check_float_dtype(x_like, op, xname);
  TORCH_CHECK_VALUE(x_like.dim() >= 1, op, ": ", xname, " must have at least one dim, got a scalar");
  check_not_empty(x_like, op, xname);
  const auto compute = x_like.scalar_type();
  Projections p;
  p.k = lora_a[0].dim() == 2 ? lora_a[0].size(1) : -1;
  TORCH_CHECK_VALUE(is_grad || x_like.size(-1) == p.k, op, ": lora_a[0] must be [r, ", x_like.size(-1),
                    "] (x's last dim), got ", lora_a[0].sizes());
  TORCH_CHECK_VALUE(std::isfinite(dropout_scale) && dropout_scale > 0, op,
                    ": dropout_scale must be finite and > 0 (1 / (1 - p)), got ", dropout_scale);
  p.dropout_scale = dropout_scale;
  for (size_t i = 0; i < np; ++i) {
    const at::Tensor& a = lora_a[i];
    const at::Tensor& b = lora_b[i];
    check_float_dtype(a, op, arg("lora_a", i).c_str());
    check_float_dtype(b, op, arg("lora_b", i).c_str());
    check_same_device(x_like, a, op, xname, arg("lora_a", i).c_str());
    check_same_device(x_like, b, op, xname, arg("lora_b", i).c_str());
    TORCH_CHECK_VALUE(a.dim() == 2 && a.size(1) == p.k && a.size(0) >= 1, op, ": lora_a[", i, "] must be [r, ", p.k,
                      "] with r >= 1, got ", a.sizes());
    TORCH_CHECK_VALUE(b.dim() == 2 && b.size(1) == a.size(0) && b.size(0) >= 1, op, ": lora_b[", i, "] must be [N, ",
                      a.size(0), "] (lora_a[", i, "]'s rank), got ", b.sizes());
    TORCH_CHECK_VALUE(std::isfinite(scale[i]), op, ": scale[", i, "] must be finite, got ", scale[i]);
    p.base.push_back(make_base(op, i, x_like, weight[i], absmax.get(i), absmax2.get(i), code2.get(i), offset.get(i),
                               blocksize[i], b.size(0), p.k, compute));
    p.lora_a.push_back(a.to(compute));
    // one rounding of s·B: a B of the compute dtype is multiplied in float (16-bit: opmath) and rounded once, by
    // one kernel; other dtypes go through float32. Contiguous rows, as the fused kernel reads them.
    const at::Tensor sb = b.scalar_type() == compute ? b.mul(scale[i]) : b.to(at::kFloat).mul(scale[i]).to(compute);
    p.lora_b.push_back(sb.contiguous());
    p.n_off.push_back(p.n);
    p.r_off.push_back(p.r);
    p.n += b.size(0);
    p.r += a.size(0);
  }
  TORCH_CHECK_VALUE(!is_grad || x_like.size(-1) == p.n, op, ": grad_y must be [..., ", p.n,
                    "] (the projections' total output width), got ", x_like.sizes());
  for (size_t i = 0; i < np; ++i) {
    const std::optional<at::Tensor> mask = at_or_none(dropout_mask, i);
    if (!mask.has_value()) {
      p.mask.emplace_back();
      continue;
    }
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, op, ": dropout_mask[", i, "] must be bool (True = kept), got ",
                     mask->scalar_type());
    check_same_device(x_like, *mask, op, xname, arg("dropout_mask", i).c_str());
    const bool shape_ok = mask->dim() == x_like.dim() && mask->size(-1) == p.k &&
                          mask->numel() / p.k == x_like.numel() / x_like.size(-1);
    TORCH_CHECK_VALUE(shape_ok, op, ": dropout_mask[", i, "] must have x's shape [..., ", p.k, "] with ",
                      x_like.numel() / x_like.size(-1), " rows, got ", mask->sizes());
    p.mask.push_back(mask->reshape({-1, p.k}));
    p.any_mask = true;
  }
  return p;
}

at::Tensor concat_bias(const char* op, const Projections& p, const OptionalTensorList& bias, const at::Tensor& x) {
  TORCH_CHECK_VALUE(bias.size() == 0 || bias.size() == p.base.size(), op,
                    ": bias must be empty or hold one entry (a tensor or None) per projection (", p.base.size(),
                    "), got ", bias.size());
  bool any = false;
  for (size_t i = 0; i < bias.size(); ++i) {
    const std::optional<at::Tensor> b = bias.get(i);
    if (!b.has_value()) continue;
    check_float_dtype(*b, op, arg("bias", i).c_str());
    check_same_device(x, *b, op, "x", arg("bias", i).c_str());
    TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == p.base[i].n, op, ": bias[", i, "] must be [", p.base[i].n,
                      "], got ", b->sizes());
    any = true;
  }
  if (!any) return {};
  if (bias.size() == 1) return bias.get(0)->to(x.scalar_type());
  at::Tensor cat = at::zeros({p.n}, x.options());
  for (size_t i = 0; i < bias.size(); ++i) {
    const std::optional<at::Tensor> b = bias.get(i);
    if (b.has_value()) cat.narrow(0, p.n_off[i], p.base[i].n).copy_(*b);
  }
  return cat;
}

GemmArgs make_gemm_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                        const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                        const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                        const std::optional<at::Tensor>& xa, const std::optional<at::Tensor>& lora_b,
                        const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "qlora_gemm";
  check_float_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dim [..., K], got a scalar");
  check_not_empty(x, op, "x");
  TORCH_CHECK_VALUE(out_features > 0, op, ": out_features must be positive, got ", out_features);
  check_same_device(x, packed, op, "x", "packed");
  GemmArgs a;
  a.k = x.size(-1);
  a.n = out_features;
  a.x = as_rows(x);
  a.m = a.x.size(0);
  a.w.n = a.n;
  a.w.k = a.k;
  a.w.nf4 = check_nf4_weight(op, packed, absmax, absmax2, code2, offset, blocksize, a.n * a.k);
  TORCH_CHECK_VALUE(xa.has_value() == lora_b.has_value(), op, ": xa and lora_b go together (the LoRA term), got only ",
                    xa.has_value() ? "xa" : "lora_b");
  if (xa.has_value()) {
    for (const auto& [t, name] : {std::pair{*xa, "xa"}, std::pair{*lora_b, "lora_b"}}) {
      check_same_dtype(x, t, op, "x", name);
      check_same_device(x, t, op, "x", name);
    }
    a.r = lora_b->dim() == 2 ? lora_b->size(1) : -1;
    TORCH_CHECK_VALUE(lora_b->dim() == 2 && lora_b->size(0) == a.n && a.r >= 1, op, ": lora_b must be [",
                      a.n, ", R] (out_features rows), got ", lora_b->sizes());
    TORCH_CHECK_VALUE(xa->dim() >= 1 && xa->size(-1) == a.r && xa->numel() / a.r == a.m, op, ": xa must be [..., ",
                      a.r, "] with x's ", a.m, " rows, got ", xa->sizes());
    a.xa = as_rows(*xa);
    a.lora_b = lora_b->stride(1) == 1 ? *lora_b : lora_b->contiguous();
  }
  if (bias.has_value()) {
    check_float_dtype(*bias, op, "bias");
    check_same_device(x, *bias, op, "x", "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == a.n, op, ": bias must be [", a.n, "], got ", bias->sizes());
    a.bias = bias->to(x.scalar_type()).contiguous();
  }
  return a;
}

namespace {

// out[r, c] = NF4 element (row0 + r)·k + col0 + c of the flattened weight (out: any row stride), rows in parallel.
template <typename T>
void dequantize_rect(const BaseWeight& b, int64_t row0, int64_t col0, at::Tensor& out) {
  const at::Tensor scales = nf4_block_scales_cpu(b.nf4);  // fp32 per block, decoded once
  const float* scale = scales.const_data_ptr<float>();
  const uint8_t* packed = b.nf4.packed.const_data_ptr<uint8_t>();
  const int shift = nf4::log2_exact(b.nf4.blocksize);
  const int64_t k = b.k, ld = out.stride(0), cols = out.size(1);
  T* dst = out.mutable_data_ptr<T>();
  at::parallel_for(0, out.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t i = (row0 + r) * k + col0 + c;
        const float v = nf4::dequant_value(nf4::code_value(nf4::code_at(packed, i)), scale[i >> shift]);
        dst[r * ld + c] = static_cast<T>(v);
      }
    }
  });
}

struct CpuBackend {
  static void dequantize(const BaseWeight& b, int64_t row0, int64_t col0, at::Tensor out) {
    SWIFTLORA_DISPATCH_FLOAT(out.scalar_type(), "qlora_dequantize_rows",
                             [&] { dequantize_rect<scalar_t>(b, row0, col0, out); });
  }
  // No second stream: chunks (only when asked for explicitly) run one after the other.
  static constexpr bool kOverlaps = false;
  struct Overlap {
    explicit Overlap(const at::Tensor&) {}
    template <typename F>
    void produce(int, F&& fill) {
      fill();
    }
    void consume(int) {}
    void consumed(int) {}
  };
  // No fused kernel on the CPU: the plans dequantize, then multiply.
  static bool fused_forward(const at::Tensor&, const at::Tensor&, const Projections&, const at::Tensor&, at::Tensor&) {
    return false;
  }
  static at::Tensor qlora_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                               const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                               const std::optional<at::Tensor>& xa, const std::optional<at::Tensor>& lora_b,
                               const std::optional<at::Tensor>& bias) {
    const GemmArgs a = make_gemm_args(x, packed, absmax, absmax2, code2, offset, blocksize, out_features, xa, lora_b,
                                      bias);
    return gemm_output_shape(x, gemm_unfused<CpuBackend>(a));
  }
};

}  // namespace
}  // namespace swiftlora::qlora

TORCH_LIBRARY_IMPL(swiftlora, CPU, m) { swiftlora::qlora::register_ops<swiftlora::qlora::CpuBackend>(m); }
