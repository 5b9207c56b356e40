// lm_head_blocks_: one token chunk's whole vocabulary loop of a frozen LM head (python/swiftlora/ops/
// lm_head_blocks.py, head_chunks), as host code shared by the CPU and CUDA backends (csrc/cuda/lm_head_blocks.cu
// registers the same function with the CUDA GEMM choice). Why in C++: per vocabulary block the loop issues three
// launches that each take ~0.06 ms of GPU time; from Python (~30 us of host time per op call) the host fell behind
// the GPU and the GPU idled (bench/NOTES.md, "The block loop in C++"). The calls are the Python loop's, on one
// stream, except that block j−1's rescale of G rides in block j's softmax launch instead of a scale_rows_ launch
// of its own (same multiply, same G state), so the sums are bit-identical to head_chunks_reference:
//   per block j: logits GEMM into buffer j % 2 (mm, or addmm with the bias slice); online_softmax_block_ on it,
//   which also scales G (and Gz) by block j−1's rescale (j ≥ 2); then block j−1's accumulation
//   G += P_{j−1} @ W_{j−1} in float32 (compat::addmm_fp32_; block 0's with beta = 0 overwrites G, so G needs no
//   reset); after the loop, the last block's rescale (scale_rows_, one per chunk) and accumulation. The statistics
//   are reset right after block 0's GEMM.
// Our kernels are called through the dispatcher (typed handles looked up once; ~1 us each), below autograd.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/InlineDeviceGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/aten_compat.h"
#include "common/checks.h"
#include "ops.h"

namespace swiftlora {

void check_lm_head_blocks_args(const at::Tensor& hc, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& labels, const at::Tensor& stats, const at::Tensor& g,
                               const std::optional<at::Tensor>& gz, int64_t cols) {
  constexpr const char* op = "lm_head_blocks_";
  check_float_dtype(hc, op, "hc");
  TORCH_CHECK_VALUE(hc.dim() == 2 && hc.size(0) > 0 && hc.size(1) > 0, op,
                    ": hc (the chunk's hidden rows) must be a non-empty 2-D [C, H], got shape ", hc.sizes());
  const int64_t c = hc.size(0), h = hc.size(1);
  check_same_dtype(hc, weight, op, "hc", "weight");
  check_same_device(hc, weight, op, "hc", "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == h && weight.size(0) > 0, op,
                    ": weight must be [V, ", h, "] (V >= 1, hc's dim 1), got shape ", weight.sizes());
  if (bias.has_value()) {
    check_same_dtype(hc, *bias, op, "hc", "bias");
    check_same_device(hc, *bias, op, "hc", "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [",
                      weight.size(0), "] (weight's dim 0), got shape ", bias->sizes());
  }
  if (labels.has_value()) {
    check_same_device(hc, *labels, op, "hc", "labels");
    TORCH_CHECK_TYPE(labels->scalar_type() == at::kLong || labels->scalar_type() == at::kInt, op,
                     ": labels must be int64 or int32, got ", labels->scalar_type());
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == c, op, ": labels must have shape [", c,
                      "] (one per row of hc), got ", labels->sizes());
  }
  check_same_device(hc, stats, op, "hc", "stats");
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat, op, ": stats must be float32, got ", stats.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == c && stats.size(1) == kOnlineStats && stats.is_contiguous(),
                    op, ": stats must be a contiguous float32 [", c, ", ", kOnlineStats, "], got shape ",
                    stats.sizes(), " strides ", stats.strides());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&g, "g"},
                                {gz.has_value() ? &*gz : nullptr, "gz"}}) {
    if (t == nullptr) continue;
    check_same_device(hc, *t, op, "hc", name);
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == c && t->size(1) == h && t->is_contiguous(), op, ": ", name,
                      " must be a contiguous float32 [", c, ", ", h, "] (rows of hc x hidden), got shape ",
                      t->sizes(), " strides ", t->strides());
    check_no_overlap(stats, *t, op, "stats", name);
  }
  if (gz.has_value()) check_no_overlap(g, *gz, op, "g", "gz");
  TORCH_CHECK_VALUE(cols >= 1, op, ": cols (vocabulary columns per block) must be >= 1, got ", cols);
}

namespace {

// The backend's kernels, through the dispatcher (the signatures the CPU and CUDA implementations register).
using SoftmaxBlockFn = at::Tensor(at::Tensor&, at::Tensor&, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, int64_t, int64_t, double, double,
                                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&);
using ScaleRowsFn = void(at::Tensor&, const at::Tensor&);

const c10::TypedOperatorHandle<SoftmaxBlockFn>& softmax_block_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("swiftlora::online_softmax_block_", "").typed<SoftmaxBlockFn>();
  return op;
}

}  // namespace

at::Tensor online_softmax_block_call(at::Tensor& block, at::Tensor& stats, const std::optional<at::Tensor>& labels,
                                     const std::optional<at::Tensor>& pz, int64_t col0, int64_t ignore_index,
                                     double softcap, double logit_scale, const std::optional<at::Tensor>& g,
                                     const std::optional<at::Tensor>& gz, const std::optional<at::Tensor>& g_rescale) {
  return softmax_block_op().call(block, stats, labels, pz, col0, ignore_index, softcap, logit_scale, g, gz,
                                 g_rescale);
}

void check_lm_head_sums(int64_t sums) {
  TORCH_CHECK_VALUE(sums >= 0 && sums <= 3, "lm_head_blocks_: sums must be a combination of 1 (Σz) and 2 (Σe·z), 0 to ",
                    "3, got ", sums);
}

void reset_online_stats(at::Tensor& stats) {
  stats.zero_();
  stats.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
}

namespace {

const c10::TypedOperatorHandle<ScaleRowsFn>& scale_rows_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("swiftlora::scale_rows_", "").typed<ScaleRowsFn>();
  return op;
}

// One block whose accumulation is pending: its index, softmax output P (and Pz) and rescale r.
struct Pending {
  int64_t j = -1;
  at::Tensor p, pz, r;
};

}  // namespace

void lm_head_blocks_host(const at::Tensor& hc, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& labels_in, at::Tensor& stats, at::Tensor& g,
                         const std::optional<at::Tensor>& gz_in, int64_t cols, int64_t ignore_index, double softcap,
                         double logit_scale, bool fp32_out_gemm) {
  check_lm_head_blocks_args(hc, weight, bias, labels_in, stats, g, gz_in, cols);
  const c10::DeviceGuard device(hc.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the calls below need no autograd bookkeeping
  const int64_t c = hc.size(0), vocab = weight.size(0);
  cols = std::min(cols, vocab);
  const int64_t nblocks = (vocab + cols - 1) / cols;
  // once per chunk, not per block (the kernels would make each block's labels contiguous again)
  const std::optional<at::Tensor> labels =
      labels_in.has_value() ? std::optional<at::Tensor>(labels_in->contiguous()) : std::nullopt;
  at::Tensor gz = gz_in.has_value() ? *gz_in : at::Tensor();

  // G (and Gz) need no reset: block 0's accumulation overwrites them (beta = 0, old contents not read); the
  // statistics are reset after block 0's GEMM (which does not read them), so the GPU starts on the GEMM at once
  // two block buffers (one for a single block), each 256-byte aligned whatever C: 128 elements of 2 bytes, as
  // head_chunks_reference allocates them
  const int64_t slot = (c * cols + 127) / 128 * 128;
  const at::Tensor bufs = at::empty({std::min<int64_t>(nblocks, 2), slot}, hc.options());
  const at::Tensor pzs = gz.defined() ? at::empty_like(bufs) : at::Tensor();

  // rescale: G (and Gz) times b.r first, unless the next block's softmax already did it
  auto accumulate = [&](const Pending& b, bool rescale) {
    const at::Tensor w = weight.narrow(0, b.j * cols, b.p.size(1));
    for (const auto& [acc_ptr, p] : {std::pair<at::Tensor*, const at::Tensor*>{&g, &b.p}, {&gz, &b.pz}}) {
      at::Tensor& acc = *acc_ptr;
      if (!acc.defined()) continue;
      if (rescale) scale_rows_op().call(acc, b.r);
      compat::addmm_fp32_(acc, *p, w, fp32_out_gemm, b.j == 0 ? 0.0 : 1.0);
    }
  };
  const std::optional<at::Tensor> g_opt(g), gz_opt = gz.defined() ? std::optional<at::Tensor>(gz) : std::nullopt;
  Pending pending;
  for (int64_t j = 0; j < nblocks; ++j) {
    const int64_t v0 = j * cols, width = std::min(cols, vocab - v0);
    const at::Tensor wt = weight.narrow(0, v0, width).t();
    at::Tensor block = bufs.select(0, j % 2).narrow(0, 0, c * width).view({c, width});
    if (bias.has_value()) {
      at::addmm_out(block, bias->narrow(0, v0, width), hc, wt);
    } else {
      at::mm_out(block, hc, wt);
    }
    if (j == 0) {  // the starting statistics (m = −inf, the rest 0), as lm_head_blocks.reset_stats_
      reset_online_stats(stats);
    }
    const std::optional<at::Tensor> pz =
        pzs.defined() ? std::optional<at::Tensor>(pzs.select(0, j % 2).narrow(0, 0, c * width).view({c, width}))
                      : std::nullopt;
    // Block j−1's rescale, folded into this launch (j ≥ 2; block 0 has none). On the one stream, G holds the sum
    // through block j−2 here (its accumulation was issued before), and block j−1's accumulation, issued next,
    // needs r_{j−1}·G + P_{j−1} @ W_{j−1}: the same G, scaled by the same float32 multiply, as scale_rows_ gave.
    const bool fold = pending.j >= 1;
    at::Tensor r = online_softmax_block_call(block, stats, labels, pz, v0, ignore_index, softcap, logit_scale,
                                           fold ? g_opt : std::nullopt, fold ? gz_opt : std::nullopt,
                                           fold ? std::optional<at::Tensor>(pending.r) : std::nullopt);
    if (pending.j >= 0) accumulate(pending, false);  // the previous block, while this block's softmax runs
    pending = Pending{j, block, pz.has_value() ? *pz : at::Tensor(), std::move(r)};
  }
  accumulate(pending, pending.j > 0);  // no softmax after the last block to carry its rescale
}

namespace {

void lm_head_blocks_cpu(const at::Tensor& hc, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& labels, at::Tensor& stats, at::Tensor& g,
                        const std::optional<at::Tensor>& gz, int64_t cols, int64_t ignore_index, double softcap,
                        double logit_scale, int64_t sums) {
  check_lm_head_sums(sums);  // the CPU forms every statistic whatever it says
  // CPU GEMMs have no float32-output 16-bit overload: 16-bit P and W are upcast (as _compat.addmm_fp32_ does)
  lm_head_blocks_host(hc, weight, bias, labels, stats, g, gz, cols, ignore_index, softcap, logit_scale, false);
}

}  // namespace
}  // namespace swiftlora

TORCH_LIBRARY_IMPL(swiftlora, CPU, m) { m.impl("lm_head_blocks_", &swiftlora::lm_head_blocks_cpu); }
