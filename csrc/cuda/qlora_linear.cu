// qlora_linear on CUDA, version 1: the shared host code (csrc/common/qlora_host.h) with each NF4 weight dequantized
// by the shared kernel (csrc/cuda/nf4_dequant.cu) into a slice of a scratch buffer in the compute dtype (a chunk of
// the weight panel [W | s·B] or of W), which cuBLAS (through ATen) then reads; chunk i+1 is dequantized on a side
// stream while chunk i's GEMM runs (csrc/common/qlora_pipeline.h; StreamOverlap below). Also qlora_gemm, dispatched to
// its sm_90a kernel (version 3: csrc/cuda/qlora_gemm_sm90.cu) where that applies.
// Dequantization floor: read N·K/2 packed bytes + N·K/blocksize scales, write N·K·E bytes; for W [14336, 4096] bf16
// that is 29 MB + 117 MB, ~0.05 ms at 3 TB/s (bench/NOTES.md, "QLoRA ops").
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/nf4_cuda.cuh"
#include "common/qlora_host.h"
#include "cuda/nf4_dequant.h"
#include "cuda/qlora_gemm_sm90.h"

namespace swiftlora::cuda {
namespace {

using qlora::BaseWeight;

// A CUDA event without timing (cheap to record; legal inside CUDA graph capture).
class Event {
 public:
  Event() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming)); }
  ~Event() { C10_CUDA_CHECK_WARN(cudaEventDestroy(e_)); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(cudaStream_t s) {
    C10_CUDA_CHECK(cudaEventRecord(e_, s));
    recorded_ = true;
  }
  void block(cudaStream_t s) const {  // s waits for the last record (nothing to wait for before the first)
    if (recorded_) C10_CUDA_CHECK(cudaStreamWaitEvent(s, e_, 0));
  }

 private:
  cudaEvent_t e_ = nullptr;
  bool recorded_ = false;
};

// The producer/consumer streams of qlora_pipeline.h's run_pipeline. The side stream (high priority, so the
// dequantization gets SMs as soon as the GEMM's CTAs free them) first waits for everything queued so far on the
// current stream (inputs, and the scratch buffers' previous users: they were allocated on the current stream);
// each chunk's fill waits for the GEMM that last read its buffer (consumed) and the GEMM waits for its fill (ready).
// The destructor joins the side stream back into the current one, so every tensor the side stream touched is
// used, in stream order, before anything after the op, and freeing it needs no record_stream; this also makes the
// fork/join a valid CUDA graph capture.
struct StreamOverlap {
  explicit StreamOverlap(const at::Tensor& like)
      : main_(c10::cuda::getCurrentCUDAStream(like.device().index())),
        side_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, like.device().index())) {
    fork_.record(main_.stream());
    fork_.block(side_.stream());
  }
  ~StreamOverlap() {
    try {
      join_.record(side_.stream());
      join_.block(main_.stream());
    } catch (const std::exception& e) {
      TORCH_WARN("qlora_linear: joining the dequantization stream failed: ", e.what());
    }
  }
  StreamOverlap(const StreamOverlap&) = delete;
  StreamOverlap& operator=(const StreamOverlap&) = delete;
  template <typename F>
  void produce(int slot, F&& fill) {
    consumed_[slot].block(side_.stream());
    {
      const c10::cuda::CUDAStreamGuard guard(side_);
      fill();
    }
    ready_[slot].record(side_.stream());
  }
  void consume(int slot) { ready_[slot].block(main_.stream()); }
  void consumed(int slot) { consumed_[slot].record(main_.stream()); }

  c10::cuda::CUDAStream main_, side_;
  Event fork_, join_, ready_[2], consumed_[2];
};

// SWIFTLORA_QLORA_GEMM_VARIANT, a benchmarking knob read on every call: "tma" (256-feature × 128-token tile, the
// block scale applied in fp32 as bitsandbytes does), "tma16" (the scale applied in 16 bits: fewer instructions,
// two more roundings, an error still below a bf16 GEMM's on the dequantized weight); "tmaw" and "tma16w": those on
// the 128-feature × 256-token tile (half the dequantization per MAC). Default: tma16w for more than 128 rows of x,
// else tma16 (a 256-token tile would be mostly padding). H100, x [4096, 4096], W [14336, 4096], r = 16, cuBLAS
// 0.624 ms in the same run: tma16w 0.698 ms, tma16 0.795, tmaw 0.808, tma 1.062 (bench/NOTES.md, "The wide tile").
struct QloraKernelVariant {
  bool scale16 = true;
  bool wide = false;
};

QloraKernelVariant qlora_kernel_variant(int64_t rows) {
  const char* env = std::getenv("SWIFTLORA_QLORA_GEMM_VARIANT");
  QloraKernelVariant k;
  k.wide = rows > 128;
  if (env == nullptr || *env == '\0') return k;
  const std::string v(env);
  TORCH_CHECK(v == "tma" || v == "tma16" || v == "tmaw" || v == "tma16w",
              "SWIFTLORA_QLORA_GEMM_VARIANT must be tma, tma16, tmaw or tma16w, got '", v, "'");
  k.scale16 = v == "tma16" || v == "tma16w";
  k.wide = v == "tmaw" || v == "tma16w";
  return k;
}

struct CudaBackend {
  // out: rows [row0, ...) × columns [col0, ...) of W in the compute dtype, unit column stride, any row stride (a
  // slice of a panel chunk), on the current stream (the side stream inside Overlap::produce).
  static void dequantize(const BaseWeight& b, int64_t row0, int64_t col0, at::Tensor out) {
    const nf4::Nf4Args a = nf4::nf4_args(b.nf4);
    const Nf4Rect rect{row0 * b.k + col0, out.size(0), out.size(1), b.k, out.stride(0)};
    SWIFTLORA_DISPATCH_FLOAT(out.scalar_type(), "qlora_dequantize_rows", [&] {
      launch_nf4_dequant<scalar_t>(a, rect, out.mutable_data_ptr<scalar_t>(), current_stream());
    });
  }
  static constexpr bool kOverlaps = true;
  using Overlap = StreamOverlap;
  // The automatic plan's forward on sm_90a: one qlora_gemm kernel per projection, each writing its columns of y
  // (xa's columns of the projection, its already scaled B, its slice of the bias). False, with nothing launched,
  // unless the kernel takes every projection.
  static bool fused_forward(const at::Tensor& x2, const at::Tensor& xa, const qlora::Projections& p,
                            const at::Tensor& bias, at::Tensor& y) {
    const bool one = p.base.size() == 1;
    std::vector<qlora::GemmArgs> args(p.base.size());
    for (size_t i = 0; i < args.size(); ++i) {
      qlora::GemmArgs& a = args[i];
      a.x = x2;
      a.w = p.base[i];
      a.m = x2.size(0);
      a.n = p.base[i].n;
      a.k = p.k;
      a.r = p.lora_a[i].size(0);
      a.xa = one ? xa : xa.narrow(1, p.r_off[i], a.r);
      a.lora_b = p.lora_b[i];
      if (bias.defined()) a.bias = (one ? bias : bias.narrow(0, p.n_off[i], a.n)).contiguous();
      if (!sm90::supported(a)) return false;
    }
    y = at::empty({x2.size(0), p.n}, x2.options());
    const QloraKernelVariant k = qlora_kernel_variant(x2.size(0));
    for (size_t i = 0; i < args.size(); ++i) {
      at::Tensor yi = one ? y : y.narrow(1, p.n_off[i], args[i].n);
      sm90::run(args[i], yi, k.scale16, k.wide);
    }
    return true;
  }
  // Version 2 where it applies (sm_90a: dequantization inside the wgmma GEMM), else dequantize + cuBLAS.
  static at::Tensor qlora_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                               const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                               const std::optional<at::Tensor>& xa, const std::optional<at::Tensor>& lora_b,
                               const std::optional<at::Tensor>& bias) {
    const qlora::GemmArgs a = qlora::make_gemm_args(x, packed, absmax, absmax2, code2, offset, blocksize,
                                                    out_features, xa, lora_b, bias);
    const c10::cuda::CUDAGuard guard(x.device());
    if (!sm90::supported(a)) return qlora::gemm_output_shape(x, qlora::gemm_unfused<CudaBackend>(a));
    at::Tensor y = at::empty({a.m, a.n}, x.options());
    const QloraKernelVariant k = qlora_kernel_variant(a.m);
    sm90::run(a, y, k.scale16, k.wide);
    return qlora::gemm_output_shape(x, y);
  }
};

}  // namespace
}  // namespace swiftlora::cuda

TORCH_LIBRARY_IMPL(swiftlora, CUDA, m) { swiftlora::qlora::register_ops<swiftlora::cuda::CudaBackend>(m); }
