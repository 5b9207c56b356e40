"""swiftlora's fused LM head against TRL's own (``trl.kernels.ChunkedLogProbFunction``, the implementation TRL's
trainers run when nothing intercepts them): every per-token output, with temperature and soft-capping, and the
gradients of log-probs and entropy (GRPO backpropagates through both); the loss path against transformers'."""
from __future__ import annotations

import pytest
import torch

from swiftlora.nn.head_metrics import head_metrics
from swiftlora.nn.lm_head import head_loss, head_token_outputs
from tests.helpers import rel_err

trl_kernels = pytest.importorskip("trl.kernels")

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _case(seed=0, b=2, s=37, h=48, v=211, trainable=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g, dtype=torch.float64).float().requires_grad_(True)
    head = torch.nn.Linear(h, v, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g) * 0.5)
        head.bias.copy_(torch.randn(v, generator=g))
    head.requires_grad_(trainable)
    labels = torch.randint(0, v, (b, s), generator=g)
    with torch.no_grad():  # some next-token labels are the argmax (top-1 hits), the rest random
        labels[:, 11:20] = head(hidden[:, 10:19]).argmax(-1)
    labels[0, :9] = -100
    return hidden, head, labels


def _trl(hidden, head, labels, temperature, softcap, scale):
    h, y = hidden[:, :-1], labels[:, 1:]
    mask = y != -100
    outs = trl_kernels.ChunkedLogProbFunction.apply(h[mask], head.weight, head.bias, y[mask], temperature, 64,
                                                     softcap, scale, OUTPUTS)
    return {name: torch.zeros(mask.shape, dtype=o.dtype).masked_scatter(mask, o) for name, o in zip(OUTPUTS, outs)}


@pytest.mark.parametrize("temperature,softcap,scale", [(1.0, None, 1.0), (0.7, 30.0, 1.0), (1.3, 5.0, 0.5)])
@pytest.mark.parametrize("trainable", [False, True])
def test_token_outputs_match_trl(temperature, softcap, scale, trainable):
    hidden, head, labels = _case(trainable=trainable)
    ours = head_token_outputs(hidden, head, labels, temperature=temperature, softcap=softcap, logit_scale=scale,
                              outputs=OUTPUTS)
    hidden2 = hidden.detach().clone().requires_grad_(True)
    ref = _trl(hidden2, head, labels, temperature, softcap, scale)
    assert torch.equal(ours["label_mask"], labels[:, 1:] != -100)
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert rel_err(ours[name], ref[name]) < 1e-5, f"{name}: {rel_err(ours[name], ref[name]):.2e}"
    assert torch.equal(ours["is_top1"], ref["is_top1"]) and ours["is_top1"].any()
    # gradients of a GRPO-like objective through both differentiable outputs
    g = torch.randn(ours["log_probs"].shape)
    loss = (ours["log_probs"] * g).sum() + 0.3 * (ours["entropy"] * g.flip(0)).sum()
    ref_loss = (ref["log_probs"] * g).sum() + 0.3 * (ref["entropy"] * g.flip(0)).sum()
    params = [hidden] + ([head.weight, head.bias] if trainable else [])
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, [hidden2] + params[1:])
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-4, f"grad {tuple(a.shape)}: {rel_err(a, b):.2e}"


def test_entropy_gradient_against_autograd_of_full_logits():
    hidden, head, labels = _case(seed=3, trainable=True)
    h = hidden.detach()[0, :20].double().requires_grad_(True)
    w, b = head.weight.detach().double().requires_grad_(True), head.bias.detach().double().requires_grad_(True)
    y = labels[0, :20]
    stats = head_metrics(h, w, b, y, softcap=7.0, scale=0.8)
    z = torch.tanh(0.8 * torch.nn.functional.linear(h, w, b) / 7.0) * 7.0
    logp = torch.log_softmax(z, -1)
    ref = -(logp.exp() * logp).sum(-1)
    assert rel_err(stats["entropy"], ref) < 1e-6  # computed in float32
    g = torch.randn(20, dtype=torch.float64)
    ours = torch.autograd.grad((stats["entropy"] * g).sum(), (h, w, b))
    theirs = torch.autograd.grad((ref * g).sum(), (h, w, b))
    for a, r in zip(ours, theirs):
        assert rel_err(a, r) < 1e-5


def test_all_masked_batch_gives_connected_zeros():
    hidden, head, labels = _case()
    labels[:] = -100
    out = head_token_outputs(hidden, head, labels, outputs=OUTPUTS)
    assert not out["label_mask"].any() and (out["log_probs"] == 0).all() and (out["entropy"] == 0).all()
    (out["log_probs"].sum() + out["entropy"].sum()).backward()
    assert hidden.grad is not None and (hidden.grad == 0).all()
    assert head_loss(hidden, head, labels).item() == 0.0


def test_head_loss_matches_transformers():
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, head, labels = _case(trainable=True)
    ours = head_loss(hidden, head, labels, num_items_in_batch=50)
    ref = ForCausalLMLoss(head(hidden.detach()), labels, vocab_size=head.out_features, num_items_in_batch=50)
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())
