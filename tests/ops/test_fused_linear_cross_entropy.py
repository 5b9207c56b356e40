"""fused_linear_cross_entropy against its float64 reference (F.linear + cross-entropy) and against the unfused
cross_entropy: loss and gradients of hidden, weight and bias, every option, chunks that do not divide N, the
deferred path (reduction "none" with a trainable head), the chunk-size rule, bad input."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import (cross_entropy, cross_entropy_reference, fused_linear_cross_entropy,
                           fused_linear_cross_entropy_reference)
from swiftlora.ops.fused_linear_cross_entropy import chunk_rows
from tests.helpers import DEVICES, DTYPES, assert_close, randn, rel_err
from tests.ops.ce_helpers import (IGNORE, assert_close_grad, assert_close_values, backward_factor, labels,
                                  rounded_twice, scaled_after_rounding, upstream_grad)


def _inputs(n, h, v, dtype, device, bias=True, train_w=True):
    hidden = randn(n, h, dtype=dtype, device=device, requires_grad=True)
    weight = randn(v, h, dtype=dtype, device=device, scale=h**-0.5, requires_grad=train_w)  # logits ~ N(0, 1)
    b = randn(v, dtype=dtype, device=device, requires_grad=train_w) if bias else None
    return hidden, weight, b


def _check(hidden, weight, bias, y, what="", lowp_rows=None, **opts):
    """Loss and the gradients of every input that requires grad, against the float64 reference and the reference in
    the inputs' dtype. lowp_rows: the token chunk the op's GEMMs take (default: chunk_size when given), for the
    low-precision loss."""
    params = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    loss = fused_linear_cross_entropy(hidden, weight, y, bias, **opts)
    g = upstream_grad(loss, opts.get("reduction", "mean"))
    grads = torch.autograd.grad(loss, params, g)
    ref_opts = {k: v for k, v in opts.items() if k not in ("chunk_size", "memory_budget_mb")}
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", hidden.dtype)):
        rp = [None if t is None else t.detach().to(dt).requires_grad_(t.requires_grad) for t in (hidden, weight, bias)]
        rl = fused_linear_cross_entropy_reference(*rp[:2], y, rp[2], **ref_opts)
        refs[name] = rl.detach(), torch.autograd.grad(rl, [t for t in rp if t is not None and t.requires_grad],
                                                      g.to(rl.dtype))
    assert loss.dtype == torch.float32 and loss.shape == refs["64"][0].shape
    lowp_loss = refs["lowp"][0]
    lowp_rows = opts.get("chunk_size", lowp_rows)
    if lowp_rows is not None and hidden.dtype != torch.float32:
        # the low-precision loss from the op's own token chunks: cuBLAS may round a chunk's logits differently from
        # one full-size GEMM (another kernel at another M: an ulp here and there), and with a few dozen rows the
        # full GEMM's error is too noisy a yardstick (measured: 4 of 30 draws over 2x at 29 rows)
        lowp_loss = _chunked_lowp_loss(hidden, weight, bias, y, lowp_rows, ref_opts)
    assert_close_values(loss, refs["64"][0], lowp_loss, hidden.dtype, what=f"{what} loss")
    reduction = opts.get("reduction", "mean")
    deferred = reduction == "none" and weight.requires_grad  # grads made in the backward: rounded once
    twice = rounded_twice(hidden.dtype, reduction, g) and not deferred
    ref_twice = [None] * len(grads)
    if twice:
        unit_opts = {k: v for k, v in ref_opts.items() if k not in ("reduction", "num_items_in_batch")}
        rp = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in (hidden, weight, bias)]
        unit = fused_linear_cross_entropy_reference(*rp[:2], y, rp[2], reduction="none", **unit_opts).sum()
        unit_grads = torch.autograd.grad(unit, [t for t in rp if t is not None and t.requires_grad])
        ref_twice = scaled_after_rounding(unit_grads, backward_factor(reduction, g, y, opts.get("num_items_in_batch")))
    for name, out, r64, rlow, r2 in zip(("hidden", "weight", "bias"), grads, refs["64"][1], refs["lowp"][1],
                                        ref_twice):
        assert out.dtype == rlow.dtype, f"{what} grad_{name} dtype"
        assert_close_grad(out, r64, rlow, twice, what=f"{what} grad_{name}", ref_twice=r2)
    return loss, grads


def _chunked_lowp_loss(hidden, weight, bias, y, rows, ref_opts):
    """fused_linear_cross_entropy_reference's loss in the inputs' dtype with the logits made chunk by chunk."""
    h2, y2 = hidden.detach().reshape(-1, hidden.shape[-1]), y.reshape(-1)
    b = None if bias is None else bias.detach()
    logits = torch.cat([torch.nn.functional.linear(h2[s:s + rows], weight.detach(), b)
                        for s in range(0, h2.shape[0], rows)])
    opts = dict(ref_opts)
    if opts.get("reduction", "mean") == "none":
        return cross_entropy_reference(logits, y2, **opts).reshape(y.shape)
    return cross_entropy_reference(logits, y2, **opts)


OPTIONS = [
    {},
    {"label_smoothing": 0.1, "z_loss": 1e-4},
    {"softcap": 10.0, "logit_scale": 0.5},
    {"num_items_in_batch": 37},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("trainable", ["head", "frozen_head", "hidden_frozen"])
def test_matches_reference(device, dtype, reduction, trainable):
    n, h, v = 29, 48, 203
    hidden, weight, bias = _inputs(n, h, v, dtype, device, bias=trainable != "frozen_head",
                                   train_w=trainable != "frozen_head")
    if trainable == "hidden_frozen":
        hidden.requires_grad_(False)
    for opts in OPTIONS:
        if reduction != "mean" and "num_items_in_batch" in opts:
            continue
        y = labels(n, v, device)
        _check(hidden, weight, bias, y, what=f"{trainable} {opts}", reduction=reduction, chunk_size=8, **opts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 5, 16, 17, 100])
def test_chunk_sizes_that_do_not_divide_n(device, chunk):
    n, h, v = 17, 24, 1000
    hidden, weight, bias = _inputs(n, h, v, torch.float32, device)
    y = labels(n, v, device)
    ref, ref_grads = _check(hidden, weight, bias, y, what="whole batch", chunk_size=n)
    loss, grads = _check(hidden, weight, bias, y, what=f"chunk {chunk}", chunk_size=chunk)
    assert rel_err(loss, ref) < 1e-6 and all(rel_err(a, b) < 1e-6 for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_and_unfused_agree(device, dtype):
    b, t, h, v = 2, 9, 32, 7
    hidden = randn(b, t, h, dtype=dtype, device=device, requires_grad=True)
    weight = randn(v, h, dtype=dtype, device=device, scale=0.5, requires_grad=True)
    bias = randn(v, dtype=dtype, device=device, requires_grad=True)
    y = torch.randint(0, v, (b, t), device=device)
    y[1, -3:] = IGNORE
    opts = dict(label_smoothing=0.05, softcap=20.0, z_loss=1e-3)
    fused = fused_linear_cross_entropy(hidden, weight, y, bias, chunk_size=4, **opts)
    gf = torch.autograd.grad(fused, (hidden, weight, bias))
    unfused = cross_entropy(torch.nn.functional.linear(hidden, weight, bias), y, **opts)
    gu = torch.autograd.grad(unfused, (hidden, weight, bias))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(fused, unfused) < tol
    for a, u in zip(gf, gu):
        assert a.shape == u.shape and a.dtype == u.dtype
        assert rel_err(a, u) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_all_ignored_batch_gives_zero_loss_and_gradient(device):
    hidden, weight, bias = _inputs(6, 16, 11, torch.bfloat16, device)
    y = torch.full((6,), IGNORE, device=device)
    for opts in ({}, {"reduction": "sum"}, {"reduction": "none"}, {"num_items_in_batch": 0}):
        loss = fused_linear_cross_entropy(hidden, weight, y, bias, chunk_size=4, **opts)
        grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
        assert (loss == 0).all() and all((g == 0).all() for g in grads), opts


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_and_backward_once(device):
    hidden, weight, bias = _inputs(10, 16, 13, torch.float32, device)
    y = labels(10, 13, device)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, y, bias, chunk_size=3)
    assert_close(loss, fused_linear_cross_entropy_reference(hidden.double(), weight.double(), y, bias.double()))
    loss = fused_linear_cross_entropy(hidden, weight, y, bias, chunk_size=3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_chunk_rows_rule():
    bf16 = torch.bfloat16
    assert chunk_rows(8192, 128256, bf16) == 256  # 64 MiB: cap 261 -> 256; 32 chunks
    assert chunk_rows(8192, 151936, bf16) == 192  # cap 220 -> 192; 43 chunks of 191 -> 192
    assert chunk_rows(8192, 128256, bf16, 96) == 384  # cap 392 -> 384; 22 chunks of <= 384
    assert chunk_rows(100, 128256, bf16, 96) == 100  # fits: one chunk
    assert chunk_rows(1000, 128256, torch.float32, 64) == 128  # cap 130 -> 128; 8 chunks of 125 -> 128
    assert chunk_rows(1000, 128256, torch.float32, 100) == 192  # cap 204 -> 192; 6 chunks of 167 -> 192
    assert chunk_rows(50, 100000, torch.float32, 1) == 2  # cap 2 (< 64: not aligned); 25 chunks of 2
    assert chunk_rows(7, 10**9, torch.float32, 1) == 1  # a row over budget still runs one row at a time
    assert chunk_rows(1000, 10, bf16, 96, chunk_size=33) == 33
    assert chunk_rows(20, 10, bf16, 96, chunk_size=33) == 20
    for n in (1, 77, 5000, 12345):
        rows = chunk_rows(n, 32000, bf16, 16)
        assert 1 <= rows <= n and rows * 32000 * 2 <= 16 * 2**20 or rows == 1
    # a trainable head: at least TRAINABLE_HEAD_MIN_ROWS (1024) rows whatever the budget; an explicit size wins
    assert chunk_rows(8192, 128256, bf16, trainable_head=True) == 1024  # 8 chunks
    assert chunk_rows(8192, 128256, bf16, 600, trainable_head=True) == 2048  # cap 2452 -> 2432: 4 chunks of 2048
    assert chunk_rows(1500, 128256, bf16, trainable_head=True) == 768  # cap 1024: 2 chunks of 750 -> 768
    assert chunk_rows(900, 128256, bf16, trainable_head=True) == 900  # fits: one chunk
    assert chunk_rows(8192, 128256, bf16, chunk_size=256, trainable_head=True) == 256
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        chunk_rows(10, 10, bf16, chunk_size=0)
    with pytest.raises(ValueError, match="memory_budget_mb must be a positive number"):
        chunk_rows(10, 10, bf16, memory_budget_mb=0)


@pytest.mark.parametrize("device", DEVICES)
def test_default_chunking_matches_reference(device):
    hidden, weight, bias = _inputs(300, 16, 1000, torch.float32, device)
    y = labels(300, 1000, device)
    _check(hidden, weight, bias, y, what="budget 0.5 MiB", memory_budget_mb=0.5)  # 131 rows -> 128 per chunk
    _check(hidden, weight, bias, y, what="budget 0.1 MiB", memory_budget_mb=0.1)  # 26 rows, 12 chunks of 25
    _check(hidden, weight, bias, y, what="default budget")


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_clear_errors(device):
    hidden, weight, bias = _inputs(4, 8, 10, torch.float32, device)
    y = labels(4, 10, device, ignored=0.0)
    f = fused_linear_cross_entropy
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        f(hidden, weight.double(), y)
    with pytest.raises(ValueError, match=r"hidden must be \[\.\.\., 8\]"):
        f(hidden[:, :7], weight, y)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        f(hidden, weight[0], y)
    with pytest.raises(ValueError, match=r"bias must be a tensor \[10\]"):
        f(hidden, weight, y, bias[:9])
    with pytest.raises(TypeError, match="bias must have weight's dtype"):
        f(hidden, weight, y, bias.half())
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        f(hidden, weight, y[:2])
    with pytest.raises(ValueError, match="reduction must be one of"):
        f(hidden, weight, y, reduction="max")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        f(hidden, weight, y, chunk_size=-1)
    with pytest.raises(TypeError, match="hidden must be a tensor"):
        f(None, weight, y)
    if device == "cpu":  # CUDA makes the row NaN instead (no host sync)
        with pytest.raises(IndexError, match=r"labels\[2\] = 10 is outside the vocab"):
            f(hidden, weight, torch.tensor([0, 1, 10, 2], device=device))


@pytest.mark.gpu
def test_weight_on_another_device_is_rejected():
    hidden, weight, _ = _inputs(4, 8, 10, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="weight must be on the device of hidden"):
        fused_linear_cross_entropy(hidden, weight.cpu(), labels(4, 10, "cuda"))


@pytest.mark.parametrize("device", DEVICES)
def test_float16_with_a_grad_scaler_does_not_underflow(device):
    """fp16 training multiplies the loss by a GradScaler's 2^16: forming the mean's 1/N-scaled gradient in fp16 in
    the forward would flush p/N (~1e-7 here) into subnormals before that factor arrives."""
    n, h, v = 2048, 16, 1000
    hidden, weight, bias = _inputs(n, h, v, torch.float16, device, bias=False)
    y = labels(n, v, device, ignored=0.0)
    scale = torch.tensor(2.0**16, device=device)
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", torch.float16)):
        rp = [t.detach().to(dt).requires_grad_() for t in (hidden, weight)]
        refs[name] = torch.autograd.grad(fused_linear_cross_entropy_reference(*rp, y) * scale, rp)
    fused = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, y) * scale, (hidden, weight))
    for name, g, r64, rlow in zip(("hidden", "weight"), fused, refs["64"], refs["lowp"]):
        assert_close_grad(g, r64, rlow, True, what=f"fused grad_{name}")
    logits = torch.nn.functional.linear(hidden, weight).detach().requires_grad_()
    (ce,) = torch.autograd.grad(cross_entropy(logits * 1, y, inplace_backward=True) * scale, logits)
    ce_refs = [torch.autograd.grad(cross_entropy_reference(t, y) * scale, t)[0]
               for t in (logits.detach().double().requires_grad_(), logits)]
    assert_close_grad(ce, *ce_refs, True, what="cross_entropy in place")
