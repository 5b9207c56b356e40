// online_softmax_block_ on the CPU, and its argument checks (shared with CUDA). One vocabulary block [N, B] of the
// logits hidden @ Wᵀ at a time (fused_linear_cross_entropy and token_logprobs with a frozen head, which accumulate
// G = Σ_blocks P @ W_block like flash attention's output): per row, the running statistics (m, s, Σz, Σe^{z−m}z,
// z_label, dz_label) take the block in, the block is overwritten with P_j = e^{z_j − m}·dz_j/dx_j under the
// running reference max m (common/online_softmax.h: it moves only when a block's max passes it by a slack), and the factor e^{m_old − m} by which earlier blocks' accumulations must be rescaled is returned.
// With g_rescale, the op also scales rows of g (and gz) by it, as scale_rows_ would (lm_head_blocks_ passes the
// previous block's factor, saving that launch). One row per task, two passes over the block row (max, then
// exponentials), float32 math.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/online_softmax.h"
#include "cpu/scale_rows.h"
#include "cpu/softmax_transform.h"
#include "ops.h"

namespace swiftlora {
namespace {

// g, gz and g_rescale (the rescale of sums over earlier blocks that the op applies on the side); block, stats and pz
// already checked.
void check_block_rescale_args(const at::Tensor& block, const at::Tensor& stats, const std::optional<at::Tensor>& pz,
                              const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& gz,
                              const std::optional<at::Tensor>& g_rescale) {
  constexpr const char* op = "online_softmax_block_";
  TORCH_CHECK_VALUE(g.has_value() == g_rescale.has_value(), op, ": g and g_rescale come together (g is scaled by ",
                    "g_rescale), got ", g.has_value() ? "g" : "g_rescale", " alone");
  TORCH_CHECK_VALUE(!gz.has_value() || g.has_value(), op, ": gz is scaled beside g, so it needs g and g_rescale");
  if (!g.has_value()) return;
  const int64_t n = block.size(0);
  check_same_device(block, *g_rescale, op, "block", "g_rescale");
  TORCH_CHECK_TYPE(g_rescale->scalar_type() == at::kFloat, op, ": g_rescale must be float32, got ",
                   g_rescale->scalar_type());
  TORCH_CHECK_VALUE(g_rescale->dim() == 1 && g_rescale->size(0) == n && g_rescale->is_contiguous(), op,
                    ": g_rescale must be a contiguous float32 [", n, "] (one factor per row of block), got shape ",
                    g_rescale->sizes(), " strides ", g_rescale->strides());
  const at::Tensor* written[] = {&block, &stats, pz.has_value() ? &*pz : nullptr, &*g, gz.has_value() ? &*gz : nullptr};
  const char* names[] = {"block", "stats", "pz", "g", "gz"};
  for (int k = 3; k < 5; ++k) {
    if (written[k] == nullptr) continue;
    const at::Tensor& t = *written[k];
    check_same_device(block, t, op, "block", names[k]);
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", names[k], " must be float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == n && t.is_contiguous(), op, ": ", names[k],
                      " must be a contiguous float32 [", n, ", H] (rows of block), got shape ", t.sizes(), " strides ",
                      t.strides());
    if (k == 4) check_same_shape(*g, t, op, "g", "gz");
    for (int o = 0; o < k; ++o) {
      if (written[o] != nullptr) check_no_overlap(*written[o], t, op, names[o], names[k]);
    }
  }
  for (int k = 0; k < 5; ++k) {  // g_rescale is read while the op writes these
    if (written[k] != nullptr) check_no_overlap(*g_rescale, *written[k], op, "g_rescale", names[k], false);
  }
}

}  // namespace

void check_online_softmax_block_args(const at::Tensor& block, const at::Tensor& stats,
                                     const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& pz,
                                     int64_t col0, double softcap, double logit_scale,
                                     const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& gz,
                                     const std::optional<at::Tensor>& g_rescale) {
  constexpr const char* op = "online_softmax_block_";
  check_softmax_args(op, block, labels, softcap, logit_scale);
  const int64_t n = block.size(0);
  check_same_device(block, stats, op, "block", "stats");
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat, op, ": stats must be float32, got ", stats.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == n && stats.size(1) == kOnlineStats && stats.is_contiguous(),
                    op, ": stats must be a contiguous float32 [", n, ", ", kOnlineStats,
                    "] (m, s, sum z, sum e^(z-m) z, z_label, dz_label), got shape ", stats.sizes(), " strides ",
                    stats.strides());
  TORCH_CHECK_VALUE(col0 >= 0, op, ": col0 (the block's first vocabulary column) must be >= 0, got ", col0);
  if (pz.has_value()) {
    check_same_device(block, *pz, op, "block", "pz");
    TORCH_CHECK_TYPE(pz->scalar_type() == block.scalar_type(), op, ": pz must have block's dtype (",
                     block.scalar_type(), "), got ", pz->scalar_type());
    TORCH_CHECK_VALUE(pz->sizes() == block.sizes() && pz->stride(1) == 1, op, ": pz must have block's shape ",
                      block.sizes(), " with unit column stride, got shape ", pz->sizes(), " strides ", pz->strides());
    TORCH_CHECK_VALUE(n == 1 || pz->stride(0) >= pz->size(1), op, ": pz is written, so its rows must not overlap");
  }
  check_block_rescale_args(block, stats, pz, g, gz, g_rescale);
}

namespace {

using cpu::Transform;

template <typename T>
void block_row(T* x, T* pz, int64_t b, int64_t label, float* st, float& rescale, const Transform& tf, float slack) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float bm = kNegInf, zsum = 0.f;
  for (int64_t j = 0; j < b; ++j) {
    const float z = tf.z(static_cast<float>(x[j]));
    bm = std::max(bm, z);
    zsum += z;
  }
  const float m_old = st[0], m = online_reference_max(m_old, bm, slack);
  const float r = m_old == kNegInf ? 0.f : (m == m_old ? 1.f : std::exp(m_old - m));
  float s = 0.f, spz = 0.f;
  for (int64_t j = 0; j < b; ++j) {
    float z, dz;
    tf.z_dz(static_cast<float>(x[j]), z, dz);
    const float e = m == kNegInf ? 0.f : std::exp(z - m);
    s += e;
    spz += e * z;
    if (j == label) st[4] = z, st[5] = dz;
    x[j] = static_cast<T>(e * dz);
    if (pz != nullptr) pz[j] = static_cast<T>(e * z * dz);
  }
  st[0] = m;
  st[1] = st[1] * r + s;
  st[2] += zsum;
  st[3] = st[3] * r + spz;
  rescale = r;
}

at::Tensor online_softmax_block_cpu(at::Tensor& block, at::Tensor& stats, const std::optional<at::Tensor>& labels,
                                    const std::optional<at::Tensor>& pz, int64_t col0, int64_t ignore_index, double softcap,
                                    double logit_scale, const std::optional<at::Tensor>& g,
                                    const std::optional<at::Tensor>& gz, const std::optional<at::Tensor>& g_rescale) {
  check_online_softmax_block_args(block, stats, labels, pz, col0, softcap, logit_scale, g, gz, g_rescale);
  const int64_t n = block.size(0), b = block.size(1), xs = block.stride(0);
  const int64_t ps = pz.has_value() ? pz->stride(0) : 0;
  at::Tensor rescale = at::empty({n}, stats.options());
  const at::Tensor lab = labels.has_value() ? labels->to(at::kLong).contiguous() : at::Tensor();
  const int64_t* lp = labels.has_value() ? lab.const_data_ptr<int64_t>() : nullptr;
  float *sp = stats.mutable_data_ptr<float>(), *rp = rescale.mutable_data_ptr<float>();
  const Transform tf(softcap, logit_scale);
  const float slack = online_max_slack(block.scalar_type());
  SWIFTLORA_DISPATCH_FLOAT(block.scalar_type(), "online_softmax_block_cpu", [&] {
    scalar_t* xp = block.mutable_data_ptr<scalar_t>();
    scalar_t* pp = pz.has_value() ? pz->mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / b), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        // The label's column inside this block, or -1 (none, ignored, or in another block).
        const int64_t l = lp == nullptr || lp[r] == ignore_index ? -1 : lp[r] - col0;
        block_row(xp + r * xs, pp == nullptr ? nullptr : pp + r * ps, b, l >= 0 && l < b ? l : -1,
                  sp + r * kOnlineStats, rp[r], tf, slack);
      }
    });
  });
  // the sums over earlier blocks: scale_rows_ itself (on the CPU no launch to save, so no second loop)
  for (const std::optional<at::Tensor>* t : {&g, &gz}) {
    if (!t->has_value() || !g_rescale.has_value()) continue;
    at::Tensor acc = **t;
    scale_rows_inplace_cpu(acc, *g_rescale);
  }
  return rescale;
}

}  // namespace
}  // namespace swiftlora

TORCH_LIBRARY_IMPL(swiftlora, CPU, m) { m.impl("online_softmax_block_", &swiftlora::online_softmax_block_cpu); }
