"""swiftlora.nn causal-LM loss against transformers' ForCausalLMLoss (fidelity: values and gradients, with and
without num_items_in_batch, shift_labels), the fused form against the unfused one, configs' logit options."""
from __future__ import annotations

import pytest
import torch

from swiftlora.nn import CausalLMLoss, causal_lm_loss, logit_options, shifted_labels
from tests.helpers import DEVICES, assert_close, randn, rel_err

transformers = pytest.importorskip("transformers")
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

B, T, H, V = 3, 11, 32, 97


def _batch(device, dtype=torch.float32, pad=True):
    logits = randn(B, T, V, dtype=dtype, device=device, scale=2.0, requires_grad=True)
    labels = torch.randint(0, V, (B, T), device=device)
    if pad:
        labels[0, :4] = -100  # prompt
        labels[2, -5:] = -100  # padding
    return logits, labels


def _hf(logits, labels, **kw):
    """transformers' loss and its logits gradient, on a float64 copy of the logits (HF upcasts to float32)."""
    x = logits.detach().double().requires_grad_()
    loss = ForCausalLMLoss(x, labels, V, **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_items", [None, 23, "tensor"])
def test_matches_transformers_for_causal_lm_loss(device, dtype, num_items):
    logits, labels = _batch(device, dtype)
    if num_items == "tensor":
        num_items = torch.tensor(23, device=device)
    ref, ref_grad = _hf(logits, labels, num_items_in_batch=num_items)
    loss = causal_lm_loss(logits, labels, V, num_items_in_batch=num_items)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref, what="loss")
    x = logits.detach().requires_grad_()  # HF on the bf16 logits itself: the low-precision reference gradient
    ForCausalLMLoss(x, labels, V, num_items_in_batch=num_items).backward()
    assert_close(grad, ref_grad, x.grad, what="grad")


@pytest.mark.parametrize("device", DEVICES)
def test_shift_labels_and_extra_kwargs(device):
    logits, labels = _batch(device)
    shifted = shifted_labels(labels)
    assert torch.equal(shifted[:, :-1], labels[:, 1:]) and (shifted[:, -1] == -100).all()
    ref, _ = _hf(logits, None, shift_labels=shifted)
    # as model.loss_function: HF passes its model kwargs along, which the loss ignores
    loss = causal_lm_loss(logits=logits, labels=None, vocab_size=V, shift_labels=shifted, output_attentions=False)
    assert_close(loss, ref, what="shift_labels")
    assert_close(causal_lm_loss(logits, labels.cpu(), V), _hf(logits, labels)[0], what="labels on the cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_ignore_index_and_all_ignored_batch(device):
    logits, labels = _batch(device)
    labels[labels == -100] = 5
    ref, _ = _hf(logits, labels, ignore_index=5)
    assert_close(causal_lm_loss(logits, labels, V, ignore_index=5), ref, what="ignore_index=5")
    empty = torch.full_like(labels, -100)
    loss = causal_lm_loss(logits, empty, V)  # HF: NaN (0/0); here 0 with a zero gradient
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0 and (grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_form_matches_unfused(device, dtype):
    hidden = randn(B, T, H, dtype=dtype, device=device, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False, device=device, dtype=dtype)
    _, labels = _batch(device)
    opts = dict(softcap=30.0, logit_scale=0.5)
    for num_items in (None, 19):
        fused = causal_lm_loss(hidden, labels, V, num_items, lm_head_weight=head.weight, chunk_size=7, **opts)
        gf = torch.autograd.grad(fused, (hidden, head.weight))
        unfused = causal_lm_loss(head(hidden), labels, V, num_items, **opts)
        gu = torch.autograd.grad(unfused, (hidden, head.weight))
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_err(fused, unfused) < tol
        assert all(rel_err(a, b) < tol for a, b in zip(gf, gu))


@pytest.mark.parametrize("device", DEVICES)
def test_gemma_style_softcap_matches_transformers(device):
    """Gemma 2 caps its logits before calling the loss; the fused loss caps inside (softcap=)."""
    hidden = randn(B, T, H, device=device, requires_grad=True)
    weight = randn(V, H, device=device, scale=2.0, requires_grad=True)
    _, labels = _batch(device)
    cap = 5.0
    capped = torch.tanh((hidden @ weight.t()).double() / cap) * cap
    ref = ForCausalLMLoss(capped, labels, V)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss = causal_lm_loss(hidden, labels, V, lm_head_weight=weight, softcap=cap)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert_close(loss, ref.detach(), what="loss")
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_module(device):
    logits, labels = _batch(device)
    loss_fn = CausalLMLoss(label_smoothing=0.1)
    assert "label_smoothing=0.1" in repr(loss_fn)
    x = logits.detach().double().requires_grad_()
    shifted = shifted_labels(labels)
    ref = torch.nn.functional.cross_entropy(x.view(-1, V), shifted.reshape(-1), label_smoothing=0.1)
    assert_close(loss_fn(logits, labels), ref.detach(), what="module")
    head = torch.nn.Linear(H, V, device=device)
    hidden = randn(B, T, H, device=device)
    fused = loss_fn(hidden, labels, num_items_in_batch=20, lm_head_weight=head.weight, lm_head_bias=head.bias)
    unfused = loss_fn(head(hidden), labels, num_items_in_batch=20)
    assert rel_err(fused, unfused) < 1e-5


def test_bad_arguments():
    logits, labels = _batch("cpu")
    with pytest.raises(ValueError, match="vocab_size=96 but the logits have 97"):
        causal_lm_loss(logits, labels, 96)
    with pytest.raises(ValueError, match="pass labels"):
        causal_lm_loss(logits, None, V)


def test_logit_options_from_configs():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert logit_options(LlamaConfig()) == {"softcap": None, "logit_scale": 1.0}
    assert logit_options(Gemma2Config(final_logit_softcapping=30.0)) == {"softcap": 30.0, "logit_scale": 1.0}
    assert logit_options(Gemma2Config(final_logit_softcapping=None))["softcap"] is None
    assert logit_options(CohereConfig(logit_scale=0.0625)) == {"softcap": None, "logit_scale": 0.0625}
    assert logit_options(GraniteConfig(logits_scaling=8.0)) == {"softcap": None, "logit_scale": 0.125}


def test_as_a_models_loss_function():
    """Plugged into a tiny random Llama as model.loss_function: the same loss and gradients as transformers' own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, V, (B, T))
    labels = ids.clone()
    labels[0, :3] = -100
    results = []
    for loss_function in (None, causal_lm_loss):
        if loss_function is not None:
            model.loss_function = loss_function
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(25))
        out.loss.backward()
        results.append((out.loss.detach(), model.lm_head.weight.grad.clone()))
    (ref, ref_grad), (loss, grad) = results
    assert rel_err(loss, ref) < 1e-6 and rel_err(grad, ref_grad) < 1e-5
