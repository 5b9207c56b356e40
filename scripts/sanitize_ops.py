"""Every swiftlora CUDA kernel once or twice, at small shapes that still take each launch path (vector and scalar
rows, several tiles and a ragged last one, nested and plain NF4 scales, M = 1 and 16 for the gemv, the sm_90a
QLoRA GEMM), forward and backward. A driver for compute-sanitizer, which makes the full test suite far too slow:

    compute-sanitizer --tool racecheck --kernel-name kns=swiftlora --error-exitcode 17 python scripts/sanitize_ops.py \
        --without-cublas
    (also memcheck, synccheck, initcheck; PYTORCH_NO_CUDA_MEMORY_CACHING=1 for memcheck)
    python scripts/sanitize_ops.py --device cpu      (the same steps on the C++ kernels: a check of the script)

Each step checks its result against the plain-PyTorch reference loosely (a race or a stray write shows up as a
wrong value too), prints one line, and the script exits non-zero if any step failed.
"""
from __future__ import annotations

import argparse
import sys
import traceback

import torch

import swiftlora.ops as ops
from swiftlora.ops import LoRAProjection, NF4Weight

DEV = torch.device("cuda")  # main() may change it
BF16 = torch.bfloat16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = rel(got, want)
    if not torch.isfinite(got).all() or err > tol:
        raise AssertionError(f"{name}: relative error {err:.2e} > {tol:g} (or non-finite values)")


def grads(fn, *inputs):
    """fn(*inputs) and the gradients of its sum weighted by a fixed random tensor."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(torch.randn_like(out, generator=torch.Generator(DEV).manual_seed(1)))
    return [out.detach()] + [t.grad for t in inputs]


def compare(name, fn, ref, *inputs, tol=2e-2):
    for i, (a, b) in enumerate(zip(grads(fn, *inputs), grads(ref, *inputs))):
        check(f"{name}[{i}]", a, b, tol)


def norms_and_activations():
    for rows, h in ((37, 256), (5, 1000)):  # vector rows; odd width (scalar path)
        x, w = torch.randn(rows, h, device=DEV, dtype=BF16), torch.rand(h, device=DEV, dtype=BF16) + 0.5
        compare(f"rms_norm {rows}x{h}", ops.rms_norm, ops.rms_norm_reference, x, w)
        g, u = torch.randn(rows, h, device=DEV, dtype=BF16), torch.randn(rows, h, device=DEV, dtype=BF16)
        compare(f"swiglu {rows}x{h}", ops.swiglu, ops.swiglu_reference, g, u)
        compare(f"geglu {rows}x{h}", ops.geglu, ops.geglu_reference, g, u)
    q, k = torch.randn(2, 33, 8, 64, device=DEV, dtype=BF16), torch.randn(2, 33, 2, 64, device=DEV, dtype=BF16)
    ang = torch.randn(64, 32, device=DEV)
    compare("rope", lambda a, b: torch.cat([t.flatten() for t in ops.rope(a, b, ang.cos(), ang.sin())]),
            lambda a, b: torch.cat([t.flatten() for t in ops.rope_reference(a, b, ang.cos(), ang.sin())]), q, k)


def cross_entropy_family():
    for n, v in ((19, 32000), (8, 1003)):
        x, y = torch.randn(n, v, device=DEV, dtype=BF16) * 4, torch.randint(0, v, (n,), device=DEV)
        y[3] = -100
        compare(f"cross_entropy {n}x{v}", lambda t: ops.cross_entropy(t, y, label_smoothing=0.1, softcap=30.0),
                lambda t: ops.cross_entropy_reference(t, y, label_smoothing=0.1, softcap=30.0), x)
        for cap in (None, 30.0):  # the lean in-place kernel, and the general one
            compare(f"cross_entropy in place {n}x{v} softcap={cap}",
                    lambda t: ops.cross_entropy(t.clone(), y, inplace_backward=True, softcap=cap),
                    lambda t: ops.cross_entropy_reference(t, y, softcap=cap), x)


def softmax_block():
    """online_softmax_block_ alone (lm_head_family runs it between cuBLAS GEMMs): the general kernel (pz, an odd
    width: scalar rows) and the lean one (no pz, 16-byte rows), each also rescaling rows of g (and gz)."""
    from swiftlora.ops.lm_head_blocks import new_stats, online_softmax_block_reference

    y = torch.randint(0, 2000, (37,), device=DEV)
    factor = torch.where(torch.arange(37, device=DEV) % 3 == 0, 0.5, 1.0)
    for width, with_pz in ((1003, True), (1000, False)):
        block, g = torch.randn(37, width, device=DEV, dtype=BF16) * 3, torch.randn(37, 77, device=DEV)
        outs = []
        for fn in (torch.ops.swiftlora.online_softmax_block_, online_softmax_block_reference):
            b, stats, gc = block.clone(), new_stats(37, DEV), g.clone()
            pz, gz = (torch.empty_like(block), -g) if with_pz else (None, None)
            r = fn(b, stats, y, pz, 500, -100, 0.0, 1.0, gc, gz, factor)
            outs.append({"block": b, "stats": stats, "pz": pz, "rescale": r, "g": gc, "gz": gz})
        for name, a in outs[0].items():
            if a is not None:
                check(f"online_softmax_block_ {width} {name}", a, outs[1][name], 2e-2)


def lm_head_family():
    h, w = torch.randn(300, 128, device=DEV, dtype=BF16), torch.randn(5000, 128, device=DEV, dtype=BF16) * 0.1
    y = torch.randint(0, 5000, (300,), device=DEV)
    compare("fused_linear_cross_entropy", lambda a, b: ops.fused_linear_cross_entropy(a, b, y, chunk_size=128),
            lambda a, b: ops.fused_linear_cross_entropy_reference(a, b, y), h, w)
    for entropy in (False, True):
        def tl(a, fn=ops.token_logprobs):
            out = fn(a, w, y, with_entropy=entropy)
            return torch.cat([t.flatten() for t in out]) if entropy else out
        compare(f"token_logprobs entropy={entropy}", tl, lambda a: tl(a, ops.token_logprobs_reference), h)


def lm_head_fused():
    """The sm_90a fused path of lm_head_blocks_ (hidden > 896, bf16, no bias): the logits GEMM with the softmax in its
    epilogue, the merge kernel and its correction of G (vocabulary rows 1100-1160 scaled past the slack), a ragged
    last block and a token tail; against the host loop (SWIFTLORA_LM_HEAD_FUSED=0) on the same inputs. Elsewhere
    (other GPUs, CPU) both runs take the host loop."""
    import os

    rows, hidden, vocab = 200, 1024, 2568
    h, w = torch.randn(rows, hidden, device=DEV, dtype=BF16), torch.randn(vocab, hidden, device=DEV, dtype=BF16) * 0.03
    w[1100:1160] *= 60
    y = torch.randint(0, vocab, (rows,), device=DEV)
    out = []
    for fused in ("1", "0"):
        os.environ["SWIFTLORA_LM_HEAD_FUSED"] = fused
        stats, g = torch.empty(rows, 6, device=DEV), torch.empty(rows, hidden, device=DEV)
        torch.ops.swiftlora.lm_head_blocks_(h, w, None, y, stats, g, None, 1024, -100, 0.0, 1.0, 3)
        out.append((stats[:, 0] + stats[:, 1].log(), g / stats[:, 1:2]))
    os.environ.pop("SWIFTLORA_LM_HEAD_FUSED")
    check("lm_head_fused lse", out[0][0], out[1][0], 1e-3)
    check("lm_head_fused G/s", out[0][1], out[1][1], 2e-2)


def _nf4_weights():
    for n, k, nested in ((384, 512, True), (96, 320, False)):
        w = torch.randn(n, k, device=DEV, dtype=BF16) * 0.02
        yield n, k, w, NF4Weight.quantize(w, 64, compress_statistics=nested)


def nf4_kernels():
    """Quantize, dequantize, gemv, the sm_90a QLoRA GEMM, with references on the CPU: no cuBLAS call, which
    racecheck cannot survive on the H100 (a sanitizer hardware exception at the first cuBLAS GEMM)."""
    for n, k, w, nf in _nf4_weights():
        ref = nf.dequantize().cpu().double()
        check(f"nf4 round trip {n}x{k}", ref, w.cpu(), 0.12)
        check(f"nf4_dequantize {n}x{k}", ops.nf4_dequantize(*nf.tensors(), blocksize=64, shape=(n, k)).cpu(),
              ref, 0)
        for m in (1, 4, 16):
            x = torch.randn(m, k, device=DEV, dtype=BF16)
            check(f"nf4_gemv M={m} {n}x{k}", ops.nf4_gemv(x, *nf.tensors(), blocksize=64, out_features=n).cpu(),
                  x.cpu().double() @ ref.t(), 2e-2)
        # the 256-feature x 128-token tile, and the wide 128 x 256 one (above 128 rows); rank 16 keeps the LoRA
        # MMAs in flight under the first weight steps, rank 48 drains them first
        for m, r in ((70, 16), (300, 16), (300, 48)):
            x, xa = torch.randn(m, k, device=DEV, dtype=BF16), torch.randn(m, r, device=DEV, dtype=BF16)
            b = torch.randn(n, r, device=DEV, dtype=BF16) * 0.05
            want = x.cpu().double() @ ref.t() + xa.cpu().double() @ b.cpu().double().t()
            check(f"qlora_gemm M={m} r={r} {n}x{k}", ops.qlora_gemm(x, nf, xa, b).cpu(), want, 2e-2)


def lora_family():
    """The LoRA linears and blocks (cuBLAS GEMMs between our kernels)."""
    for n, k, _, nf in _nf4_weights():
        a = torch.randn(8, k, device=DEV, dtype=BF16) * 0.05
        b = torch.randn(n, 8, device=DEV, dtype=BF16) * 0.05
        x = torch.randn(3, 70, k, device=DEV, dtype=BF16)
        for chunks in (-1, 1):  # the default plan (the fused forward on sm_90a), version 1
            def run(t, la, lb, chunks=chunks):
                with ops.qlora_plan(chunks=chunks):
                    return ops.qlora_linear(t, nf, la, lb, 2.0)

            compare(f"qlora_linear chunks={chunks} {n}x{k}", run,
                    lambda t, la, lb: ops.qlora_linear_reference(t, nf, la, lb, 2.0), x, a, b)
    k, n = 256, 704
    x = torch.randn(2, 50, k, device=DEV, dtype=BF16)
    proj = [LoRAProjection(NF4Weight.quantize(torch.randn(o, i, device=DEV, dtype=BF16) * 0.02, 64),
                           torch.randn(8, i, device=DEV, dtype=BF16) * 0.05,
                           torch.randn(o, 8, device=DEV, dtype=BF16) * 0.05, 2.0)
            for o, i in ((n, k), (n, k), (k, n))]
    compare("lora_mlp", lambda t: ops.lora_mlp(t, *proj), lambda t: ops.lora_mlp_reference(t, *proj), x)
    compare("lora_qkv", lambda t: torch.cat([o.flatten() for o in ops.lora_qkv(t, proj[0], proj[1], proj[1])]),
            lambda t: torch.cat([o.flatten() for o in ops.lora_qkv_reference(t, proj[0], proj[1], proj[1])]), x)


def gguf_family():
    x = torch.randn(64, 512, device=DEV, dtype=BF16)
    for qtype in ("Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K"):
        data = ops.gguf_quantize(x, qtype)
        if not torch.equal(data.cpu(), ops.gguf_quantize(x.cpu(), qtype)):  # the kernels are byte-identical
            raise AssertionError(f"gguf {qtype}: device bytes differ from the CPU kernel's")
        check(f"gguf {qtype}", ops.gguf_dequantize_reference(data.cpu(), qtype).view(x.shape), x.float().cpu(), 0.6)


STEPS = [norms_and_activations, cross_entropy_family, softmax_block, lm_head_family, lm_head_fused, nf4_kernels,
         lora_family, gguf_family]
# Steps with cuBLAS GEMMs between our kernels. racecheck stops at any cuBLAS GEMM on the H100 ("Internal Sanitizer
# Error: failed to handle a hardware exception"), so --without-cublas leaves them out; their swiftlora kernels are
# racechecked elsewhere: online_softmax_block_ in softmax_block, the CE kernels in cross_entropy_family, qlora_gemm
# and the NF4 kernels in nf4_kernels, and the fused logits kernel by bench/micro/logits_softmax (LSM_SANITIZE=1).
# The merge kernel of lm_head_fused uses no shared memory, where racecheck looks.
CUBLAS_STEPS = ("lm_head_family", "lm_head_fused", "lora_family")


def main(argv: list[str] | None = None) -> int:
    global DEV
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--steps", default=",".join(f.__name__ for f in STEPS), help="comma-separated step names")
    parser.add_argument("--without-cublas", action="store_true",
                        help=f"leave out the steps that call cuBLAS ({', '.join(CUBLAS_STEPS)}): for racecheck")
    args = parser.parse_args(argv)
    DEV = torch.device(args.device)
    by_name = {f.__name__: f for f in STEPS}
    unknown = sorted(set(args.steps.split(",")) - set(by_name))
    if unknown:
        parser.error(f"--steps: unknown {unknown}; choose from {sorted(by_name)}")
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops: no CUDA device")
        return 2
    torch.manual_seed(0)
    failed = 0
    names = args.steps.split(",")
    if args.without_cublas:
        print(f"skip {', '.join(n for n in names if n in CUBLAS_STEPS) or 'nothing'} (--without-cublas)")
        names = [n for n in names if n not in CUBLAS_STEPS]
    for step in [by_name[name] for name in names]:
        try:
            step()
            if DEV.type == "cuda":
                torch.cuda.synchronize()
            print(f"ok   {step.__name__}", flush=True)
        except Exception:  # noqa: BLE001  (report every step, then fail)
            failed += 1
            print(f"FAIL {step.__name__}\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
