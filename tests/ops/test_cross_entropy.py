"""cross_entropy and its primitives (softmax_stats, softmax_grad(_), cross_entropy_fused_, scale_rows_) against
their float64 references: values, gradients, every option, odd vocab sizes, extreme bf16 logits, ignored rows,
in-place backward, strided inputs, opcheck, bad input."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import (cross_entropy, cross_entropy_reference, softmax_grad_reference,
                           softmax_stats_reference)
from tests.helpers import DEVICES, DTYPES, assert_close, randn, rel_err
from tests.ops.ce_helpers import (IGNORE, assert_close_grad, backward_factor, rounded_twice, scaled_after_rounding,
                                  upstream_grad)
from tests.ops.ce_helpers import labels as _labels

ops = torch.ops.swiftlora


def _logits(n, v, dtype, device, scale=3.0):
    return randn(n, v, dtype=dtype, device=device, scale=scale)


# ------------------------------------------------------------------------------------------------- primitives

# (rows, vocab): V = 1 and sizes that are multiples of no block size.
SIZES = [(3, 1), (5, 7), (9, 1000), (4, 32001)]
TRANSFORMS = [(0.0, 1.0), (0.0, 0.37), (30.0, 1.0), (2.5, 1.7)]  # (softcap, logit_scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
def test_softmax_stats_and_grad_match_reference(device, dtype, size, transform):
    n, v = size
    softcap, scale = transform
    x = _logits(n, v, dtype, device)
    for labels in (_labels(n, v, device), None):
        got = ops.softmax_stats(x, labels, IGNORE, softcap, scale, True)
        ref = softmax_stats_reference(x.double(), labels, IGNORE, softcap, scale, True)
        for name, a, b in zip(("lse", "z_label", "z_sum", "pz_sum"), got, ref):
            assert a.dtype == torch.float32
            assert (a.double() - b).abs().max().item() <= 2e-5 * (1 + b.abs().max().item()), f"{name} {labels is None}"
        coef = randn(n, 4, device=device)
        lse = ref[0].float()
        out = ops.softmax_grad(x, labels, IGNORE, lse, coef, softcap, scale)
        ref64 = softmax_grad_reference(x.double(), labels, IGNORE, lse, coef, softcap, scale)
        lowp = softmax_grad_reference(x, labels, IGNORE, lse, coef, softcap, scale)
        assert_close(out, ref64, lowp, what=f"softmax_grad {dtype}")
        buf = x.clone()
        assert ops.softmax_grad_(buf, labels, IGNORE, lse, coef, softcap, scale) is None
        assert torch.equal(buf, out), "softmax_grad_ differs from softmax_grad"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_row_scale", [False, True])
def test_cross_entropy_fused_op(device, dtype, per_row_scale):
    n, v, eps, zl, cap, scale = 11, 301, 0.1, 1e-3, 20.0, 0.8
    x = _logits(n, v, dtype, device)
    y = _labels(n, v, device)
    gs = torch.rand(n, device=device) if per_row_scale else torch.tensor(0.37, device=device)
    opts = dict(ignore_index=IGNORE, label_smoothing=eps, softcap=cap, logit_scale=scale, z_loss=zl, reduction="none")
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", dtype)):
        xr = x.detach().to(dt).requires_grad_()
        loss = cross_entropy_reference(xr, y, **opts)
        (loss * gs.to(loss.dtype)).sum().backward()
        refs[name] = loss.detach(), xr.grad
    buf = x.clone()
    loss, lse = ops.cross_entropy_fused_(buf, y, IGNORE, eps, zl, cap, scale, gs)
    assert_close(loss, refs["64"][0], what="loss")
    assert_close(buf, refs["64"][1], refs["lowp"][1], what="grad in logits")
    valid = y != IGNORE
    lse_ref = softmax_stats_reference(x.double(), None, IGNORE, cap, scale)[0]
    assert_close(lse[valid], lse_ref[valid], what="lse")  # rows without a label: lse unspecified
    assert (loss[~valid] == 0).all() and (buf[~valid] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_rows(device, dtype):
    t = randn(6, 3, 5, dtype=dtype, device=device)
    scale = torch.tensor([1.0, 2.0, -0.5, 1.0, 0.0, 3.0], device=device)
    expect = (t.float() * scale[:, None, None]).to(dtype)
    got = t.clone()
    ops.scale_rows_(got, scale)
    assert torch.equal(got, expect)
    got = t.clone()
    ops.scale_rows_(got, torch.tensor(1.0, device=device))
    assert torch.equal(got, t)
    ops.scale_rows_(got, torch.tensor(-2.0, device=device))
    assert torch.equal(got, (t.float() * -2).to(dtype))
    strided = t.clone().transpose(1, 2)  # rows not contiguous inside: the row-by-row path
    ops.scale_rows_(strided, scale)
    assert torch.equal(strided, expect.transpose(1, 2))
    flat = t[:, 0, 0].clone()
    ops.scale_rows_(flat, scale)
    assert torch.equal(flat, expect[:, 0, 0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype):
    n, v = 5, 33
    x = _logits(n, v, dtype, device)
    y = _labels(n, v, device)
    lse = ops.softmax_stats(x, y, IGNORE, 0.0, 1.0, False)[0]
    coef = randn(n, 4, device=device)
    xg = x.detach().clone().requires_grad_()
    torch.library.opcheck(ops.softmax_stats, (xg, y, IGNORE, 0.0, 1.0, True))
    torch.library.opcheck(ops.softmax_stats, (xg, None, IGNORE, 5.0, 0.5, False))
    torch.library.opcheck(ops.softmax_grad, (x, y, IGNORE, lse, coef, 0.0, 1.0))
    torch.library.opcheck(ops.softmax_grad_, (x.clone(), y, IGNORE, lse, coef, 3.0, 2.0))
    gs = torch.tensor(0.5, device=device)
    torch.library.opcheck(ops.cross_entropy_fused_, (x.clone(), y, IGNORE, 0.1, 0.01, 0.0, 1.0, gs))
    torch.library.opcheck(ops.scale_rows_, (x.clone(), torch.rand(n, device=device)))


def test_softmax_stats_gradients_through_its_autograd():
    x = randn(4, 9, dtype=torch.float64).float().requires_grad_()
    y = _labels(4, 9, "cpu")
    outs = ops.softmax_stats(x, y, IGNORE, 3.0, 0.7, True)
    g = [randn(4) for _ in range(4)]
    torch.autograd.backward(outs, g)
    xr = x.detach().double().requires_grad_()
    torch.autograd.backward(softmax_stats_reference(xr, y, IGNORE, 3.0, 0.7, True), [t.double() for t in g])
    assert_close(x.grad, xr.grad, what="grad through softmax_stats")


# ------------------------------------------------------------------------------------------------ cross_entropy

OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"softcap": 30.0},
    {"logit_scale": 0.125},
    {"z_loss": 1e-4},
    {"label_smoothing": 0.2, "softcap": 5.0, "logit_scale": 2.0, "z_loss": 1e-3},
    {"ignore_index": 3},
]


def _check_cross_entropy(x, y, inplace=False, what="", **opts):
    """Our loss and logits gradient (for an upstream gradient: see upstream_grad) against the float64 reference,
    and the reference in x's dtype for the bf16/fp16 bound."""
    xa = x.detach().clone().requires_grad_()
    xin = xa * 1 if inplace else xa  # in place on a non-leaf: the gradient lands in xin's buffer
    loss = cross_entropy(xin, y, inplace_backward=inplace, **opts)
    g = upstream_grad(loss, opts.get("reduction", "mean"))
    loss.backward(g)
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", x.dtype)):
        xr = x.detach().to(dt).requires_grad_()
        lr = cross_entropy_reference(xr, y, **opts)
        lr.backward(g.to(lr.dtype))
        refs[name] = lr.detach(), xr.grad
    assert loss.dtype == torch.float32
    assert_close(loss, refs["64"][0], what=f"{what} loss")
    reduction = opts.get("reduction", "mean")
    twice = inplace and rounded_twice(x.dtype, reduction, g)
    ref_twice = None
    if twice:
        unit_opts = {k: v for k, v in opts.items() if k not in ("reduction", "num_items_in_batch")}
        xr = x.detach().requires_grad_()
        cross_entropy_reference(xr, y, reduction="none", **unit_opts).sum().backward()
        ignore = opts.get("ignore_index", IGNORE)
        factor = backward_factor(reduction, g, torch.where(y == ignore, IGNORE, 0), opts.get("num_items_in_batch"))
        (ref_twice,) = scaled_after_rounding([xr.grad], factor)
    assert_close_grad(xa.grad, refs["64"][1], refs["lowp"][1], twice, what=f"{what} grad", ref_twice=ref_twice)
    return loss, xa.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_cross_entropy_matches_reference(device, dtype, reduction, inplace):
    n, v = 13, 257
    x = _logits(n, v, dtype, device)
    for opts in OPTIONS:
        y = _labels(n, v, device)
        y[y == IGNORE] = opts.get("ignore_index", IGNORE)
        _check_cross_entropy(x, y, inplace, what=f"{opts}", reduction=reduction, **opts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [(1, 1), (7, 7), (3, 1000), (5, 32001)], ids=str)
def test_odd_vocab_sizes(device, size):
    n, v = size
    for dtype in (torch.float32, torch.bfloat16):
        x = _logits(n, v, dtype, device)
        _check_cross_entropy(x, _labels(n, v, device, ignored=0.2), what=f"{size} {dtype}", label_smoothing=0.05)
        _check_cross_entropy(x, _labels(n, v, device, ignored=0.2), inplace=True, what=f"{size} {dtype} inplace")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits_stay_finite(device, dtype):
    n, v = 6, 1001
    big = 1e4 if dtype != torch.float16 else 6e4
    x = torch.randn(n, v, device=device).sign().mul(big).to(dtype)
    x[:, :3] = big * torch.tensor([1.0, -1.0, 0.5], device=device).to(dtype)
    y = torch.tensor([0, 1, 2, 5, IGNORE, v - 1], device=device)
    for opts in ({}, {"label_smoothing": 0.1, "z_loss": 1e-6}, {"softcap": 30.0}, {"reduction": "none"}):
        for inplace in (False, True):
            xa = x.detach().clone().requires_grad_()
            loss = cross_entropy(xa * 1, y, inplace_backward=inplace, **opts)
            loss.sum().backward()
            refs = []
            for dt in (torch.float64, dtype):
                xr = x.detach().to(dt).requires_grad_()
                cross_entropy_reference(xr, y, **opts).sum().backward()
                refs.append(xr.grad)
            ref = cross_entropy_reference(x.double(), y, **opts)
            assert torch.isfinite(loss).all() and torch.isfinite(xa.grad).all(), f"{opts} {inplace}"
            assert rel_err(loss, ref) < 1e-5, f"{opts} {inplace}"
            # + big·2^-24: the float32 lse that softmax_stats returns is rounded by up to half an ulp, big·2^-24
            # (6e-4 at 1e4), which shifts every p = exp(z − lse) of the out-of-place backward by as much (measured:
            # 1e-5..8e-5 overall). In place in fp16 the gradient is formed at unit scale and divided by the token
            # count in the backward: rounded twice, x3.
            twice = inplace and dtype == torch.float16
            bound = (3 if twice else 2) * rel_err(refs[1], refs[0]) + big * 2**-24
            assert rel_err(xa.grad, refs[0]) <= bound, f"{opts} {inplace}: {rel_err(xa.grad, refs[0]):.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_all_ignored_batch_gives_zero_loss_and_gradient(device, inplace):
    x = _logits(4, 50, torch.bfloat16, device)
    y = torch.full((4,), IGNORE, device=device)
    for opts in ({"reduction": "mean"}, {"reduction": "sum"}, {"reduction": "none"}, {"num_items_in_batch": 0},
                 {"num_items_in_batch": torch.tensor(0, device=device)}, {"label_smoothing": 0.3, "z_loss": 0.1}):
        xa = x.detach().clone().requires_grad_()
        loss = cross_entropy(xa * 1 if inplace else xa, y, inplace_backward=inplace, **opts)
        loss.sum().backward()
        assert (loss == 0).all() and torch.isfinite(loss).all(), opts
        assert (xa.grad == 0).all(), opts


@pytest.mark.parametrize("device", DEVICES)
def test_num_items_in_batch(device):
    n, v = 10, 64
    x = _logits(n, v, torch.float32, device)
    y = _labels(n, v, device)
    for items in (7, 23.0, torch.tensor(23, device=device), torch.tensor([23]), torch.tensor(5.0, device=device)):
        for inplace in (False, True):
            loss, _ = _check_cross_entropy(x, y, inplace, what=f"num_items {items}", num_items_in_batch=items)
            total = cross_entropy(x, y, reduction="sum")
            assert torch.allclose(loss, total / float(items), rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_shapes_strides_and_label_dtypes(device):
    b, t, v = 2, 5, 99
    x = randn(b, t, v, device=device, scale=2.0)
    y = torch.randint(0, v, (b, t), device=device)
    y[0, 0] = IGNORE
    loss, _ = _check_cross_entropy(x, y, what="[B, T, V]", reduction="none")
    assert loss.shape == (b, t)
    _check_cross_entropy(x, y.int(), what="int32 labels")
    _check_cross_entropy(x, y.reshape(-1), what="flat labels")
    padded = randn(b * t, v + 13, device=device)[:, :v]  # row stride V + 13: read in place
    _check_cross_entropy(padded, y.reshape(-1), what="padded rows")
    _check_cross_entropy(padded, y.reshape(-1), inplace=True, what="padded rows inplace")
    transposed = randn(v, b * t, device=device).t()  # no unit stride on V: copied
    _check_cross_entropy(transposed, y.reshape(-1), what="transposed")
    _check_cross_entropy(transposed, y.reshape(-1), inplace=True, what="transposed inplace (on a copy)")
    _check_cross_entropy(x[:, ::2], y[:, ::2], what="strided tokens")


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_and_inference(device):
    x = _logits(8, 40, torch.bfloat16, device)
    y = _labels(8, 40, device)
    before = x.clone()
    with torch.no_grad():
        loss = cross_entropy(x.requires_grad_(), y, inplace_backward=True)
    assert torch.equal(x, before), "no backward wanted: logits left alone even with inplace_backward"
    assert_close(loss, cross_entropy_reference(x.detach().double(), y), what="no_grad loss")


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_backward_overwrites_logits(device):
    x = _logits(6, 30, torch.float32, device)
    y = _labels(6, 30, device, ignored=0.0)
    leaf = x.detach().clone().requires_grad_()
    logits = leaf * 1
    version = logits._version
    loss = cross_entropy(logits, y, inplace_backward=True)
    assert logits._version > version, "autograd is told the logits changed"
    loss.backward()
    assert torch.equal(logits.detach(), leaf.grad), "the gradient lives in the logits' buffer"
    assert_close(leaf.grad, torch.autograd.functional.jacobian(
        lambda t: cross_entropy_reference(t, y), x.double()), what="grad")
    # an op that saved the logits for its own backward now fails loudly instead of using the gradient
    leaf.grad = None
    capped = torch.tanh(leaf)  # tanh saves its output
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        cross_entropy(capped, y, inplace_backward=True).backward()
    # the gradient buffer is scaled in place: a second backward is refused
    loss = cross_entropy(leaf * 1, y, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_clear_errors(device):
    x = _logits(4, 10, torch.float32, device)
    y = _labels(4, 10, device, ignored=0.0)
    with pytest.raises(TypeError, match="logits must be float32, float16 or bfloat16"):
        cross_entropy(x.double(), y)
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        cross_entropy(x, y.float())
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        cross_entropy(x, y[:3])
    with pytest.raises(ValueError, match="logits must not be empty"):
        cross_entropy(x[:0], y[:0])
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(x, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        cross_entropy(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap must be"):
        cross_entropy(x, y, softcap=-1.0)
    with pytest.raises(ValueError, match="logit_scale must be finite and nonzero"):
        cross_entropy(x, y, logit_scale=0.0)
    with pytest.raises(ValueError, match="z_loss must be"):
        cross_entropy(x, y, z_loss=-1.0)
    with pytest.raises(ValueError, match="num_items_in_batch replaces the divisor"):
        cross_entropy(x, y, reduction="sum", num_items_in_batch=3)
    with pytest.raises(TypeError, match="labels must be a tensor"):
        cross_entropy(x, [1, 2, 3, 4])
    lse, coef = torch.zeros(4, device=device), torch.zeros(4, 4, device=device)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ops.softmax_stats(x[0], None, IGNORE, 0.0, 1.0, False)
    with pytest.raises(ValueError, match="unit stride on the vocab dim"):
        ops.softmax_stats(x.t(), None, IGNORE, 0.0, 1.0, False)
    with pytest.raises(ValueError, match="softcap must be finite"):
        ops.softmax_stats(x, None, IGNORE, float("inf"), 1.0, False)
    with pytest.raises(ValueError, match="logit_scale must be finite and nonzero"):
        ops.softmax_stats(x, None, IGNORE, 0.0, float("nan"), False)
    with pytest.raises(ValueError, match=r"lse must have shape \[4\]"):
        ops.softmax_grad(x, y, IGNORE, lse[:3], coef, 0.0, 1.0)
    with pytest.raises(TypeError, match="lse must be float32"):
        ops.softmax_grad(x, y, IGNORE, lse.double(), coef, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"coef must have shape \[4, 4\]"):
        ops.softmax_grad(x, y, IGNORE, lse, coef[:, :3], 0.0, 1.0)
    with pytest.raises(ValueError, match="rows must not overlap"):
        ops.softmax_grad_(x[:1].expand(4, 10), y, IGNORE, lse, coef, 0.0, 1.0)
    gs = torch.tensor(1.0, device=device)
    with pytest.raises(ValueError, match=r"grad_scale must have shape \[\] or \[4\]"):
        ops.cross_entropy_fused_(x.clone(), y, IGNORE, 0.0, 0.0, 0.0, 1.0, gs.expand(3))
    with pytest.raises(TypeError, match="grad_scale must be float32"):
        ops.cross_entropy_fused_(x.clone(), y, IGNORE, 0.0, 0.0, 0.0, 1.0, gs.double())
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ops.cross_entropy_fused_(x.clone(), y, IGNORE, -0.1, 0.0, 0.0, 1.0, gs)
    with pytest.raises(ValueError, match="z_loss must be finite"):
        ops.cross_entropy_fused_(x.clone(), y, IGNORE, 0.0, -1.0, 0.0, 1.0, gs)
    with pytest.raises(ValueError, match=r"scale must have shape \[\] or \[4\]"):
        ops.scale_rows_(x.clone(), torch.ones(3, device=device))
    with pytest.raises(TypeError, match="scale must be float32"):
        ops.scale_rows_(x.clone(), torch.ones(4, device=device, dtype=torch.float64))


def test_out_of_range_label_raises_on_cpu():
    x = _logits(3, 10, torch.float32, "cpu")
    for bad in (10, -1, -101):
        y = torch.tensor([0, bad, 2])
        with pytest.raises(IndexError, match=rf"labels\[1\] = {bad} is outside the vocab \[0, 10\)"):
            cross_entropy(x, y)
        buf = x.clone()
        with pytest.raises(IndexError, match="is outside the vocab"):
            ops.cross_entropy_fused_(buf, y, IGNORE, 0.0, 0.0, 0.0, 1.0, torch.tensor(1.0))
        assert torch.equal(buf, x), "labels are checked before anything is written"


@pytest.mark.gpu
def test_out_of_range_label_poisons_with_nan_on_cuda():
    x = _logits(3, 10, torch.float32, "cuda")
    loss = cross_entropy(x, torch.tensor([0, 12, 2], device="cuda"), reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.gpu
def test_labels_on_another_device_are_rejected():
    x = _logits(3, 10, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="labels must be on the device of logits"):
        cross_entropy(x, torch.tensor([0, 1, 2]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu_kernel(dtype):
    x = _logits(64, 32001, dtype, "cpu")
    y = _labels(64, 32001, "cpu")
    opts = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0, reduction="none")
    cpu = cross_entropy(x, y, **opts)
    gpu = cross_entropy(x.cuda(), y.cuda(), **opts)
    assert rel_err(gpu, cpu) < 1e-5
