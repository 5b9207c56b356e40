"""token_logprobs against its float64 reference (full logits, log_softmax): log-probs, entropies, temperature,
gradients of hidden and weight from either or both outputs, chunking, ignored tokens, no-grad path, bad input."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import token_logprobs, token_logprobs_reference
from tests.helpers import DEVICES, DTYPES, assert_close, randn, rel_err
from tests.ops.ce_helpers import IGNORE, assert_close_grad, assert_close_values


def _inputs(shape, h, v, dtype, device, train_w=True):
    hidden = randn(*shape, h, dtype=dtype, device=device, requires_grad=True)
    # logits ~ N(0, 1/4): with larger ones the bf16 rounding of the logits alone puts the entropy gradient of the
    # bf16 reference itself past the 1e-2 cap (measured 1.5e-2 at std 3; ours matches it to 3 digits)
    weight = randn(v, h, dtype=dtype, device=device, scale=0.5 * h**-0.5, requires_grad=train_w)
    ids = torch.randint(0, v, shape, device=device)
    return hidden, weight, ids


def _check(hidden, weight, ids, use=("lp",), what="", **opts):
    """Outputs, and gradients of Σ g·output for the outputs in `use`, against the float64 reference and the
    reference in the inputs' dtype."""
    ent = opts.get("with_entropy", False)
    params = [t for t in (hidden, weight) if t.requires_grad]
    outs = token_logprobs(hidden, weight, ids, **opts)
    outs = outs if ent else (outs,)
    gs = [torch.randn(o.shape, device=o.device) for o in outs]
    picked = [(o, g) for name, o, g in zip(("lp", "ent"), outs, gs) if name in use]
    grads = torch.autograd.grad([o for o, _ in picked], params, [g for _, g in picked])
    ref_opts = {k: v for k, v in opts.items() if k not in ("chunk_size", "memory_budget_mb")}
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", hidden.dtype)):
        rh, rw = (t.detach().to(dt).requires_grad_(t.requires_grad) for t in (hidden, weight))
        r = token_logprobs_reference(rh, rw, ids, **ref_opts)
        r = r if ent else (r,)
        rp = [(o, g) for n_, o, g in zip(("lp", "ent"), r, gs) if n_ in use]
        refs[name] = [o.detach() for o in r], torch.autograd.grad(
            [o for o, _ in rp], [t for t in (rh, rw) if t.requires_grad], [g.to(dt) for _, g in rp])
    for name, o, r64, rlow in zip(("logprobs", "entropy"), outs, refs["64"][0], refs["lowp"][0]):
        assert o.dtype == torch.float32 and o.shape == ids.shape
        assert_close_values(o, r64, rlow, hidden.dtype, what=f"{what} {name}")
    # frozen weight: grad_hidden is formed in the forward and scaled in the backward (two roundings)
    twice = not weight.requires_grad
    for name, g, r64, rlow in zip(("hidden", "weight"), grads, refs["64"][1], refs["lowp"][1]):
        assert g.dtype == hidden.dtype
        assert_close_grad(g, r64, rlow, twice, what=f"{what} grad_{name}")
    return outs, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use", [("lp",), ("ent",), ("lp", "ent")], ids="+".join)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_matches_reference(device, dtype, use, temperature, head):
    # 128 rows: the 2x rule compares two rounding errors; on 21 rows x 40 their ratio had a tail past 2 (measured
    # max 1.8 in 2000 draws for the entropy gradient in fp16; 1.35 at this size)
    hidden, weight, ids = _inputs((8, 16), 64, 301, dtype, device, train_w=head == "trainable")
    ids[0, 2] = IGNORE
    _check(hidden, weight, ids, use, what=f"{use} T={temperature}", temperature=temperature,
           with_entropy="ent" in use or dtype == torch.float32, chunk_size=5)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_head_backward_runs_once(device):
    hidden, weight, ids = _inputs((5,), 8, 30, torch.float32, device, train_w=False)
    lp = token_logprobs(hidden, weight, ids)
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        lp.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_frozen_weight_ignored_tokens_and_odd_vocab(device, dtype):
    for v in (1, 7, 1000):
        hidden, weight, ids = _inputs((13,), 24, v, dtype, device, train_w=False)
        ids[[2, 5]] = IGNORE
        if v == 1:  # log-prob and entropy are 0, their gradients 0 up to float32 rounding of a + b·1 + d·z
            lp, ent = token_logprobs(hidden, weight, ids, with_entropy=True)
            (lp.sum() + ent.sum()).backward()
            assert (lp == 0).all() and ent.abs().max() < 1e-6 and hidden.grad.abs().max() < 1e-5
            continue
        (lp, _), _ = _check(hidden, weight, ids, ("lp", "ent"), what=f"V={v}", with_entropy=True, chunk_size=4)
        assert (lp[[2, 5]] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_chunking_does_not_change_results(device):
    hidden, weight, ids = _inputs((2, 11), 16, 500, torch.float32, device)
    torch.manual_seed(1)  # the same upstream gradients each time
    base, base_g = _check(hidden, weight, ids, ("lp", "ent"), with_entropy=True, chunk_size=22)
    for kw in ({"chunk_size": 1}, {"chunk_size": 7}, {"memory_budget_mb": 0.01}, {}):
        torch.manual_seed(1)
        outs, grads = _check(hidden, weight, ids, ("lp", "ent"), what=str(kw), with_entropy=True, **kw)
        errs = [rel_err(a, b) for a, b in zip(outs + grads, base + base_g)]
        assert max(errs) < 5e-6, f"{kw}: {errs}"  # GEMMs of other row counts round differently


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_path(device):
    hidden, weight, ids = _inputs((9,), 16, 50, torch.bfloat16, device)
    with torch.no_grad():
        lp, ent = token_logprobs(hidden, weight, ids, temperature=1.3, with_entropy=True, chunk_size=4)
        lp_only = token_logprobs(hidden, weight, ids, temperature=1.3)
    r_lp, r_ent = token_logprobs_reference(hidden, weight, ids, temperature=1.3, with_entropy=True)
    assert_close(lp, r_lp.double(), what="logprobs")
    assert_close(ent, r_ent.double(), what="entropy")
    assert torch.equal(lp, lp_only) and not lp.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_hidden_stays_finite(device):
    hidden, weight, ids = _inputs((8,), 16, 300, torch.bfloat16, device)
    with torch.no_grad():
        hidden.mul_(3e3)  # logits ~ ±1e4
    lp, ent = token_logprobs(hidden, weight, ids, with_entropy=True)
    (lp.sum() + ent.sum()).backward()
    for t in (lp, ent, hidden.grad, weight.grad):
        assert torch.isfinite(t).all()
    # against the reference on the same bf16 logits (their rounding, ulp 64 at 1e4, dwarfs everything else)
    r_lp, r_ent = token_logprobs_reference(hidden.detach(), weight.detach(), ids, with_entropy=True)
    # the entropy of such peaked rows is ~0 (1e-26 in the reference): compare it in nats, not relatively
    assert rel_err(lp, r_lp) < 1e-5 and (ent - r_ent).abs().max().item() < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_clear_errors(device):
    hidden, weight, ids = _inputs((4,), 8, 10, torch.float32, device)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        token_logprobs(hidden, weight, ids, temperature=0.0)
    with pytest.raises(ValueError, match=r"token_ids must have shape \(4,\)"):
        token_logprobs(hidden, weight, ids[:3])
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        token_logprobs(hidden, weight, ids.float())
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        token_logprobs(hidden, weight.half(), ids)
    with pytest.raises(TypeError, match="token_ids must be a tensor"):
        token_logprobs(hidden, weight, None)
    if device == "cpu":
        with pytest.raises(IndexError, match=r"labels\[1\] = 10 is outside the vocab"):
            token_logprobs(hidden, weight, torch.tensor([0, 10, 1, 2]))
