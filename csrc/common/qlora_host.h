// The host side of qlora_linear that the CPU and CUDA backends share: P projections of one input x [M, K]
//   y_p = x @ W_pᵀ (+ bias_p) + s_p · (dropout_p(x) @ A_pᵀ) @ B_pᵀ,      y = [y_1 | ... | y_P]   [M, N = Σ N_p]
// with each base weight W_p [N_p, K] frozen, NF4 (bitsandbytes layout) or dense 16/32-bit, as GEMMs through ATen
// (cuBLAS on CUDA) around a backend's `dequantize(base, out)` that writes W_p into a [N_p, K] row view.
//
// Decode-sized inputs (<= 16 rows, 16-bit, NF4 bases) take nf4_gemv for the base term, then add the LoRA term.
// The automatic plan's forward over NF4 bases takes the backend's fused kernel where it applies (CUDA on sm_90a:
// qlora_gemm, the dequantization inside the wgmma GEMM and the LoRA term as one more k-tile, one launch per
// projection writing its columns of y). Otherwise two plans, chosen by which extra pass over memory is smaller
// (bench/NOTES.md, "QLoRA ops"):
//   panel      (all bases NF4 and K < N): one GEMM with the LoRA rank folded into the reduction,
//                y = [x | xa | 0] @ [W | s·B | 0]ᵀ, x copied into an [M, K + R'] buffer (R' pads K + R to a multiple
//                of 8 for 16-byte rows; B's of different projections sit block-diagonally). Extra traffic: 2·M·K.
//   lora_first (otherwise): y = xa @ (s·B)ᵀ (+ bias) written first, then y += x @ Wᵀ per projection (beta = 1, the
//                GEMM epilogue reads y). Extra traffic: M·N written + read in a compute-bound epilogue. Dense bases
//                always take it (the panel would copy W).
// The backward mirrors it: grad_x = grad_y @ W + Σ_p mask_p·c·(grad_xa_p @ A_p), grad_xa = grad_y @ (s·B) (the
// gradient of xa, from which the caller forms grad_A = grad_xaᵀ @ dropout(x) and grad_B). With the panel, grad_xa
// falls out of the same GEMM as extra output columns; the LoRA term is an addmm into grad_x.
// When every base is NF4, W (or the panel) is dequantized and multiplied in chunks, the dequantization of chunk i+1
// overlapping the GEMM of chunk i (csrc/common/qlora_pipeline.h); `chunks` = 1 is one dequantization, one GEMM.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/qlora_pipeline.h"
#include "ops.h"

namespace swiftlora::qlora {

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

// One projection's frozen base weight W [n, k]: NF4 (Nf4Weight, checked by check_nf4_weight) or dense.
struct BaseWeight {
  at::Tensor dense;  // [n, k] in the compute dtype (16-bit LoRA); undefined for NF4
  Nf4Weight nf4;     // bitsandbytes' layout, n·k elements
  int64_t n = 0, k = 0;
  bool is_nf4() const { return !dense.defined(); }
};

// The P projections of one input, checked (make_projections), LoRA factors cast to the compute dtype.
struct Projections {
  std::vector<BaseWeight> base;
  std::vector<at::Tensor> lora_a;     // [r_p, K], compute dtype
  std::vector<at::Tensor> lora_b;     // [N_p, r_p], compute dtype, already multiplied by s_p
  std::vector<at::Tensor> mask;       // bool [M, K] per projection (undefined: no dropout on that projection)
  std::vector<int64_t> n_off, r_off;  // prefix sums of N_p and r_p
  int64_t k = 0, n = 0, r = 0;        // K, N = Σ N_p, R = Σ r_p
  double dropout_scale = 1.0;
  bool any_mask = false;
  int64_t align = 8;   // the panel's width K + R' is a multiple of this (8: 16-byte rows)
  int64_t chunks = 1;  // dequantize-and-GEMM chunks (qlora_pipeline.h), resolved by the op
  bool automatic = true;  // no chunk count asked for: the forward may take the backend's fused kernel
  int64_t panel_width() const { return (k + r + align - 1) / align * align; }
  bool all_nf4() const {
    for (const auto& b : base)
      if (!b.is_nf4()) return false;
    return true;
  }
  bool use_panel() const { return all_nf4() && k < n; }
  // Decode-sized inputs: nf4_gemv reads each packed weight once instead of dequantizing it (16-bit x only).
  bool use_gemv(int64_t rows, at::ScalarType dtype) const {
    return rows <= kGemvMaxRows && dtype != at::kFloat && all_nf4();
  }
  static constexpr int64_t kGemvMaxRows = 16;  // nf4_gemv's limit
};

// Checks every argument (both backends' messages come from here) and builds the projections. `x_like` is x (the
// forward) or grad_y (the backward, where x_dim_last = K comes from lora_a). Defined in csrc/cpu/qlora_linear.cpp.
Projections make_projections(const char* op, const at::Tensor& x_like, bool is_grad, at::TensorList weight,
                             const OptionalTensorList& absmax, const OptionalTensorList& absmax2,
                             const OptionalTensorList& code2, const OptionalTensorList& offset,
                             at::IntArrayRef blocksize, at::TensorList lora_a, at::TensorList lora_b,
                             at::ArrayRef<double> scale, const OptionalTensorList& dropout_mask,
                             double dropout_scale);

// Concatenated biases [N] in dtype (zeros for projections without one), or undefined when none has a bias.
at::Tensor concat_bias(const char* op, const Projections& p, const OptionalTensorList& bias, const at::Tensor& x);

// [A_1; ...; A_P] [R, K].
inline at::Tensor concat_lora_a(const Projections& p) {
  return p.lora_a.size() == 1 ? p.lora_a[0] : at::cat(p.lora_a, 0);
}

// s_p·B_p on the block diagonal of an [N, R] matrix.
inline at::Tensor block_diag_lora_b(const Projections& p, const at::TensorOptions& opt) {
  if (p.lora_b.size() == 1) return p.lora_b[0];
  at::Tensor bd = at::zeros({p.n, p.r}, opt);
  for (size_t i = 0; i < p.lora_b.size(); ++i)
    bd.narrow(0, p.n_off[i], p.base[i].n).narrow(1, p.r_off[i], p.lora_b[i].size(1)).copy_(p.lora_b[i]);
  return bd;
}

// W_p in the compute dtype: the dense weight itself, or NF4 dequantized into a scratch buffer.
template <typename Backend>
at::Tensor base_matrix(const BaseWeight& b, const at::TensorOptions& opt) {
  if (!b.is_nf4()) return b.dense;
  at::Tensor w = at::empty({b.n, b.k}, opt);
  Backend::dequantize(b, 0, 0, w);
  return w;
}

// x2 [M <= 16, K] @ W_iᵀ through torch.ops.swiftlora.nf4_gemv (the backend's own kernel): [M, N_i].
inline at::Tensor nf4_gemv(const at::Tensor& x2, const BaseWeight& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("swiftlora::nf4_gemv", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&, int64_t, int64_t)>();
  auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  return op.call(x2, b.nf4.packed, b.nf4.absmax, opt(b.nf4.absmax2), opt(b.nf4.code2), opt(b.nf4.offset),
                 b.nf4.blocksize, b.n);
}

// x with projection i's dropout applied (x itself when it has none).
inline at::Tensor dropped(const at::Tensor& x2, const Projections& p, size_t i) {
  return p.mask[i].defined() ? x2.mul(p.mask[i]).mul_(p.dropout_scale) : x2;
}

// xa = [dropout_1(x) @ A_1ᵀ | ...] [M, R].
inline at::Tensor lora_input_product(const at::Tensor& x2, const Projections& p) {
  if (!p.any_mask) return at::mm(x2, concat_lora_a(p).t());
  at::Tensor xa = at::empty({x2.size(0), p.r}, x2.options());
  for (size_t i = 0; i < p.lora_a.size(); ++i) {
    at::Tensor out = xa.narrow(1, p.r_off[i], p.lora_a[i].size(0));
    at::mm_out(out, dropped(x2, p, i), p.lora_a[i].t());
  }
  return xa;
}

// y [M, N] for NF4 bases, W dequantized chunk by chunk (qlora_pipeline.h). Panel plan: y = [x | xa | 0] · Pᵀ
// (+ bias), each chunk's GEMM writing its slice of y; lora_first: y = xa · (s·B)ᵀ (+ bias), then y += x · Wᵀ.
template <typename Backend>
at::Tensor nf4_forward(const at::Tensor& x2, const at::Tensor& xa, const Projections& p, const at::Tensor& bias) {
  const int64_t m = x2.size(0);
  if (!p.use_panel()) {
    const at::Tensor b = block_diag_lora_b(p, x2.options());
    at::Tensor y = bias.defined() ? at::addmm(bias, xa, b.t()) : at::mm(xa, b.t());
    panel_row_chunks<Backend>(p, p.k, p.chunks, x2, [&](int64_t n0, int64_t nc, const at::Tensor& w) {
      at::Tensor yc = y.narrow(1, n0, nc);
      yc.addmm_(x2, w.t());
    });
    return y;
  }
  const int64_t width = p.panel_width();
  at::Tensor xcat = at::empty({m, width}, x2.options());
  xcat.narrow(1, 0, p.k).copy_(x2);
  xcat.narrow(1, p.k, p.r).copy_(xa);
  if (width > p.k + p.r) xcat.narrow(1, p.k + p.r, width - p.k - p.r).zero_();
  at::Tensor y;
  panel_row_chunks<Backend>(p, width, p.chunks, x2, [&](int64_t n0, int64_t nc, const at::Tensor& w) {
    if (nc == p.n) {  // one chunk: a fresh output (cuBLASLt's bias epilogue applies)
      y = bias.defined() ? at::addmm(bias, xcat, w.t()) : at::mm(xcat, w.t());
      return;
    }
    if (!y.defined()) y = at::empty({m, p.n}, x2.options());
    at::Tensor yc = y.narrow(1, n0, nc);
    if (bias.defined()) {
      at::addmm_out(yc, bias.narrow(0, n0, nc), xcat, w.t());
    } else {
      at::mm_out(yc, xcat, w.t());
    }
  });
  return y;
}

// Forward: (y [..., N], xa [..., R]) for x [..., K].
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const Projections& p, const at::Tensor& bias) {
  const c10::DeviceGuard guard(x.device());
  const at::Tensor x2 = x.reshape({-1, p.k});
  const int64_t m = x2.size(0);
  const at::Tensor xa = lora_input_product(x2, p);
  at::Tensor y;
  if (p.use_gemv(m, x.scalar_type())) {
    y = p.base.size() == 1 ? nf4_gemv(x2, p.base[0]) : at::empty({m, p.n}, x.options());
    for (size_t i = 0; p.base.size() > 1 && i < p.base.size(); ++i)
      y.narrow(1, p.n_off[i], p.base[i].n).copy_(nf4_gemv(x2, p.base[i]));
    y.addmm_(xa, block_diag_lora_b(p, x.options()).t());
    if (bias.defined()) y.add_(bias);
  } else if (p.all_nf4()) {
    if (!(p.automatic && Backend::fused_forward(x2, xa, p, bias, y))) y = nf4_forward<Backend>(x2, xa, p, bias);
  } else {
    const at::Tensor b = block_diag_lora_b(p, x.options());
    y = bias.defined() ? at::addmm(bias, xa, b.t()) : at::mm(xa, b.t());
    for (size_t i = 0; i < p.base.size(); ++i) {
      at::Tensor yi = p.base.size() == 1 ? y : y.narrow(1, p.n_off[i], p.base[i].n);
      yi.addmm_(x2, base_matrix<Backend>(p.base[i], x.options()).t());
    }
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(p.n);
  at::Tensor y_out = y.view(shape);
  shape.back() = p.r;
  return {y_out, xa.view(shape)};
}

// Backward: (grad_x [..., K], grad_xa [..., R]) for grad_y [..., N].
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_y, const Projections& p) {
  const c10::DeviceGuard guard(grad_y.device());
  const at::Tensor dy = grad_y.reshape({-1, p.n});
  const auto opt = grad_y.options();
  at::Tensor dx_base, gxa;  // dx_base: grad_y @ W (panel plan), else accumulated last
  if (p.use_panel()) {
    const int64_t width = p.panel_width();
    at::Tensor dcat = at::empty({dy.size(0), width}, opt);
    panel_col_chunks<Backend>(p, width, p.chunks, dy, [&](int64_t c0, int64_t cc, const at::Tensor& w) {
      at::Tensor out = dcat.narrow(1, c0, cc);
      at::mm_out(out, dy, w);
    });
    dx_base = dcat.narrow(1, 0, p.k);
    gxa = dcat.narrow(1, p.k, p.r).contiguous();
  } else {
    gxa = at::mm(dy, block_diag_lora_b(p, opt));
  }
  at::Tensor dx;
  if (!p.any_mask) {
    const at::Tensor a = concat_lora_a(p);
    dx = dx_base.defined() ? at::addmm(dx_base, gxa, a) : at::mm(gxa, a);
  } else {
    dx = dx_base.defined() ? dx_base.contiguous() : at::zeros({dy.size(0), p.k}, opt);
    for (size_t i = 0; i < p.lora_a.size(); ++i) {
      at::Tensor li = at::mm(gxa.narrow(1, p.r_off[i], p.lora_a[i].size(0)), p.lora_a[i]);
      if (p.mask[i].defined()) {
        dx.add_(li.mul_(p.mask[i]), p.dropout_scale);
      } else {
        dx.add_(li);
      }
    }
  }
  if (!dx_base.defined() && p.all_nf4()) {  // lora_first over NF4: dx += grad_y · W, column chunks of W
    panel_col_chunks<Backend>(p, p.k, p.chunks, dy, [&](int64_t c0, int64_t cc, const at::Tensor& w) {
      at::Tensor out = dx.narrow(1, c0, cc);
      out.addmm_(dy, w);
    });
  } else if (!dx_base.defined()) {
    for (size_t i = 0; i < p.base.size(); ++i) {
      const at::Tensor dyi = p.base.size() == 1 ? dy : dy.narrow(1, p.n_off[i], p.base[i].n);
      dx.addmm_(dyi, base_matrix<Backend>(p.base[i], opt));
    }
  }
  std::vector<int64_t> shape(grad_y.sizes().begin(), grad_y.sizes().end() - 1);
  shape.push_back(p.k);
  at::Tensor dx_out = dx.view(shape);
  shape.back() = p.r;
  return {dx_out, gxa.view(shape)};
}

// qlora_gemm: one NF4 projection's forward GEMM, y = x · dequant(W)ᵀ + xa · lora_bᵀ (+ bias), lora_b already
// scaled (the fused kernel's op; csrc/cuda/qlora_gemm_sm90.cu). Rows of x/xa as [M, ·] views.
struct GemmArgs {
  at::Tensor x;                 // [M, K], unit column stride
  BaseWeight w;                 // NF4 [N, K]
  at::Tensor xa, lora_b, bias;  // [M, R], [N, R] (x's dtype), [N]; undefined when absent
  int64_t m = 0, n = 0, k = 0, r = 0;
};

// Checks qlora_gemm's arguments (defined in csrc/cpu/qlora_linear.cpp).
GemmArgs make_gemm_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                        const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                        const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                        const std::optional<at::Tensor>& xa, const std::optional<at::Tensor>& lora_b,
                        const std::optional<at::Tensor>& bias);

// The unfused path (dequantize, then GEMMs): the CPU implementation and the CUDA fallback.
template <typename Backend>
at::Tensor gemm_unfused(const GemmArgs& a) {
  const at::Tensor w = base_matrix<Backend>(a.w, a.x.options());
  at::Tensor y = a.bias.defined() ? at::addmm(a.bias, a.x, w.t()) : at::mm(a.x, w.t());
  if (a.r > 0) y.addmm_(a.xa, a.lora_b.t());
  return y;
}

// y [..., N] from the [M, N] result.
inline at::Tensor gemm_output_shape(const at::Tensor& x_in, const at::Tensor& y2) {
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end() - 1);
  shape.push_back(y2.size(1));
  return y2.view(shape);
}

// Checks the plan arguments and fills them into p (chunks resolved for `rows` rows of x).
template <typename Backend>
void set_plan(const char* op, Projections& p, int64_t rows, int64_t chunks, int64_t panel_align) {
  TORCH_CHECK_VALUE(panel_align >= 8 && panel_align <= 256 && panel_align % 8 == 0, op,
                    ": panel_align must be a multiple of 8 in [8, 256], got ", panel_align);
  p.align = panel_align;
  p.automatic = chunks <= 0;
  p.chunks = resolve_chunks(chunks, Backend::kOverlaps, rows, p.n, p.k);
}

// The ops of one backend. Backend:
//   `static void dequantize(const BaseWeight&, int64_t row0, int64_t col0, at::Tensor out)`: writes rows
//     [row0, row0 + out.size(0)) × columns [col0, col0 + out.size(1)) of the NF4 weight into out (compute dtype,
//     unit column stride, any row stride: e.g. a slice of a panel chunk);
//   `struct Overlap` (qlora_pipeline.h's run_pipeline) and `static constexpr bool kOverlaps` (whether it overlaps
//     at all, for the automatic chunk count);
//   `static at::Tensor qlora_gemm(...)` (the schema's arguments);
//   `static bool fused_forward(x2, xa, p, bias, y)`: the automatic plan's NF4 forward through a kernel that
//     dequantizes inside the GEMM, y [M, N] allocated and written; false (nothing done) where it does not apply.
template <typename Backend>
struct Ops {
  static std::tuple<at::Tensor, at::Tensor> qlora_linear(
      const at::Tensor& x, at::TensorList weight, const OptionalTensorList& absmax, const OptionalTensorList& absmax2,
      const OptionalTensorList& code2, const OptionalTensorList& offset, at::IntArrayRef blocksize,
      at::TensorList lora_a, at::TensorList lora_b, at::ArrayRef<double> scale, const OptionalTensorList& bias,
      const OptionalTensorList& dropout_mask, double dropout_scale, int64_t chunks, int64_t panel_align) {
    Projections p = make_projections("qlora_linear", x, false, weight, absmax, absmax2, code2, offset, blocksize,
                                     lora_a, lora_b, scale, dropout_mask, dropout_scale);
    set_plan<Backend>("qlora_linear", p, x.numel() / x.size(-1), chunks, panel_align);
    return forward<Backend>(x, p, concat_bias("qlora_linear", p, bias, x));
  }
  static std::tuple<at::Tensor, at::Tensor> qlora_linear_backward(
      const at::Tensor& grad_y, at::TensorList weight, const OptionalTensorList& absmax,
      const OptionalTensorList& absmax2, const OptionalTensorList& code2, const OptionalTensorList& offset,
      at::IntArrayRef blocksize, at::TensorList lora_a, at::TensorList lora_b, at::ArrayRef<double> scale,
      const OptionalTensorList& dropout_mask, double dropout_scale, int64_t chunks, int64_t panel_align) {
    Projections p = make_projections("qlora_linear_backward", grad_y, true, weight, absmax, absmax2, code2, offset,
                                     blocksize, lora_a, lora_b, scale, dropout_mask, dropout_scale);
    set_plan<Backend>("qlora_linear_backward", p, grad_y.numel() / grad_y.size(-1), chunks, panel_align);
    return backward<Backend>(grad_y, p);
  }
};

template <typename Backend>
void register_ops(torch::Library& m) {
  m.impl("qlora_linear", &Ops<Backend>::qlora_linear);
  m.impl("qlora_linear_backward", &Ops<Backend>::qlora_linear_backward);
  m.impl("qlora_gemm", &Backend::qlora_gemm);
}

}  // namespace swiftlora::qlora
