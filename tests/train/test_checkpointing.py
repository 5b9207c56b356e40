"""The offloading checkpoint ("unsloth" gradient checkpointing): gradients equal to running without checkpointing
(dropout replayed from the saved RNG state), on CPU (input kept in place) and on CUDA (input in pinned host memory,
prefetched back in reverse layer order)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from swiftlora.train.checkpointing import HostOffloader, make_offloaded_checkpoint, offloaded_checkpoint
from tests.helpers import DEVICES


class _Layer(nn.Module):
    def __init__(self, width: int, p: float):
        super().__init__()
        self.lin, self.drop = nn.Linear(width, width), nn.Dropout(p)

    def forward(self, x, scale=1.0):
        return x + self.drop(torch.tanh(self.lin(x))) * scale


def _stack(device, p=0.0, n=4, width=48):
    torch.manual_seed(0)
    return nn.ModuleList(_Layer(width, p) for _ in range(n)).to(device)


def _run(layers, x, checkpoint=None):
    h = x
    for layer in layers:
        h = checkpoint(layer, h, scale=0.5) if checkpoint else layer(h, scale=0.5)
    return h.square().mean()


def _grads(layers):
    return [p.grad.clone() for p in layers.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradients_equal_plain_backward(device, p):
    plain = _stack(device, p)
    ours = copy.deepcopy(plain)
    x = torch.randn(3, 40, 48, device=device)  # frozen input (no grad): the anchor still runs the backward
    torch.manual_seed(1)
    _run(plain, x).backward()
    ckpt = make_offloaded_checkpoint(HostOffloader(min_bytes=0))
    torch.manual_seed(1)
    _run(ours, x, ckpt).backward()
    for a, b in zip(_grads(plain), _grads(ours)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_input_gradient_flows(device):
    plain = _stack(device)
    x = torch.randn(2, 9, 48, device=device, requires_grad=True)
    _run(plain, x).backward()
    expected = x.grad.clone()
    x.grad = None
    _run(plain, x, make_offloaded_checkpoint()).backward()
    assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-7)


def test_no_grad_runs_plainly_and_checkpoint_kwargs_are_ignored():
    layer = _Layer(8, 0.0)
    x = torch.randn(2, 8)
    with torch.no_grad():
        out = offloaded_checkpoint(HostOffloader(), layer, x, use_reentrant=False, scale=2.0)
    assert torch.equal(out, layer(x, scale=2.0))


@pytest.mark.gpu
def test_cuda_inputs_wait_in_pinned_host_memory():
    offloader = HostOffloader(min_bytes=0)
    layers = _stack("cuda", n=3, width=256)
    x = torch.randn(4, 512, 256, device="cuda")
    saved = offloader.offload(x)
    assert saved.host.is_pinned() and not saved.host.is_cuda
    torch.testing.assert_close(offloader.restore(saved), x, rtol=0, atol=0)
    plain = copy.deepcopy(layers)
    _run(plain, x).backward()
    _run(layers, x, make_offloaded_checkpoint(offloader)).backward()
    for a, b in zip(_grads(plain), _grads(layers)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert offloader._free or offloader._pending  # buffers come back for the next step


def test_buffer_reuse_takes_the_smallest_that_fits_among_different_sizes():
    """Regression (found by the demo on the H100): free buffers of different sizes were removed with list.remove,
    which compares tensors elementwise and raised a size mismatch."""
    off = HostOffloader()
    small, large = torch.empty(1000, dtype=torch.uint8), torch.empty(3000, dtype=torch.uint8)
    off._free = [large, small]
    assert off._take(800) is small
    assert off._take(2000) is large
    assert off._free == []


@pytest.mark.parametrize("form", ["forward_partial", "bound_call_partial"])
def test_layer_parameters_are_inputs_of_the_graph(form):
    """The two ways transformers hands a layer to the checkpoint function: the layer's trainable parameters become
    inputs of the checkpoint's autograd node, so the outer graph reaches them (DDP's unused-parameter search relies on
    it) and their gradients equal a plain backward's."""
    from functools import partial

    layers = _stack("cpu", n=3)
    x = torch.randn(5, 48, requires_grad=True)
    expected = torch.autograd.grad(_run(layers, x), list(layers.parameters()) + [x])
    ckpt = make_offloaded_checkpoint()
    h = x
    for layer in layers:
        fn = partial(_Layer.forward, layer, scale=0.5) if form == "forward_partial" else partial(layer.__call__,
                                                                                                 scale=0.5)
        h = ckpt(fn, h)
    got = torch.autograd.grad(h.square().mean(), list(layers.parameters()) + [x])  # raises if not reachable
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", ["forward_partial", "bound_call_partial"])
def test_fsdp2_sharded_layers_get_their_gradients(form, monkeypatch):
    """FSDP2 (one gloo rank here): with transformers' older form, ``partial(layer.__call__)``, FSDP2's hooks run inside
    the checkpoint, so the layer's parameters seen before the call are DTensor shards that the recompute never uses:
    the gradients must then reach the gathered parameters the recompute does use (as a plain backward does)."""
    import os
    from functools import partial

    from torch.distributed.fsdp import fully_shard

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29600 + os.getpid() % 1000))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        layers = _stack("cpu", n=3)
        x = torch.randn(5, 48, requires_grad=True)
        expected = torch.autograd.grad(_run(layers, x), list(layers.parameters()))
        for layer in layers:
            fully_shard(layer)
        ckpt = make_offloaded_checkpoint()
        h = x
        for layer in layers:
            if form == "forward_partial":  # the checkpoint inside forward, FSDP2's hooks around it (transformers 5.2x)
                layer.forward = partial(lambda lay, h, scale: ckpt(partial(_Layer.forward, lay, scale=scale), h),
                                        layer)
                h = layer(h, scale=0.5)
            else:  # the checkpoint around __call__, FSDP2's hooks inside it (earlier transformers 5.x)
                h = ckpt(partial(layer.__call__, scale=0.5), h)
        h.square().mean().backward()
        for p, e in zip(layers.parameters(), expected):
            assert p.grad is not None
            torch.testing.assert_close(p.grad.full_tensor(), e, rtol=1e-5, atol=1e-6)
    finally:
        torch.distributed.destroy_process_group()
