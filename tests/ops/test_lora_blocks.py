"""The fused LoRA blocks against their float64 references built from the dequantized weights: lora_qkv (q, k, v in
one call) and lora_mlp (gate/up/down with SwiGLU or GeGLU), NF4 and dense (16-bit LoRA) bases, dropout, errors."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import dropout_masks, lora_mlp, lora_mlp_reference, lora_qkv, lora_qkv_reference
from tests.helpers import DEVICES, DTYPES, randn
from tests.ops.lora_helpers import (CHAINED_BF16_CAP, check_against_reference, random_projection, reference_runs,
                                    trainable)

LORA_DTYPES = [torch.float32, torch.bfloat16]
ACTIVATIONS = ["swiglu", "geglu", "geglu_tanh"]


def _qkv_ref(p_drop=0.0):
    return lambda x, ps, m: lora_qkv_reference(x, *ps, dropout_p=p_drop, dropout_masks=m)


def _mlp_ref(activation, p_drop=0.0):
    return lambda x, ps, m: lora_mlp_reference(x, *ps, activation=activation, dropout_p=p_drop, dropout_masks=m)


# (rows, K, N_q, N_kv, r): GQA widths; N_q + 2 N_kv > K takes the panel plan, < K the lora-first plan; M = 1.
# rows·r >= 64 everywhere: grad_A and grad_B inherit the rounding error of the [rows, r] LoRA activations, and the
# twice-the-reference rule needs that many samples not to fail by chance (a 2x ratio of two 8-sample error norms
# is not rare; of two 64-sample norms it is).
QKV_SHAPES = [(6, 64, 64, 16, 8), (1, 48, 96, 24, 32), (5, 200, 64, 16, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lora_dtype", LORA_DTYPES, ids=str)
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=str)
@pytest.mark.parametrize("base", ["nf4", "dense"])
def test_qkv_matches_reference(device, dtype, lora_dtype, shape, base):
    m, k, nq, nkv, r = shape
    projs = [random_projection(n, k, r, base, dtype, lora_dtype, device, bias=(i == 0 and m > 1))
             for i, n in enumerate((nq, nkv, nkv))]
    x = randn(2, m, k, dtype=dtype, device=device, requires_grad=True)
    grads = [randn(2, m, n, dtype=dtype, device=device) for n in (nq, nkv, nkv)]
    runs = reference_runs(_qkv_ref(), x, projs, grads)
    q, kk, v = lora_qkv(x, *projs)
    assert q.shape == (2, m, nq) and kk.shape == v.shape == (2, m, nkv)
    torch.autograd.backward((q, kk, v), grads)
    check_against_reference([q, kk, v], x, projs, runs, f"qkv {base} {dtype} {lora_dtype} {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qkv_dropout_with_given_masks(device, dtype):
    projs = [random_projection(n, 40, 10, "nf4", dtype, torch.float32, device) for n in (40, 8, 8)]
    x = randn(7, 40, dtype=dtype, device=device, requires_grad=True)
    masks = dropout_masks(x, 0.2, 3)
    masks[1] = None  # a projection without dropout
    grads = [randn(7, n, dtype=dtype, device=device) for n in (40, 8, 8)]
    runs = reference_runs(_qkv_ref(0.2), x, projs, grads, masks=masks)
    outs = lora_qkv(x, *projs, dropout_p=0.2, dropout_masks=masks)
    torch.autograd.backward(outs, grads)
    check_against_reference(outs, x, projs, runs, f"qkv dropout {dtype}")


# (rows, K, F, r): F > K (gate/up in one panel GEMM, down lora-first), F < K (the other way round), M = 1.
MLP_SHAPES = [(9, 48, 136, 8), (1, 64, 160, 64), (24, 96, 40, 4)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lora_dtype", LORA_DTYPES, ids=str)
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_matches_reference(device, dtype, lora_dtype, shape, activation):
    m, k, f, r = shape
    projs = [random_projection(f, k, r, "nf4", dtype, lora_dtype, device),
             random_projection(f, k, r, "nf4_plain", dtype, lora_dtype, device, bias=m > 1),
             random_projection(k, f, r, "nf4", dtype, lora_dtype, device, blocksize=32)]
    _check_mlp(projs, randn(m, k, dtype=dtype, device=device, scale=2.0, requires_grad=True), activation,
               f"mlp {activation} {dtype} {lora_dtype} {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_dense_base(device, dtype):
    projs = [random_projection(72, 40, 8, "dense", dtype, torch.float32, device) for _ in range(2)]
    projs.append(random_projection(40, 72, 8, "dense", dtype, torch.float32, device))
    _check_mlp(projs, randn(3, 5, 40, dtype=dtype, device=device, scale=2.0, requires_grad=True), "swiglu",
               f"mlp dense {dtype}")


def _check_mlp(projs, x, activation, what, p_drop=0.0, masks=None):
    grad = randn(*x.shape[:-1], projs[2].out_features, dtype=x.dtype, device=x.device)
    runs = reference_runs(_mlp_ref(activation, p_drop), x, projs, [grad], masks=masks)
    y = lora_mlp(x, *projs, activation=activation, dropout_p=p_drop, dropout_masks=masks)
    y.backward(grad)
    check_against_reference([y], x, projs, runs, what, cap=CHAINED_BF16_CAP)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mlp_dropout_with_given_masks(device, dtype):
    projs = [random_projection(64, 32, 12, "nf4", dtype, torch.float32, device) for _ in range(2)]
    projs.append(random_projection(32, 64, 12, "nf4", dtype, torch.float32, device))
    x = randn(6, 32, dtype=dtype, device=device, scale=2.0, requires_grad=True)
    masks = dropout_masks(x, 0.25, 2) + dropout_masks(x, 0.25, 1, shape=(6, 64))
    _check_mlp(projs, x, "geglu_tanh", f"mlp dropout {dtype}", p_drop=0.25, masks=masks)


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_partial_grads_and_generator(device):
    projs = [random_projection(64, 32, 16, "nf4", torch.bfloat16, torch.float32, device) for _ in range(2)]
    projs.append(random_projection(32, 64, 16, "nf4", torch.bfloat16, torch.float32, device))
    for p in projs[:2]:  # only down trains, x frozen: the backward skips the gate/up part
        p.lora_a.requires_grad_(False)
        p.lora_b.requires_grad_(False)
    _check_mlp(projs, randn(4, 32, dtype=torch.bfloat16, device=device), "swiglu", "mlp down only")
    assert all(p.lora_a.grad is None for p in projs[:2])
    x = randn(4, 32, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device)
    with torch.no_grad():
        y1 = lora_mlp(x, *projs, dropout_p=0.5, generator=gen.manual_seed(3))
        y2 = lora_mlp(x, *projs, dropout_p=0.5, generator=gen.manual_seed(3))
        assert torch.equal(y1, y2) and not torch.equal(y1, lora_mlp(x, *projs))


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_backward_runs_once(device):
    projs = [random_projection(16, 8, 2, "nf4", torch.float32, torch.float32, device) for _ in range(2)]
    projs.append(random_projection(8, 16, 2, "nf4", torch.float32, torch.float32, device))
    y = lora_mlp(randn(3, 8, device=device, requires_grad=True), *projs)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        y.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_block_errors(device):
    g, u = (random_projection(16, 8, 2, "nf4", torch.float32, torch.float32, device) for _ in range(2))
    d = random_projection(8, 16, 2, "nf4", torch.float32, torch.float32, device)
    x = randn(3, 8, device=device)
    with pytest.raises(ValueError, match="activation must be one of"):
        lora_mlp(x, g, u, d, activation="relu")
    with pytest.raises(ValueError, match="dropout_masks must hold three entries"):
        lora_mlp(x, g, u, d, dropout_p=0.1, dropout_masks=[None])
    with pytest.raises(ValueError, match="gate and up must have the same width"):
        lora_mlp(x, g, random_projection(12, 8, 2, "nf4", torch.float32, torch.float32, device), d)
    with pytest.raises(ValueError, match=r"base weight of projection 0 must be \[8, 16\]"):
        lora_mlp(x, g, u, random_projection(8, 12, 2, "nf4", torch.float32, torch.float32, device))
    with pytest.raises(ValueError, match="must hold one entry"):
        lora_qkv(x, g, u, u, dropout_p=0.1, dropout_masks=[None, None])
    assert len(trainable([g, u, d])) == 6
