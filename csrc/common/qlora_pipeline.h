// Chunked dequantize-then-GEMM for the qlora ops (csrc/common/qlora_host.h). The frozen panel P = [W | s·B | 0]
// ([N, K + R'], "panel" plan) or W alone ([N, K], "lora_first" plan) is dequantized a chunk at a time into one of
// two scratch buffers while the GEMM of the previous chunk runs: on a side stream where the backend has one
// (Backend::Overlap: CUDA in csrc/cuda/qlora_linear.cu), inline on the CPU. The memory-bound dequantization
// (~0.055 ms for W [14336, 4096]) then hides under the compute-bound GEMM (~0.6 ms), and the scratch shrinks from
// all of P to two chunks.
//   forward:  chunks of P's rows (the GEMM's output columns: each chunk writes its own slice of y);
//   backward: chunks of P's columns (grad_x's columns, grad_x = grad_y · P): each chunk writes its own slice, so no
//             partial sums are added in 16-bit (the same rounding as one GEMM); the last chunk holds the LoRA columns.
// Why the streams live in the C++ op and not in the Python autograd function: the op is one opaque call with a
// fake (python/swiftlora/ops/qlora_linear.py), so torch.compile traces it as before and a CUDA graph captures the
// fork/join (the side stream waits on an event of the capturing stream and is joined back before the op returns).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace swiftlora::qlora {

// Chunk i covers [i·size, min((i + 1)·size, extent)).
struct ChunkPlan {
  int64_t count = 1, size = 0;
};

// Up to `requested` chunks of `extent`; sizes of 64 or more are rounded up to a multiple of 64 (whole GEMM tiles,
// 16-byte aligned output slices), so the count can come out lower. Deterministic in the shapes.
inline ChunkPlan plan_chunks(int64_t extent, int64_t requested) {
  const int64_t want = std::max<int64_t>(1, std::min(requested, extent));
  int64_t size = (extent + want - 1) / want;
  if (size >= 64) size = (size + 63) / 64 * 64;
  return {(extent + size - 1) / size, size};
}

// The chunk count an op call runs with: `requested` >= 1 as given (1 = one pass, no side stream); <= 0 = automatic,
// which is one pass. Measured on the H100 (bench/results/h100-20261126-qlora-pipe.md): 4 pipelined chunks ran
// qlora_linear's forward in 0.99 ms against 0.78 ms in one pass — cuBLAS's GEMM fills every SM, so the side-stream
// dequantization finds no room and only the smaller GEMMs' lower efficiency shows. Chunks still save memory (two
// chunk buffers instead of the whole 16-bit weight): ask for them with qlora_plan(chunks=N).
inline int64_t resolve_chunks(int64_t requested, bool /*overlaps*/, int64_t /*m*/, int64_t /*n*/, int64_t /*k*/) {
  return requested >= 1 ? requested : 1;
}

// Runs chunks 0..count-1: fill(i, buf) writes chunk i's operand into buf (the producer: the side stream), use(i, buf)
// consumes it on the current stream. Two buffers alternate; chunk i+2's fill waits for chunk i's use.
template <typename Backend, typename Fill, typename Use>
void run_pipeline(const at::Tensor& like, int64_t count, const at::Tensor (&bufs)[2], Fill fill, Use use) {
  if (count == 1) {
    fill(0, bufs[0]);
    use(0, bufs[0]);
    return;
  }
  typename Backend::Overlap ov(like);  // joins the side stream back into the current one when it goes out of scope
  ov.produce(0, [&] { fill(0, bufs[0]); });
  for (int64_t i = 0; i < count; ++i) {
    const int s = static_cast<int>(i % 2);
    if (i + 1 < count) ov.produce(1 - s, [&] { fill(i + 1, bufs[1 - s]); });
    ov.consume(s);
    use(i, bufs[s]);
    ov.consumed(s);
  }
}

// Rows [n0, n1) × columns [c0, c1) of the panel [W | s·B (block-diagonal) | 0] (width K + R') or of W (c1 <= K)
// into out [n1 - n0, c1 - c0] (unit column stride). Every base is NF4. Proj: qlora::Projections.
template <typename Backend, typename Proj>
void fill_panel(const Proj& p, int64_t n0, int64_t n1, int64_t c0, int64_t c1, const at::Tensor& out) {
  const int64_t w1 = std::min(c1, p.k), l0 = std::max(c0, p.k);
  for (size_t j = 0; j < p.base.size(); ++j) {
    const int64_t off = p.n_off[j], a = std::max(n0, off), b = std::min(n1, off + p.base[j].n);
    if (a >= b) continue;
    const at::Tensor rows = out.narrow(0, a - n0, b - a);
    if (c0 < w1) Backend::dequantize(p.base[j], a - off, c0, rows.narrow(1, 0, w1 - c0));
    if (l0 >= c1) continue;
    at::Tensor lora = rows.narrow(1, l0 - c0, c1 - l0);
    lora.zero_();
    const int64_t first = p.k + p.r_off[j], b0 = std::max(l0, first),
                  b1 = std::min(c1, first + p.lora_b[j].size(1));
    if (b0 < b1) lora.narrow(1, b0 - l0, b1 - b0).copy_(p.lora_b[j].narrow(0, a - off, b - a).narrow(1, b0 - first, b1 - b0));
  }
}

// Forward: use(n0, nc, rows) for each row chunk [n0, n0 + nc) of the panel of width `width`, rows [nc, width].
template <typename Backend, typename Proj, typename Use>
void panel_row_chunks(const Proj& p, int64_t width, int64_t chunks, const at::Tensor& like, Use use) {
  const ChunkPlan c = plan_chunks(p.n, chunks);
  const int64_t rows = std::min(c.size, p.n);
  const at::Tensor bufs[2] = {at::empty({rows, width}, like.options()),
                              c.count > 1 ? at::empty({rows, width}, like.options()) : at::Tensor()};
  auto span = [&](int64_t i) { return std::min(c.size, p.n - i * c.size); };
  run_pipeline<Backend>(
      like, c.count, bufs,
      [&](int64_t i, const at::Tensor& buf) {
        fill_panel<Backend>(p, i * c.size, i * c.size + span(i), 0, width, buf.narrow(0, 0, span(i)));
      },
      [&](int64_t i, const at::Tensor& buf) { use(i * c.size, span(i), buf.narrow(0, 0, span(i))); });
}

// Backward: use(c0, cc, cols) for each column chunk [c0, c0 + cc) of the panel of width `width` (chunks split W's
// K columns; the last one also takes [K, width)), cols [N, cc].
template <typename Backend, typename Proj, typename Use>
void panel_col_chunks(const Proj& p, int64_t width, int64_t chunks, const at::Tensor& like, Use use) {
  const ChunkPlan c = plan_chunks(p.k, chunks);
  auto end = [&](int64_t i) { return i + 1 == c.count ? width : (i + 1) * c.size; };
  const int64_t cols = std::max(std::min(c.size, p.k), width - (c.count - 1) * c.size);
  const at::Tensor bufs[2] = {at::empty({p.n, cols}, like.options()),
                              c.count > 1 ? at::empty({p.n, cols}, like.options()) : at::Tensor()};
  run_pipeline<Backend>(
      like, c.count, bufs,
      [&](int64_t i, const at::Tensor& buf) {
        fill_panel<Backend>(p, 0, p.n, i * c.size, end(i), buf.narrow(1, 0, end(i) - i * c.size));
      },
      [&](int64_t i, const at::Tensor& buf) {
        use(i * c.size, end(i) - i * c.size, buf.narrow(1, 0, end(i) - i * c.size));
      });
}

}  // namespace swiftlora::qlora
