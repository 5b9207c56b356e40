"""The chunked dequantize-then-GEMM plan of the qlora ops (csrc/common/qlora_pipeline.h) against the float64
references: qlora_linear, lora_qkv and lora_mlp with explicit chunk counts (the GPU overlaps the chunks on two
streams, the CPU runs them one after the other through the same chunk arithmetic), N not divisible by the chunk
count, N smaller than it, M = 1, chunks straddling projections, both panel alignments; and the chunked
dequantization bit for bit through identity inputs (forward: row chunks, backward: column chunks)."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import (LoRAProjection, dropout_masks, lora_mlp, lora_mlp_reference, lora_qkv,
                           lora_qkv_reference, lora_reference, qlora_linear, qlora_plan)
from swiftlora.ops.lora_weights import op_lists
from tests.helpers import DEVICES, randn
from tests.ops.lora_helpers import (CHAINED_BF16_CAP, check_against_reference, random_nf4, random_projection,
                                    reference_runs)

# (rows of x, K, N, r, chunks). K < N: the panel plan (forward row chunks of [W | s·B | 0], backward column chunks
# whose last one holds the LoRA columns); K >= N: lora_first (chunks of W only). N = 70 and 300 are not divisible
# by the chunk count; N = 3 < 4 chunks; K = 37 is odd (the element-wise dequantization path, chunk edges mid-byte);
# M = 1 in float32 (16-bit M = 1 takes nf4_gemv, no GEMM to chunk). rows·r >= 64 (see test_lora_blocks.py).
SHAPES = [(8, 64, 70, 8, 4), (9, 128, 300, 16, 3), (16, 96, 3, 4, 4), (5, 37, 70, 13, 2), (1, 64, 200, 64, 4),
          (12, 200, 96, 8, 5)]


def _single(x, projs, masks, p_drop=0.0):
    return lora_reference(x, projs[0], None if masks is None else masks[0], p_drop)


def _run(x, proj, grad, plan):
    with plan:
        y = qlora_linear(x, proj.base, proj.lora_a, proj.lora_b, proj.scale, proj.bias)
    y.backward(grad)  # outside the block: the backward keeps its forward's plan
    return y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("align", [8, 64])
def test_qlora_linear_chunked_matches_reference(device, dtype, shape, align):
    m, k, n, r, chunks = shape
    if m == 1 and dtype != torch.float32:
        pytest.skip("16-bit M = 1 takes nf4_gemv")
    proj = random_projection(n, k, r, "nf4", dtype, torch.float32, device, bias=m % 2 == 1)
    x = randn(m, k, dtype=dtype, device=device, requires_grad=True)
    grad = randn(m, n, dtype=dtype, device=device)
    runs = reference_runs(_single, x, [proj], [grad])
    y = _run(x, proj, grad, qlora_plan(chunks, align))
    check_against_reference([y], x, [proj], runs, f"chunks {chunks} align {align} {dtype} {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunks", [2, 3, 7])
def test_qlora_linear_chunked_with_dropout(device, chunks):
    proj = random_projection(72, 40, 12, "nf4_plain", torch.bfloat16, torch.float32, device)
    x = randn(6, 40, dtype=torch.bfloat16, device=device, requires_grad=True)
    grad = randn(6, 72, dtype=torch.bfloat16, device=device)
    mask = dropout_masks(x, 0.3, 1)[0]
    runs = reference_runs(lambda xr, ps, ms: _single(xr, ps, ms, 0.3), x, [proj], [grad], masks=[mask])
    with qlora_plan(chunks):
        y = qlora_linear(x, proj.base, proj.lora_a, proj.lora_b, proj.scale, dropout_p=0.3, dropout_mask=mask)
    y.backward(grad)
    check_against_reference([y], x, [proj], runs, f"dropout, chunks {chunks}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("k", "nq", "nkv"), [(48, 40, 24), (96, 40, 16)], ids=["panel", "lora_first"])
def test_qkv_chunks_straddle_projections(device, dtype, k, nq, nkv):
    # 3 chunks of N = 88 rows (30, 30, 28) or K = 96 columns cut through q / k / v and their LoRA blocks.
    projs = [random_projection(n, k, 8, "nf4", dtype, torch.float32, device, bias=i == 1)
             for i, n in enumerate((nq, nkv, nkv))]
    x = randn(9, k, dtype=dtype, device=device, requires_grad=True)
    grads = [randn(9, n, dtype=dtype, device=device) for n in (nq, nkv, nkv)]
    runs = reference_runs(lambda xr, ps, m: lora_qkv_reference(xr, *ps), x, projs, grads)
    with qlora_plan(3):
        outs = lora_qkv(x, *projs)
    torch.autograd.backward(outs, grads)
    check_against_reference(list(outs), x, projs, runs, f"qkv chunks 3 {dtype} k={k}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunks", [2, 4])
def test_mlp_chunked_matches_reference(device, dtype, chunks):
    k, f = 64, 168  # gate/up: panel plan over N = 2·168; down: lora_first, K = 168 in column chunks
    projs = [random_projection(n, kk, 8, "nf4", dtype, torch.float32, device) for n, kk in ((f, k), (f, k), (k, f))]
    x = randn(10, k, dtype=dtype, device=device, requires_grad=True)
    grad = randn(10, k, dtype=dtype, device=device)
    runs = reference_runs(lambda xr, ps, m: lora_mlp_reference(xr, *ps), x, projs, [grad])
    with qlora_plan(chunks, 64):
        y = lora_mlp(x, *projs)
    y.backward(grad)
    check_against_reference([y], x, projs, runs, f"mlp chunks {chunks} {dtype}",
                            cap=CHAINED_BF16_CAP if dtype == torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n", "k", "blocksize"), [(70, 64, 64), (33, 200, 32), (50, 37, 64), (3, 96, 128)],
                         ids=str)
@pytest.mark.parametrize("chunks", [1, 3, 4])
def test_chunked_dequantization_is_exact(device, n, k, blocksize, chunks):
    # Identity inputs and zero LoRA factors: y = I·Wᵀ (row chunks) and grad_x = I·W (column chunks) are the
    # dequantized weight itself, bit for bit, whatever the chunking.
    w = random_nf4(n, k, blocksize, nested=True, device=device)
    dt = torch.bfloat16
    a, b = torch.zeros(1, k, device=device), torch.zeros(n, 1, device=device)
    args = op_lists([LoRAProjection(w, a, b, 1.0)])
    ref = w.dequantize(dt)
    with torch.no_grad():
        y, _ = torch.ops.swiftlora.qlora_linear(torch.eye(k, dtype=dt, device=device), *args, [], [], 1.0, chunks)
        gx, _ = torch.ops.swiftlora.qlora_linear_backward(torch.eye(n, dtype=dt, device=device), *args, [], 1.0,
                                                          chunks)
    assert torch.equal(y, ref.t()), "forward (row chunks)"
    assert torch.equal(gx, ref), "backward (column chunks)"


@pytest.mark.parametrize("device", DEVICES)
def test_plan_arguments_are_checked(device):
    proj = random_projection(40, 24, 4, "nf4", torch.bfloat16, torch.float32, device)
    x = randn(3, 24, dtype=torch.bfloat16, device=device)
    args = op_lists([proj])
    with pytest.raises(ValueError, match=r"panel_align must be a multiple of 8 in \[8, 256\], got 12"):
        torch.ops.swiftlora.qlora_linear(x, *args, [], [], 1.0, 2, 12)
    with pytest.raises(ValueError, match="panel_align must be a multiple of 8"):
        with qlora_plan(2, 300):
            pass
    with pytest.raises(TypeError, match="chunks and panel_align must be ints"):
        with qlora_plan(2.5):
            pass


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("m", "k", "n"), [(1024, 4096, 4096), (1024, 2048, 8200)], ids=str)
def test_cuda_four_chunks_at_model_size(dtype, m, k, n):
    # Model-sized, 4 chunks on two streams; N = 8200 is not a multiple of 64·4. Checked against the reference, and
    # against the one-pass plan (the automatic one).
    proj = random_projection(n, k, 16, "nf4", dtype, torch.float32, "cuda")
    x = randn(m, k, dtype=dtype, device="cuda", requires_grad=True)
    grad = randn(m, n, dtype=dtype, device="cuda")
    runs = reference_runs(_single, x, [proj], [grad])
    y = _run(x, proj, grad, qlora_plan(4))
    check_against_reference([y], x, [proj], runs, f"cuda 4 chunks {dtype} {(m, k, n)}")
    with torch.no_grad(), qlora_plan():
        one = qlora_linear(x, proj.base, proj.lora_a, proj.lora_b, proj.scale)
    assert (y.detach().float() - one.float()).norm() <= 1e-2 * one.float().norm()


@pytest.mark.gpu
def test_cuda_chunks_on_a_side_stream_and_in_a_graph():
    # Called from a non-default stream, and captured in a CUDA graph (the side stream's fork/join must be legal
    # there): the replay equals the eager result.
    proj = random_projection(1024, 512, 16, "nf4", torch.bfloat16, torch.float32, "cuda")
    x = randn(256, 512, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad(), qlora_plan(4):
        eager = qlora_linear(x, proj.base, proj.lora_a, proj.lora_b, proj.scale)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            other = qlora_linear(x, proj.base, proj.lora_a, proj.lora_b, proj.scale)
        torch.cuda.current_stream().wait_stream(s)
        assert torch.equal(other, eager)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = qlora_linear(x, proj.base, proj.lora_a, proj.lora_b, proj.scale)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_a_plan(device):
    projs = [random_projection(72, 40, 3, kind, torch.float32, torch.float32, device, bias=True)
             for kind in ("nf4", "nf4_plain")]
    x = randn(5, 40, device=device, requires_grad=True)
    args = op_lists(projs)
    torch.library.opcheck(torch.ops.swiftlora.qlora_linear, (x, *args, [p.bias for p in projs], [], 1.0, 3, 64))
    frozen = [[t.detach() for t in a] if i in (7, 8) else a for i, a in enumerate(args, start=1)]
    torch.library.opcheck(torch.ops.swiftlora.qlora_linear_backward,
                          (randn(5, 144, device=device), *frozen, [], 1.0, 3, 64))
