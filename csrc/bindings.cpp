// The whole op surface of swiftlora: one schema per op (implementations register in csrc/cpu and csrc/cuda).
// Ops ending in `_` write into the arguments marked (a!): see each op's Python module for what goes where.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(swiftlora, m) {
  // y = w·x/rms(x) (offset: (1+w)·x/rms(x), Gemma); returns (y, rstd float32 [...]).
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool offset) -> (Tensor, Tensor)");
  // (grad_x, grad_weight); grad_weight is an empty tensor unless weight_grad.
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, bool offset, bool weight_grad)"
        " -> (Tensor, Tensor)");
  // Same, grad_x written into grad_y's buffer; returns grad_weight.
  m.def("rms_norm_backward_(Tensor(a!) grad_y, Tensor x, Tensor weight, Tensor rstd, bool offset, "
        "bool weight_grad) -> Tensor");
  // Rotates the first R = 2·cos.size(-1) dims of every head of q and k (rotate-half convention); inverse
  // rotates backwards (the backward pass). Returns new (q, k) with the inputs' strides.
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, bool inverse) -> (Tensor, Tensor)");
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? position_ids, bool inverse) -> ()");
  // silu(gate)·up, and its backward (grad_gate, grad_up).
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // In place: grad <- silu(gate)·up (the forward output, recomputed), gate <- grad_gate, up <- grad_up.
  m.def("swiglu_backward_(Tensor(a!) grad, Tensor(b!) gate, Tensor(c!) up) -> ()");
  // gelu(gate)·up with exact erf gelu, or the tanh approximation when approximate.
  m.def("geglu(Tensor gate, Tensor up, bool approximate) -> Tensor");
  m.def("geglu_backward(Tensor grad, Tensor gate, Tensor up, bool approximate) -> (Tensor, Tensor)");
  m.def("geglu_backward_(Tensor(a!) grad, Tensor(b!) gate, Tensor(c!) up, bool approximate) -> ()");

  // Softmax-over-vocab primitives behind cross_entropy, fused_linear_cross_entropy and token_logprobs
  // (python/swiftlora/ops/cross_entropy.py). Rows of logits x [N, V]; z = softcap·tanh(scale·x/softcap) when
  // softcap > 0, else scale·x; p = softmax(z). Labels equal to ignore_index (or labels None) select no target.
  // Row statistics in float32 [N]: (lse, z at the label (0 if none), Σ_j z_j, Σ_j p_j z_j (only when
  // with_entropy, else an empty tensor)).
  m.def("softmax_stats(Tensor logits, Tensor? labels, int ignore_index, float softcap, float logit_scale, "
        "bool with_entropy) -> (Tensor, Tensor, Tensor, Tensor)");
  // dL/dx_j = (a·p_j + b·[j = label] + c + d·p_j·z_j) · dz_j/dx_j with per-row coefficients coef [N, 4] float32
  // (a, b, c, d); returns a new [N, V] tensor in logits' dtype.
  m.def("softmax_grad(Tensor logits, Tensor? labels, int ignore_index, Tensor lse, Tensor coef, float softcap, "
        "float logit_scale) -> Tensor");
  // Same, written into logits' own buffer.
  m.def("softmax_grad_(Tensor(a!) logits, Tensor? labels, int ignore_index, Tensor lse, Tensor coef, "
        "float softcap, float logit_scale) -> ()");
  // One pass: per-row cross-entropy loss (label smoothing, z-loss; 0 for ignored rows) and lse, with the
  // gradient of Σ_i grad_scale_i·loss_i written into logits' buffer. grad_scale: float32 [] or [N] on the device
  // (e.g. 1/number of counted tokens, computed there: no host sync). Returns (loss [N], lse [N]) float32.
  m.def("cross_entropy_fused_(Tensor(a!) logits, Tensor labels, int ignore_index, float label_smoothing, "
        "float z_loss, float softcap, float logit_scale, Tensor grad_scale) -> (Tensor, Tensor)");
  // t *= scale, scale float32 [] or [t.size(0)] on the device; rows whose scale is exactly 1 are not touched
  // (so the usual backward with grad_output = 1 costs a launch, not a pass over t).
  m.def("scale_rows_(Tensor(a!) t, Tensor scale) -> ()");
  // The mean's divisor of cross-entropy from its labels [N] (int64/int32) in one launch: float32 [2] =
  // (max(#(labels != ignore_index), 1), its reciprocal), on labels' device (no host sync).
  m.def("mean_divisor(Tensor labels, int ignore_index) -> Tensor");
  // One vocabulary block of an online softmax (a frozen LM head's loss/log-probs accumulated flash-attention style,
  // python/swiftlora/ops/lm_head_blocks.py): block [N, B] holds columns [col0, col0 + B) of the logits; stats
  // float32 [N, 6] = (m, s, Σz, Σe^{z−m}·z, z_label, dz_label) carried across blocks (start: (−inf, 0, 0, 0, 0, 0)),
  // s = Σe^{z−m} under a running reference max m (it moves to a block's max only when that passes m by 16, 8 for
  // float16: csrc/common/online_softmax.h). Overwrites block with P_j = e^{z_j−m}·dz_j/dx_j, writes
  // e^{z_j−m}·z_j·dz_j/dx_j into pz when given, and returns e^{m_before − m} float32 [N], the factor that rescales
  // sums over earlier blocks. On CUDA B ≤ 8192 (16-bit) or 4096 (float32). With g_rescale float32 [N], it also
  // multiplies row i of g (and of gz) float32 [N, H] contiguous by g_rescale[i], rows whose factor is exactly 1
  // untouched (scale_rows_'s semantics and bits): lm_head_blocks_ folds the previous block's rescale in here.
  m.def("online_softmax_block_(Tensor(a!) block, Tensor(b!) stats, Tensor? labels, Tensor(c!)? pz, int col0, "
        "int ignore_index, float softcap, float logit_scale, Tensor(d!)? g=None, Tensor(e!)? gz=None, "
        "Tensor? g_rescale=None) -> Tensor");
  // A frozen LM head's whole vocabulary loop for one token chunk hc [C, H] (head_chunks in lm_head_blocks.py): per
  // block of `cols` columns, logits = hc @ W_bᵀ (+ bias_b), online_softmax_block_, G = r·G + P @ W_b (float32).
  // Overwrites stats [C, 6] (the final row statistics, as online_softmax_block_'s), g [C, H] = Σ_b e^{z−m}·dz·W_b
  // and, when given, gz [C, H] = Σ_b e^{z−m}·z·dz·W_b, all float32; labels [C] as there.
  // sums: which optional statistics the caller needs (1: stats[:, 2] = Σz, 2: stats[:, 3] = Σe^{z−m}·z); a backend
  // may leave the others unspecified (the sm_90a fused path does).
  m.def("lm_head_blocks_(Tensor hc, Tensor weight, Tensor? bias, Tensor? labels, Tensor(a!) stats, Tensor(b!) g, "
        "Tensor(c!)? gz, int cols, int ignore_index, float softcap, float logit_scale, int sums=3) -> ()");

  // NF4 in bitsandbytes' layout (csrc/common/nf4.h; python/swiftlora/ops/nf4.py). A weight is (packed, absmax,
  // absmax2, code2, offset): packed uint8 [(n+1)/2, 1]; absmax float32 [nblocks], or with double quantization uint8
  // [nblocks] plus absmax2 float32 [ceil(nblocks/256)], code2 float32 [256] and offset float32 [] (else None).
  // Quantize: (packed, absmax, absmax2, offset); passing code2 (the 8-bit dynamic map) turns on double
  // quantization, otherwise absmax2 and offset come back empty. Bit-identical to bitsandbytes' CUDA quantize_4bit.
  m.def("nf4_quantize(Tensor x, int blocksize, Tensor? code2) -> (Tensor, Tensor, Tensor, Tensor)");
  // The tensor of shape `shape` in `dtype` (fp32 value·scale rounded once), bit-identical to dequantize_4bit.
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor? offset, "
        "int blocksize, int[] shape, ScalarType dtype) -> Tensor");
  // y [..., N] = x [..., K] @ dequant(W [N, K])ᵀ for 1..16 rows of x (decode), fp32 accumulation, y in x's dtype.
  m.def("nf4_gemv(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor? offset, "
        "int blocksize, int out_features) -> Tensor");
  // LoRA linears over frozen base weights (python/swiftlora/ops/qlora_linear.py): P projections of one input x
  // [..., K], y = [y_1 | ... | y_P], y_p = x @ W_pᵀ (+ bias_p) + scale_p · (dropout_p(x) @ A_pᵀ) @ B_pᵀ with
  // dropout_p(x) = x · dropout_mask[p] · dropout_scale. W_p [N_p, K] (N_p = lora_b[p].size(0)) is NF4 (weight =
  // packed codes with absmax, absmax2, code2, offset as nf4_dequantize takes them) or dense (absmax None, x's dtype).
  // Lists hold one entry per projection (bias and dropout_mask may be empty). Returns (y [..., N], xa [..., R]),
  // xa = the LoRA inputs [dropout_1(x) @ A_1ᵀ | ...], in x's dtype. Plan (csrc/common/qlora_pipeline.h): chunks
  // <= 0 automatic, 1 one dequantization + one GEMM, n up to n dequantize/GEMM chunks overlapped on the GPU;
  // panel_align: the folded LoRA columns pad K + R to a multiple of it (8 or more, a multiple of 8).
  m.def("qlora_linear(Tensor x, Tensor[] weight, Tensor?[] absmax, Tensor?[] absmax2, Tensor?[] code2, "
        "Tensor?[] offset, int[] blocksize, Tensor[] lora_a, Tensor[] lora_b, float[] scale, Tensor?[] bias, "
        "Tensor?[] dropout_mask, float dropout_scale, int chunks=-1, int panel_align=8) -> (Tensor, Tensor)");
  // (grad_x [..., K], grad_xa [..., R]): grad_xa_p = scale_p · grad_y_p @ B_p, the gradient of xa (grad_A and grad_B
  // are small GEMMs the caller forms from it and from xa).
  m.def("qlora_linear_backward(Tensor grad_y, Tensor[] weight, Tensor?[] absmax, Tensor?[] absmax2, "
        "Tensor?[] code2, Tensor?[] offset, int[] blocksize, Tensor[] lora_a, Tensor[] lora_b, float[] scale, "
        "Tensor?[] dropout_mask, float dropout_scale, int chunks=-1, int panel_align=8) -> (Tensor, Tensor)");

  // GGUF block quantization (python/swiftlora/ops/gguf_quant.py): rows x [..., n] float -> uint8 [..., n/B·S], the
  // bytes llama.cpp's reference quantizer writes for ggml type qtype (Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8,
  // Q2_K 10, Q3_K 11, Q4_K 12, Q5_K 13, Q6_K 14; B = 32 or 256 elements per block, S bytes per block).
  m.def("gguf_quantize(Tensor x, int qtype) -> Tensor");
  // One NF4 projection's forward, y [..., N] = x [..., K] @ dequant(W)ᵀ + xa [..., R] @ lora_bᵀ (+ bias), lora_b
  // [N, R] already scaled, all in x's dtype. On sm_90a the dequantization runs inside the GEMM (qlora_linear's
  // version 2); elsewhere, or for shapes that kernel does not take, dequantize + GEMM.
  m.def("qlora_gemm(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor? offset, "
        "int blocksize, int out_features, Tensor? xa, Tensor? lora_b, Tensor? bias) -> Tensor");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "swiftlora's compiled core; the ops live in torch.ops.swiftlora";
#ifdef SWIFTLORA_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
#ifdef SWIFTLORA_WITH_SM90A
  m.attr("sm90a_built") = true;
#else
  m.attr("sm90a_built") = false;
#endif
  m.attr("cuda_archs") = SWIFTLORA_CUDA_ARCHS_STR;      // ','-separated, as built
  m.attr("nvcc_version") = SWIFTLORA_CUDA_VERSION_STR;  // empty in a CPU-only build
}
